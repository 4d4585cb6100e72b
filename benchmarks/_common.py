"""Shared helpers of the benchmark scripts: timing two sides fairly on a noisy machine.

The machine these run on is shared, so a single timing means little. Every
script runs the sides it compares in the same process, alternating them (and
rotating which goes first) over several repeats, and reports medians, the ratio
of medians, the load average before and after, and the peak resident memory
seen while each side ran.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import threading
import time
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


class PeakRSS:
    """Polls this process's resident memory in a thread; `peak` is the maximum seen (MiB).

    Polling every few ms misses spikes shorter than that, so it slightly
    underestimates; it is the same for both sides.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


class Recorder:
    """Collects repeated measurements per (row, side) and the peak memory of each side."""

    def __init__(self):
        self.values: dict[tuple[str, str], dict[str, list[float]]] = {}
        self.peak: dict[str, float] = {}

    @contextmanager
    def measure(self, side: str):
        """Time a block (wall "seconds" and this process's "cpu_seconds") and record the peak RSS
        while it ran. With one torch thread, CPU seconds are the work done: other jobs on a
        shared machine stretch the wall time (preemption) far more than the CPU time."""
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            box = {}
            yield box
            box.setdefault("seconds", time.perf_counter() - t0)
            box.setdefault("cpu_seconds", time.process_time() - c0)
        self.peak[side] = max(self.peak.get(side, 0.0), mem.peak)

    def add(self, row: str, side: str, metric: str, value: float):
        self.values.setdefault((row, side), {}).setdefault(metric, []).append(value)

    def median(self, row: str, side: str, metric: str) -> float:
        return statistics.median(self.values[(row, side)][metric])

    def spread(self, row: str, side: str, metric: str) -> str:
        v = self.values[(row, side)][metric]
        fmt = lambda x: f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return f"{fmt(min(v))}–{fmt(max(v))}" if len(v) > 1 else ""


def release_memory():
    """Hand freed memory back to the OS between sides, so one side's peak does not
    stay resident under the next (glibc keeps freed arenas otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rotate(sides: list, rep: int) -> list:
    """The sides in a different order every repeat, so neither always runs first."""
    k = rep % len(sides)
    return sides[k:] + sides[:k]


def time_calls(sides: dict, repeats: int, calls: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each side's no-argument function: `calls` calls per timing, `repeats`
    timings, the sides' order rotating every repeat (`clock`: wall by default, `time.process_time`
    for CPU time)."""
    times = {s: [] for s in sides}
    for rep in range(repeats):
        for s in rotate(list(sides), rep):
            t0 = clock()
            for _ in range(calls):
                sides[s]()
            times[s].append((clock() - t0) / calls)
    return times


def cpu() -> str:
    """The CPU model and the matrix extensions torch's bf16 kernels can use."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown cpu"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    ext = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} [{' '.join(ext) or 'no avx512'}]"


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu()} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} torch={torch.__version__} "
            f"python={platform.python_version()} loadavg(1/5/15 min)={load}")


def gemm_rate(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype = torch.bfloat16, repeats: int = 7,
              min_seconds: float = 0.05) -> tuple[float, float]:
    """(CPU seconds, FLOP per CPU second) of one pass of `x [rows, K] @ W[K, N]` over every (K, N) of
    `shapes`, with the rollout engine's own linear layer (oneDNN-prepacked for bf16): the GEMM-only
    cost of one forward step at that batch on this machine. CPU time (one thread), so that other
    jobs' preemption does not count; median of `repeats` passes."""
    from thinkling.models.hf_engine import _Linear  # the engine's kernel, so the ceiling is the one it can reach

    g = torch.Generator().manual_seed(0)
    layers = [(_Linear(torch.randn(n, k, generator=g).to(dtype), None, pack=True), torch.randn(rows, k, generator=g).to(dtype))
              for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)

    def passes(n: int) -> float:
        """CPU seconds of `n` passes over every layer."""
        t0 = time.process_time()
        for _ in range(n):
            for lin, x in layers:
                lin(x)
        return time.process_time() - t0

    passes(1)  # warm-up
    inner = 1
    while passes(inner) < min_seconds:  # enough inner loops that one timing takes min_seconds (timer and load noise)
        inner *= 2
    sec = statistics.median(passes(inner) / inner for _ in range(repeats))
    return sec, flops / sec


def llama_linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every matmul of one decode step of a Llama-family model (per layer q, k, v, o,
    gate, up, down; then the LM head)."""
    d, heads = config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    per_layer = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d),
                 (d, config.intermediate_size), (d, config.intermediate_size), (config.intermediate_size, d)]
    return per_layer * config.num_hidden_layers + [(d, config.vocab_size)]


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pasteable into docs/performance.md)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def decode_args(ap, batches: str, new_tokens: int) -> None:
    """The arguments every decode benchmark takes (rollout.py, compiled_decode.py)."""
    ap.add_argument("--model", default="smollm2-135m", help="alias or path of a Llama-family model")
    ap.add_argument("--batches", default=batches)
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")


def time_sides(rec: "Recorder", sides: dict, prompts: list, batch: int, new_tokens: int, rep: int, params) -> None:
    """One repeat of every decode side at `batch` rows, in an order that rotates with `rep`: tokens
    per wall and per CPU second go to `rec` under (batch, side) and are printed as they come."""
    for side in rotate(list(sides), rep):
        with rec.measure(side) as m:
            out = sides[side](prompts[:batch], params)
            if isinstance(out, dict):  # an external engine that times itself (seconds, cpu_seconds)
                m.update(out)
        release_memory()
        assert isinstance(out, dict) or all(len(o) == new_tokens for o in out), "eos was not suppressed"
        rec.add(str(batch), side, "tok/s", batch * new_tokens / m["seconds"])
        rec.add(str(batch), side, "tok/cpu-s", batch * new_tokens / m["cpu_seconds"])
        last = {metric: v[-1] for metric, v in rec.values[(str(batch), side)].items()}
        print(f"  batch {batch:3d} rep {rep} {side:21s} {last['tok/s']:7.1f} tok/s "
              f"({last['tok/cpu-s']:7.1f} per CPU second)", flush=True)


def header(title: str, argv: list[str]):
    print(f"# {title}")
    print(f"command: python {' '.join(argv)}")
    print(f"machine: {machine()}")


def footer(rec: Recorder):
    peaks = ", ".join(f"{side} {mb:.0f} MiB" for side, mb in rec.peak.items())
    print(f"peak RSS while each side ran (process total): {peaks}; process max RSS {max_rss_mb():.0f} MiB")
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
