"""One decode step's attention (one query per row over a KV cache) at the shapes of the tiny demo
model and of SmolLM2-135M: the rollout engine's own (the C kernel of `models/cpu_kernels.py`;
`hf_attention.explicit_attention` without a C compiler) against the paths they replaced.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --repeats 15 --layers 1

Sides (all in this process, their order rotated every repeat):
  sdpa      F.scaled_dot_product_attention with enable_gqa (transformers' path)
  folded    one SDPA call with the query heads of each key head folded into the query axis
            (the engine's path until keys were cached in float32)
  matmul    q @ Kᵀ and @ V as plain matmuls in the cache dtype, softmax in float32
  explicit  `hf_attention.explicit_attention`: float32 queries and keys (cached in float32),
            float32 scores and softmax, probabilities rounded to the values' dtype for @ V
  c         the same computation in C (`cpu_kernels.decode_attention_kernel`), reading the
            slots straight from the whole preallocated cache
In bf16 the first three read bf16 queries and keys (as the engine did before); `explicit` and `c`
read them unrounded. Each row of the output is the median CPU time of one call, its min–max over
repeats, its speed relative to `folded`, and its mean |error| against float32 attention over the
unrounded inputs. Every call reads the next of `--layers` caches (default 30, SmolLM2's layer
count), so that, as in a real decode step, the cache comes from memory rather than a CPU cache;
`--layers 1` keeps it warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import header, table, time_calls

from thinkling.models.cpu_kernels import decode_attention_kernel
from thinkling.models.hf_attention import explicit_attention

CASES = [  # name, rows B, heads H, kv heads, head dim, filled cache slots L, dtype
    ("tiny demo GRPO batch", 128, 4, 4, 24, 150, torch.float32),
    ("tiny demo probe batch", 208, 4, 4, 24, 170, torch.float32),
    ("SmolLM2 bf16, 60 keys", 64, 9, 3, 64, 60, torch.bfloat16),
    ("SmolLM2 bf16, 150 keys", 64, 9, 3, 64, 150, torch.bfloat16),
    ("SmolLM2 bf16, 250 keys", 64, 9, 3, 64, 250, torch.bfloat16),
    ("SmolLM2 fp32, 150 keys", 64, 9, 3, 64, 150, torch.float32),
]


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def folded(q, k, v, scale):
    B, H, _, d = q.shape
    KV = k.shape[1]
    return F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, d), k, v, scale=scale).reshape(B, H, 1, d)


def matmul(q, k, v, scale):
    B, H, _, d = q.shape
    KV = k.shape[1]
    s = torch.matmul(q.view(B, KV, H // KV, d), k.transpose(-1, -2)).float() * scale
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v).view(B, H, 1, d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--calls", type=int, default=10, help="calls per timing")
    ap.add_argument("--layers", type=int, default=30, help="caches cycled through, one per call (1: a warm cache)")
    args = ap.parse_args(argv)
    kernel = decode_attention_kernel()
    if kernel is None:
        print("the C kernel is not available here (no C compiler?): its rows are left out")
    torch.set_num_threads(1)
    header("decode attention: the engine's vs SDPA and matmuls", ["benchmarks/decode_attention.py", *sys.argv[1:]])
    rows = []
    for name, B, H, KV, d, L, dtype in CASES:
        g = torch.Generator().manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g)
        cap, q32 = L + 40, rnd(B, H, 1, d)
        # preallocated caches as in the engines, one per layer; views of their filled slots
        k32s, v32s = [rnd(B, KV, cap, d) for _ in range(args.layers)], [rnd(B, KV, cap, d) for _ in range(args.layers)]
        ks, vs = [k.to(dtype) for k in k32s], [v.to(dtype) for v in v32s]
        q, scale = q32.to(dtype), d**-0.5
        layer = iter(range(1 << 62))

        def next_layer():
            i = next(layer) % args.layers
            return k32s[i], v32s[i], ks[i], vs[i]

        def run(side, k32, v32, k, v):
            if side == "c":
                return kernel(q32.reshape(B, H, d), k32, v, None, L, scale)
            k32, v32, k, v = k32[:, :, :L], v32[:, :, :L], k[:, :, :L], v[:, :, :L]
            if side == "explicit":
                return explicit_attention(q32, k32, v, None, scale)
            return {"sdpa": sdpa, "folded": folded, "matmul": matmul}[side](q, k, v, scale)

        names = ["sdpa", "folded", "matmul", "explicit"] + (["c"] if kernel else [])
        sides = {side: (lambda side=side: run(side, *next_layer())) for side in names}
        ref = folded(q32, k32s[0][:, :, :L], v32s[0][:, :, :L], scale).reshape(B, H, d)
        err = {side: (run(side, k32s[0], v32s[0], ks[0], vs[0]).float().reshape(B, H, d) - ref).abs().mean().item()
               for side in names}
        times = {s: [t * 1e6 for t in ts]
                 for s, ts in time_calls(sides, args.repeats, args.calls, clock=time.process_time).items()}
        base = statistics.median(times["folded"])
        for s in sides:
            med = statistics.median(times[s])
            rows.append([name, s, f"{med:.0f}", f"{min(times[s]):.0f}–{max(times[s]):.0f}", f"{base / med:.2f}x",
                         f"{err[s]:.1e}"])
        print(f"  {name}: " + ", ".join(f"{s} {statistics.median(t):.0f} us" for s, t in times.items()), flush=True)
    print()
    print(table(["case", "side", "CPU µs / call (median)", "min–max", "speed vs folded", "mean |error| vs float32"],
                rows))
    import os

    print(f"layers cycled: {args.layers}; load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
