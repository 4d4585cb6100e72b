"""The rollout engine's decode attention as a C kernel, built on first use.

At batch 64 a bf16 decode step of SmolLM2-135M spent about a quarter of its time in attention:
PyTorch runs it as two batched matmuls of one tiny GEMM per (row, key head), with copies and
casts between, at a few GB/s out of a cache that does not fit in any CPU cache.
`decode_attention.c` reads each cached key and value row once and does the whole softmax in
between (`benchmarks/decode_attention.py` compares them).

The kernel is compiled by the system's C compiler ($CC, else `cc`, `gcc` or `clang`) for this CPU
(`-march=native` where the compiler takes it) into `<thinkling cache>/kernels/`, named by a hash
of the source, the compiler, its flags and the CPU, in well under a second. With no compiler, an
unwritable cache, a kernel that disagrees with `hf_attention.explicit_attention` on a check
problem, or `THINKLING_C_KERNELS=0`, `decode_attention_kernel()` is None and the engine attends
in PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from thinkling.models.hf_attention import explicit_attention
from thinkling.models.registry import cache_root

SOURCE = Path(__file__).with_name("decode_attention.c")
VALUE_DTYPES = (torch.bfloat16, torch.float32)  # the engine's value caches
MAX_QUERIES_PER_KEY_HEAD, MAX_HEAD_DIM = 16, 256  # MAX_REP and MAX_D of decode_attention.c


def _cpu_identity() -> str:
    """The CPU's model and feature flags: a kernel built with -march=native runs only where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    source = SOURCE.read_bytes()
    for arch in (["-march=native"], []):
        flags = ["-O3", *arch, "-ffast-math", "-shared", "-fPIC"]
        key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_identity()]).encode()).hexdigest()[:16]
        target = cache_root() / "kernels" / f"decode_attention-{key}.so"
        if target.is_file():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                      timeout=300)
                if done.returncode == 0:
                    os.replace(built, target)  # atomic: a concurrent build never sees half a file
                    return target
        except (OSError, subprocess.SubprocessError):
            return None
    return None


class DecodeAttention:
    """`explicit_attention` for one query per row over one layer of the engine's cache."""

    def __init__(self, library: Path):
        fn = ctypes.CDLL(str(library)).decode_attention
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64]
        fn.restype = ctypes.c_int
        self._fn = fn
        self._pool, self._pool_size = None, 0

    @staticmethod
    def supports(heads: int, kv_heads: int, head_dim: int, values: torch.Tensor) -> bool:
        """Whether the kernel takes this attention: values cached on the CPU in bf16 or float32, at
        most 16 query heads per key head, head dim at most 256 (the C side's MAX_REP and MAX_D)."""
        return (values.device.type == "cpu" and values.dtype in VALUE_DTYPES and heads % kv_heads == 0
                and heads // kv_heads <= MAX_QUERIES_PER_KEY_HEAD and head_dim <= MAX_HEAD_DIM)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                 length: int, scale: float) -> torch.Tensor:
        """`q [B, H, d]` float32; `keys` float32 and `values` bf16 or float32 `[B, KV, capacity, d]`
        (all contiguous, on the CPU); attends over slots `< length`, where `allowed [B, >= length]`
        (bool, slots contiguous) is True, or all of them if None. Returns `[B, H, d]` in the
        values' dtype."""
        B, H, d = q.shape
        KV, cap = keys.shape[1], keys.shape[2]
        if not (self.supports(H, KV, d, values) and q.device == keys.device == values.device
                and q.dtype == keys.dtype == torch.float32 and q.is_contiguous() and keys.is_contiguous()
                and values.is_contiguous() and keys.shape == values.shape and keys.shape[0] == B
                and keys.shape[3] == d and 0 < length <= cap):
            raise ValueError("decode_attention: unexpected shapes, dtypes or layouts")
        if allowed is not None and (allowed.dtype != torch.bool or allowed.stride(1) != 1 or allowed.shape[0] != B):
            raise ValueError("decode_attention: `allowed` must be bool [B, slots] with contiguous slots")
        out = torch.empty((B, H, d), dtype=values.dtype)
        mask, stride = (allowed.data_ptr(), allowed.stride(0)) if allowed is not None else (None, 0)
        args = (q.data_ptr(), keys.data_ptr(), values.data_ptr(), values.element_size(), mask, stride, out.data_ptr(),
                H, KV, cap, length, d, scale)
        threads = min(torch.get_num_threads(), B)
        if threads <= 1:
            codes = [self._fn(*args, 0, B)]
        else:  # ctypes lets go of the GIL during the call: rows split over threads
            if self._pool_size != threads:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool, self._pool_size = ThreadPoolExecutor(threads), threads
            bounds = [B * t // threads for t in range(threads + 1)]
            codes = list(self._pool.map(lambda t: self._fn(*args, bounds[t], bounds[t + 1]), range(threads)))
        if any(codes):
            raise RuntimeError(f"decode_attention kernel failed (code {max(codes)})")
        return out


def _agrees(kernel: DecodeAttention) -> bool:
    """The built kernel against `explicit_attention` on small problems through both of its code paths."""
    g = torch.Generator().manual_seed(0)
    for (d, heads, kv), dtype in itertools.product(((64, 6, 2), (24, 4, 4)), VALUE_DTYPES):
        keys = torch.randn(3, kv, 9, d, generator=g)
        values = torch.randn(3, kv, 9, d, generator=g).to(dtype)
        q = torch.randn(3, heads, d, generator=g)
        allowed = torch.rand(3, 9, generator=g) > 0.3
        allowed[:, 6] = True
        got = kernel(q, keys, values, allowed, 7, 0.3).float()
        want = explicit_attention(q[:, :, None], keys[:, :, :7], values[:, :, :7], allowed[:, None, None, :7], 0.3)
        if not torch.allclose(got, want.float()[:, :, 0], atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=2e-2):
            return False
    return True


@functools.cache
def decode_attention_kernel() -> DecodeAttention | None:
    """The compiled kernel, or None where it cannot be built, does not agree, or is switched off."""
    if os.environ.get("THINKLING_C_KERNELS", "1") == "0":
        return None
    library = _build()
    if library is None:
        return None
    try:
        kernel = DecodeAttention(library)
        return kernel if _agrees(kernel) else None
    except (OSError, AttributeError, RuntimeError, ValueError):
        return None
