"""One decode step's attention (one query per row over a KV cache): SDPA vs plain matmuls vs
shared-prefix attention, at the shapes of the tiny demo model and of SmolLM2-135M.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --repeats 15

Sides (all in this process, their order rotated every repeat):
  sdpa      F.scaled_dot_product_attention over each row's cache (what the engines ran)
  matmul    q @ Kᵀ, softmax in float32, @ V (grouped-query heads folded into rows)
  shared    attention.shared_prefix_attention: the G rows of a prompt read its keys once
            (the prompt's cache is not copied per row), then their own keys
Each row of the output is the median time of one call, its min–max over repeats, its
ratio to sdpa and the largest difference from sdpa's output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import header, rotate, table

from thinkling.models.attention import PrefixGrid, shared_prefix_attention

CASES = [  # name, rows B, heads H, kv heads, head dim, prompt tokens P, own tokens S, rows per prompt G, dtype
    ("tiny demo GRPO (16 x G=8)", 128, 4, 4, 24, 110, 40, 8, torch.float32),
    ("tiny demo probes (26 x G=8)", 208, 4, 4, 24, 130, 40, 8, torch.float32),
    ("SmolLM2 bf16, distinct prompts", 64, 9, 3, 64, 100, 100, 1, torch.bfloat16),
    ("SmolLM2 bf16, 8 x G=8", 64, 9, 3, 64, 100, 100, 8, torch.bfloat16),
    ("SmolLM2 fp32, distinct prompts", 64, 9, 3, 64, 100, 100, 1, torch.float32),
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
    header("decode attention: SDPA vs matmul vs shared-prefix", ["benchmarks/decode_attention.py", *sys.argv[1:]])
    rows = []
    for name, B, H, KV, d, P, S, G, dtype in CASES:
        g = torch.Generator().manual_seed(0)
        N = B // G
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
        prefix_k, prefix_v = rnd(N, KV, P, d), rnd(N, KV, P, d)
        own_k, own_v = rnd(B, KV, P + S + 8, d)[:, :, :S], rnd(B, KV, P + S + 8, d)[:, :, :S]
        q = rnd(B, H, 1, d)
        owner = torch.arange(N).repeat_interleave(G)
        # the per-row cache the other sides read: prompt keys copied to every row, then its own (a view of
        # a preallocated cache, as in the engines)
        cache_k, cache_v = rnd(B, KV, P + S + 8, d), rnd(B, KV, P + S + 8, d)
        cache_k[:, :, :P], cache_k[:, :, P : P + S] = prefix_k[owner], own_k
        cache_v[:, :, :P], cache_v[:, :, P : P + S] = prefix_v[owner], own_v
        k, v = cache_k[:, :, : P + S], cache_v[:, :, : P + S]
        grid, bias = PrefixGrid.of(owner, N), torch.zeros(N, 1, 1, P, dtype=dtype)
        scale = d**-0.5
        sides = {
            "sdpa": lambda: sdpa(q, k, v, scale),
            "matmul": lambda: matmul(q, k, v, scale),
            "shared": lambda: shared_prefix_attention(q, prefix_k, prefix_v, bias, grid, own_k, own_v, scale),
        }
        ref = sides["sdpa"]().float()
        err = {s: (f().float() - ref).abs().max().item() for s, f in sides.items()}
        times = {s: [] for s in sides}
        for rep in range(args.repeats):
            for s in rotate(list(sides), rep):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    sides[s]()
                times[s].append((time.perf_counter() - t0) / args.calls * 1e6)
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
