"""The rollout engine's C decode attention (`models/cpu_kernels.py`): same numbers as PyTorch's."""

import pytest
import torch
from test_engine import GREEDY, PROMPTS, engine, make_model

from thinkling.models import cpu_kernels
from thinkling.models.base import SamplingParams
from thinkling.models.hf_attention import explicit_attention

KERNEL = cpu_kernels.decode_attention_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler here")


def problem(B, H, KV, cap, d, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, d, generator=g) * 2
    keys = torch.randn(B, KV, cap, d, generator=g)
    values = torch.randn(B, KV, cap, d, generator=g).to(dtype)
    allowed = torch.rand(B, cap, generator=g) > 0.3
    allowed[0, :4] = False  # a left-padded row
    allowed[-1] = False  # a row with nothing allowed: equal weights, as in PyTorch
    return q, keys, values, allowed


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,H,KV", [(64, 9, 3), (128, 4, 4), (16, 6, 2), (96, 8, 2)])
def test_kernel_equals_explicit_attention(d, H, KV, dtype):
    """Every code path (d a multiple of 64 is vectorised by hand, others by the compiler; bf16 and
    float32 values), grouped heads, a padding mask, slots beyond the length ignored: equal to
    PyTorch but for the order of float32 sums, which moves a bf16 rounding now and then."""
    B, cap, length = 5, 23, 17
    q, keys, values, allowed = problem(B, H, KV, cap, d, dtype=dtype)
    keys[:, :, length:] = float("nan")  # never read
    for mask in (allowed, None):
        got = KERNEL(q, keys, values, mask, length, 0.3)
        view = None if mask is None else mask[:, None, None, :length]
        want = explicit_attention(q[:, :, None], keys[:, :, :length], values[:, :, :length], view, 0.3)[:, :, 0]
        assert got.dtype == want.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(got, want, atol=1e-5)
        else:
            assert torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2)
            assert (got.float() - want.float()).abs().mean() < 1e-4


@needs_kernel
def test_kernel_splits_rows_over_threads_with_the_same_result():
    q, keys, values, allowed = problem(7, 9, 3, 30, 64, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNEL(q, keys, values, allowed, 30, 0.125)
        torch.set_num_threads(3)
        three = KERNEL(q, keys, values, allowed, 30, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


@needs_kernel
def test_kernel_refuses_layouts_it_cannot_read():
    q, keys, values, allowed = problem(2, 4, 2, 8, 64)
    with pytest.raises(ValueError):
        KERNEL(q.transpose(0, 1).contiguous().transpose(0, 1), keys, values, allowed, 8, 0.1)
    with pytest.raises(ValueError):
        KERNEL(q, keys, values.half(), allowed, 8, 0.1)
    with pytest.raises(ValueError):
        KERNEL(q, keys, values, allowed, 9, 0.1)  # longer than the cache
    assert KERNEL.supports(4, 2, 64, values) and not KERNEL.supports(4, 2, 64, values.half())
    assert not KERNEL.supports(34, 2, 64, values) and not KERNEL.supports(4, 2, 512, values)  # beyond its limits: the engine uses PyTorch
    with pytest.raises(ValueError):
        KERNEL(torch.randn(2, 34, 64), torch.randn(2, 2, 8, 64), torch.randn(2, 2, 8, 64), None, 8, 0.1)


@needs_kernel
def test_fp32_engine_with_the_kernel_is_still_exact():
    """In float32 the kernel changes only the order of sums: the same tokens, log-probs to ~1e-6."""
    model = make_model(seed=8)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    a = engine(model).sample(PROMPTS, params)
    b = engine(model, c_kernels=False).sample(PROMPTS, params)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) < 1e-5


@needs_kernel
def test_bf16_engine_samples_the_same_with_and_without_the_kernel():
    model = make_model(seed=8)
    with_c = engine(model, dtype=torch.bfloat16).generate(PROMPTS, GREEDY)
    without = engine(model, dtype=torch.bfloat16, c_kernels=False).generate(PROMPTS, GREEDY)
    assert with_c == without
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    a = engine(model, dtype=torch.bfloat16).sample(PROMPTS, params)
    b = engine(model, dtype=torch.bfloat16, c_kernels=False).sample(PROMPTS, params)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) < 1e-2


def test_no_compiler_or_switched_off_means_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("THINKLING_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert cpu_kernels._build() is None
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
    monkeypatch.setenv("THINKLING_C_KERNELS", "0")
    assert cpu_kernels.decode_attention_kernel.__wrapped__() is None
