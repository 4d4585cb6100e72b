"""One decode step's attention (one query per row over a KV cache): SDPA vs plain matmuls,
at the shapes of the tiny demo model and of SmolLM2-135M.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --repeats 15

Sides (all in this process, their order rotated every repeat):
  sdpa      F.scaled_dot_product_attention over each row's cache (what the engines ran)
  matmul    q @ Kᵀ, softmax in float32, @ V (grouped-query heads folded into rows)
(A third side, attention that reads each prompt's keys once for its G rows, was measured at
commit c300d0e and dropped; docs/performance.md has the numbers.)
Each row of the output is the median time of one call, its min–max over repeats, its
ratio to sdpa and the largest difference from sdpa's output.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from _common import header, table, time_calls

CASES = [  # name, rows B, heads H, kv heads, head dim, filled cache slots L, dtype
    ("tiny demo GRPO batch", 128, 4, 4, 24, 150, torch.float32),
    ("tiny demo probe batch", 208, 4, 4, 24, 170, torch.float32),
    ("SmolLM2 bf16", 64, 9, 3, 64, 200, torch.bfloat16),
    ("SmolLM2 fp32", 64, 9, 3, 64, 200, torch.float32),
]


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def matmul(q, k, v, scale):
    B, H, _, d = q.shape
    KV = k.shape[1]
    s = torch.matmul(q.view(B, KV, H // KV, d), k.transpose(-1, -2)).float() * scale
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v).view(B, H, 1, d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--calls", type=int, default=10, help="calls per timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    header("decode attention: SDPA vs matmul", ["benchmarks/decode_attention.py", *sys.argv[1:]])
    rows = []
    for name, B, H, KV, d, L, dtype in CASES:
        g = torch.Generator().manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
        # a view of the filled slots of a preallocated cache, as in the engines
        k, v = rnd(B, KV, L + 40, d)[:, :, :L], rnd(B, KV, L + 40, d)[:, :, :L]
        q = rnd(B, H, 1, d)
        scale = d**-0.5
        sides = {"sdpa": lambda: sdpa(q, k, v, scale), "matmul": lambda: matmul(q, k, v, scale)}
        ref = sides["sdpa"]().float()
        err = {s: (f().float() - ref).abs().max().item() for s, f in sides.items()}
        times = {s: [t * 1e6 for t in ts] for s, ts in time_calls(sides, args.repeats, args.calls).items()}
        base = statistics.median(times["sdpa"])
        for s in sides:
            med = statistics.median(times[s])
            rows.append([name, s, f"{med:.0f}", f"{min(times[s]):.0f}–{max(times[s]):.0f}", f"{base / med:.2f}x",
                         f"{err[s]:.1e}"])
        print(f"  {name}: " + ", ".join(f"{s} {statistics.median(t):.0f} us" for s, t in times.items()), flush=True)
    print()
    print(table(["case", "side", "µs / call (median)", "min–max", "speed vs sdpa", "max |Δ| vs sdpa"], rows))
    import os

    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
