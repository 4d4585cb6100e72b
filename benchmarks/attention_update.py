"""The RL update's attention, forward + backward under bf16 autocast: transformers' SDPA path vs
thinkling's explicit attention (`models/hf_attention.py`), at SmolLM2-135M's update shapes.

    python benchmarks/attention_update.py
    python benchmarks/attention_update.py --repeats 15

Sides (both called through transformers' attention-function signature, as a Llama layer calls
them; their order rotated every repeat, one torch thread, CPU time):
  sdpa      transformers' `sdpa_attention_forward`: key heads copied for their query heads, SDPA
  explicit  `hf_attention.attention_forward`: heads folded, float32 scores, two batched matmuls
Inputs as a Llama layer hands them over under CPU autocast: float32 rotated queries and keys,
bf16 values. Each row: median CPU ms of one forward + backward, min–max, speed vs sdpa, matmul
GFLOP per CPU second and its share of the bf16 GEMM peak measured in the same run, and the mean
relative error of the output (queries that see a key) and of the three gradients against float32
SDPA, the upstream gradient zero at padding queries as in training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
from _common import gemm_rate, header, table, time_calls
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from thinkling.models.hf_attention import attention_forward

CASES = [  # name, rows, queries T, prefix keys P (the mask covers P + T keys), left padding of row 0
    ("rows on a shared prompt (rl.share_prompt)", 16, 64, 36, 6),
    ("whole rows (prompt + completion)", 16, 100, 0, 6),
    ("the prompts' own pass", 4, 36, 0, 6),
]
H, KV, D = 9, 3, 64  # SmolLM2-135M


class _Layer(torch.nn.Module):
    num_key_value_groups = H // KV
    is_causal = True


def _case(B, T, P, pad):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(*shape, generator=g) for shape in
                     ((B, H, T, D), (B, KV, P + T, D), (B, KV, P + T, D), (B, T, H, D)))
    mask = torch.ones(B, 1, T, P + T, dtype=torch.bool).tril(P)
    mask[0, :, :, :pad] = False
    # A query that sees no key is a padding position: training's loss gives it no gradient.
    grad = grad * mask.any(-1).transpose(1, 2)[..., None]
    return q, k, v, grad, mask


def _run(fn, q, k, v, grad, mask, *, exact=False):
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(),
              (v if exact else v.bfloat16()).clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not exact):
        out, _ = fn(_Layer(), *leaves, mask, scaling=D**-0.5)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--calls", type=int, default=5, help="forward + backward passes per timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    header("RL update attention: transformers SDPA vs explicit", ["benchmarks/attention_update.py", *sys.argv[1:]])
    _, peak = gemm_rate([(576, 1536)], 1024)  # the bf16 GEMM probe of the other benchmarks
    print(f"bf16 GEMM peak (1024 x 576 x 1536, one thread): {peak / 1e9:.0f} GFLOP per CPU-s")
    sides = {"sdpa": sdpa_attention_forward, "explicit": attention_forward}
    rows = []
    for name, B, T, P, pad in CASES:
        inputs = _case(B, T, P, pad)
        exact = _run(sdpa_attention_forward, *inputs, exact=True)
        real = inputs[-1].any(-1)[:, 0]  # [B, T]
        err = {}
        for s, fn in sides.items():
            got = _run(fn, *inputs)
            got[0], exact_out = got[0][real], exact[0][real]  # outputs of queries that see a key
            err[s] = " / ".join(f"{float((a.float() - b).abs().mean() / b.abs().mean()):.1e}"
                                for a, b in zip(got, [exact_out, *exact[1:]]))
        times = time_calls({s: partial(_run, fn, *inputs) for s, fn in sides.items()}, args.repeats, args.calls,
                           clock=time.process_time)
        times = {s: [t * 1e3 for t in ts] for s, ts in times.items()}
        flops = 12 * B * H * T * (P + T) * D  # two products forward, four backward
        base = statistics.median(times["sdpa"])
        for s in sides:
            med = statistics.median(times[s])
            rate = flops / med / 1e6
            rows.append([name, s, f"{med:.1f}", f"{min(times[s]):.1f}–{max(times[s]):.1f}", f"{base / med:.2f}x",
                         f"{rate:.0f}", f"{rate * 1e9 / peak:.0%}", err[s]])
        print(f"  {name}: " + ", ".join(f"{s} {statistics.median(t):.1f} ms" for s, t in times.items()), flush=True)
    print()
    print(table(["case", "side", "CPU ms fwd+bwd (median)", "min–max", "speed vs sdpa", "GFLOP/CPU-s",
                 "of bf16 peak", "mean rel. error out / dq / dk / dv"], rows))
    import os

    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
