"""The tiny model's sampler with shared prompt keys vs a per-row copy of the prompt's cache.

    python benchmarks/tiny_decode.py --init runs/demo/sft/final
    python benchmarks/tiny_decode.py --repeats 6

Two batches of the demo's RL setting (chain task, 8-step problems, 80 new tokens, temperature 1):
  grpo    16 prompts x G=8
  probes  26 BREAD probes x G=8 (prompt + the first k expert steps, k = 1..7)
  probes-5  5 probes x G=8 (a late binary-search round: few groups left)
Sides, alternating in this process (their order rotated every repeat):
  shared  `_SharedPrefixState`: each prompt's keys cached and read once for its G rows
  copied  `_TinyDecodeState`: the prompt's cache copied to each of its rows (before)
Wall and CPU seconds (one thread) per batch; sampled tokens are checked to be the same.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import Recorder, footer, header, rotate, table
from bread_overhead import checkpoint

from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyPolicy
from thinkling.rollout.groups import branch_prefix
from thinkling.rollout.prompts import prompt_ids
from thinkling.tasks import get_task


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default=None, help="tiny SFT checkpoint (default: as bread_overhead.py)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    header("tiny sampler: shared prompt keys vs copied cache", ["benchmarks/tiny_decode.py", *sys.argv[1:]])
    policy = TinyPolicy.load(checkpoint(args.init))
    problems = get_task("chain").problems(64, seed=2, difficulty=[8])
    batches = {
        "grpo": [prompt_ids(policy, p, None) for p in problems[:16] for _ in range(args.group)],
        "probes": [branch_prefix(policy, p, None, 1 + i % 7)[0] for i, p in enumerate(problems[16:42])
                   for _ in range(args.group)],
        "probes-5": [branch_prefix(policy, p, None, 1 + i % 7)[0] for i, p in enumerate(problems[42:47])
                     for _ in range(args.group)],
    }
    params = SamplingParams(max_new_tokens=80, temperature=1.0, seed=1)
    print(f"rows: grpo {len(batches['grpo'])}, probes {len(batches['probes'])}; repeats={args.repeats}\n")
    policy.sample(batches["grpo"][:16], params)
    rec, outputs = Recorder(), {}
    for rep in range(args.repeats):
        for side in rotate(["shared", "copied"], rep):
            policy.shared_prefix_decode = side == "shared"
            for name, batch in batches.items():
                with rec.measure(side) as m:
                    out = policy.sample(batch, params)
                outputs[(name, side)] = [s.ids for s in out]
                rec.add(name, side, "wall", m["seconds"])
                rec.add(name, side, "cpu", m["cpu_seconds"])
                print(f"  rep {rep} {side:6s} {name:6s} {m['seconds']:.2f} s, CPU {m['cpu_seconds']:.2f} s", flush=True)
    rows = []
    for name in batches:
        same = sum(a == b for a, b in zip(outputs[(name, "shared")], outputs[(name, "copied")]))
        for side in ("copied", "shared"):
            rows.append([name, side, f"{rec.median(name, side, 'wall'):.2f}", rec.spread(name, side, "wall"),
                         f"{rec.median(name, side, 'cpu'):.2f}", rec.spread(name, side, "cpu"),
                         f"{rec.median(name, 'copied', 'cpu') / rec.median(name, side, 'cpu'):.2f}x",
                         f"{same}/{len(batches[name])}"])
    print()
    print(table(["batch", "side", "wall s (median)", "min–max", "CPU s (median)", "min–max", "speed vs copied (CPU)",
                 "same samples"], rows))
    footer(rec)


if __name__ == "__main__":
    main()
