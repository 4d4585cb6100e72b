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
        """Time a block (seconds) and record the peak RSS while it ran."""
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            box = {}
            yield box
            box.setdefault("seconds", time.perf_counter() - t0)
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


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} torch={torch.__version__} "
            f"python={platform.python_version()} loadavg(1/5/15 min)={load}")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pasteable into docs/performance.md)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def header(title: str, argv: list[str]):
    print(f"# {title}")
    print(f"command: python {' '.join(argv)}")
    print(f"machine: {machine()}")


def footer(rec: Recorder):
    peaks = ", ".join(f"{side} {mb:.0f} MiB" for side, mb in rec.peak.items())
    print(f"peak RSS while each side ran (process total): {peaks}; process max RSS {max_rss_mb():.0f} MiB")
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
