"""What BREAD's probes add to an RL step, with and without prefix reuse.

    python benchmarks/bread_overhead.py                 # the light-SFT chain setting
    python benchmarks/bread_overhead.py --steps 6 --init runs/experiments/light-sft/final
    python benchmarks/bread_overhead.py --init runs/demo/sft/final --difficulty 8 --max-new-tokens 80  # the demo's

The setting: a tiny character transformer after a light SFT (`--init`, default
runs/experiments/light-sft/final; when missing, recipes/experiments/light-sft.yaml
is trained once into ~/.cache/thinkling/bench/), GRPO on 6-step chain
problems, 16 prompts x G=8, 64 new tokens. Four sides train their own copy from
the same checkpoint over the same steps (same seeds), alternating every step:

  grpo / bread                   prefix reuse on: each distinct prompt (or prompt +
                                 anchor) is prefilled once for its G copies
  grpo-no-reuse / bread-no-reuse every row prefilled separately

The BREAD overhead is the extra step time of `bread` over `grpo`, as a share of
the `grpo` step, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import Recorder, footer, header, rotate, table

from thinkling.config import BreadConfig, RLConfig, load_recipe
from thinkling.models.tiny import TinyPolicy
from thinkling.tasks import get_task
from thinkling.train.common import make_optimizer
from thinkling.train.rl import RLTrainer, resolve_knobs

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "thinkling" / "bench" / "light-sft"


class NoReuse:
    """A policy whose sampler prefills every row, even the G copies of one prompt."""

    def __init__(self, policy):
        self._policy = policy

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def sample(self, prompts, params):
        return self._policy.sample(prompts, params, share_prompts=False)


def checkpoint(init: str | None) -> str:
    if init:
        return init
    light = ROOT / "runs" / "experiments" / "light-sft" / "final"
    if (light / "policy.json").exists():
        return str(light)
    if not (CACHE / "final" / "policy.json").exists():
        from thinkling import jobs

        print(f"no SFT checkpoint: training the light SFT once into {CACHE} (a few minutes)")
        jobs.run_sft(load_recipe(ROOT / "recipes" / "experiments" / "light-sft.yaml", [f"output_dir={CACHE}"]))
    return str(CACHE / "final")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default=None, help="tiny SFT checkpoint (default: runs/experiments/light-sft, else trained once)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--difficulty", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="80 for 8-step problems (the demo's setting)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("BREAD probe overhead per RL step", ["benchmarks/bread_overhead.py", *sys.argv[1:]])
    init = checkpoint(args.init)
    task = get_task("chain")
    problems = task.problems(2000, seed=2, difficulty=[args.difficulty])
    print(f"init={init} task=chain difficulty={args.difficulty} prompts={args.prompts} G={args.group} "
          f"max_new_tokens={args.max_new_tokens} steps={args.steps} (+{args.warmup} warm-up)\n")

    def trainer(bread: bool, reuse: bool) -> RLTrainer:
        policy = TinyPolicy.load(init)
        rl = RLConfig(algorithm="grpo", prompts_per_step=args.prompts, group_size=args.group, lr=1e-4,
                      max_new_tokens=args.max_new_tokens, rewards={"accuracy": 1.0, "format": 0.0},
                      bread=BreadConfig(enabled=bread, remember_anchors=True))
        optimizer = make_optimizer(policy.model, rl.lr, rl.weight_decay)
        return RLTrainer(policy if reuse else NoReuse(policy), task, problems, rl, resolve_knobs(rl), optimizer, seed=0)

    sides = {"grpo": trainer(False, True), "bread": trainer(True, True),
             "grpo-no-reuse": trainer(False, False), "bread-no-reuse": trainer(True, False)}
    rec = Recorder()
    total = args.warmup + args.steps
    for step in range(total):
        for name in rotate(list(sides), step):
            with rec.measure(name) as m:
                metrics, _ = sides[name].step(step, total)
            if step < args.warmup:
                continue
            rec.add("step", name, "total", m["seconds"])
            rec.add("step", name, "cpu", m["cpu_seconds"])
            rec.add("step", name, "generate", metrics["time/generate_s"])
            rec.add("step", name, "update", m["seconds"] - metrics["time/generate_s"])
            rec.add("step", name, "tokens", metrics["generated_tokens"])
            rec.add("step", name, "probe_groups", metrics.get("bread/probe_groups", 0))
            print(f"  step {step} {name:15s} {m['seconds']:5.2f} s, CPU {m['cpu_seconds']:5.2f} s (generate {metrics['time/generate_s']:.2f} s, "
                  f"{metrics['generated_tokens']} tokens, {metrics.get('bread/probe_groups', 0)} probe groups, "
                  f"accuracy {metrics.get('accuracy', 0):.2f})", flush=True)

    rows = []
    for name in sides:
        med = {k: rec.median("step", name, k) for k in ("total", "cpu", "generate", "update", "tokens", "probe_groups")}
        base = rec.median("step", name.replace("bread", "grpo"), "total")
        base_cpu = rec.median("step", name.replace("bread", "grpo"), "cpu")
        extra = f"{100 * (med['total'] - base) / base:+.0f}%" if name.startswith("bread") else ""
        extra_cpu = f"{100 * (med['cpu'] - base_cpu) / base_cpu:+.0f}%" if name.startswith("bread") else ""
        rows.append([name, f"{med['total']:.2f}", rec.spread("step", name, "total"), f"{med['cpu']:.2f}",
                     f"{med['generate']:.2f}", f"{med['update']:.2f}", f"{med['tokens']:.0f}",
                     f"{med['probe_groups']:.0f}", extra, extra_cpu])
    print()
    print(table(["side", "s/step (median)", "min–max", "CPU s/step", "generate s", "update s", "tokens/step",
                 "probe groups", "BREAD overhead vs grpo", "same, CPU time"], rows))
    reuse = rec.median("step", "bread-no-reuse", "total") / rec.median("step", "bread", "total")
    print(f"prefix reuse makes a BREAD step {reuse:.2f}x faster "
          f"(GRPO step {rec.median('step', 'grpo-no-reuse', 'total') / rec.median('step', 'grpo', 'total'):.2f}x)")
    footer(rec)


if __name__ == "__main__":
    main()
