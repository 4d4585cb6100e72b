"""One decode step's attention (one query per row over a KV cache) at the shapes of the tiny demo
model and of SmolLM2-135M: the rollout engine's own (`hf_attention.explicit_attention`) against
the paths it replaced.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --repeats 15

Sides (all in this process, their order rotated every repeat):
  sdpa      F.scaled_dot_product_attention with enable_gqa (transformers' path)
  folded    one SDPA call with the query heads of each key head folded into the query axis
            (the engine's path until keys were cached in float32)
  matmul    q @ Kᵀ and @ V as plain matmuls in the cache dtype, softmax in float32
  engine    `hf_attention.explicit_attention`: float32 queries and keys (cached in float32),
            float32 scores and softmax, probabilities rounded to the values' dtype for @ V
In bf16 the first three read bf16 queries and keys (as the engine did before); `engine` reads
them unrounded. Each row of the output is the median CPU time of one call, its min–max over
repeats, its speed relative to `folded`, and its mean |error| against float32 attention over the
unrounded inputs. A microbenchmark: the cache stays warm between calls, which a real decode step
(30 layers' weights streamed in between) does not allow, so end-to-end gains are smaller.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import header, table, time_calls

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
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    header("decode attention: the engine's vs SDPA and matmuls", ["benchmarks/decode_attention.py", *sys.argv[1:]])
    rows = []
    for name, B, H, KV, d, L, dtype in CASES:
        g = torch.Generator().manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g)
        # views of the filled slots of preallocated caches, as in the engines
        k_cache, v_cache = rnd(B, KV, L + 40, d), rnd(B, KV, L + 40, d)
        k32, v32, q32 = k_cache[:, :, :L], v_cache[:, :, :L], rnd(B, H, 1, d)
        q, k, v = q32.to(dtype), k_cache.to(dtype)[:, :, :L], v_cache.to(dtype)[:, :, :L]
        scale = d**-0.5
        sides = {"sdpa": lambda: sdpa(q, k, v, scale), "folded": lambda: folded(q, k, v, scale),
                 "matmul": lambda: matmul(q, k, v, scale),
                 "engine": lambda: explicit_attention(q32, k32, v, None, scale)}
        ref = folded(q32, k32, v32, scale).reshape(B, H, d)
        err = {s: (f().float().reshape(B, H, d) - ref).abs().mean().item() for s, f in sides.items()}
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

    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
