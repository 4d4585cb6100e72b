"""What BREAD's probes add to an RL step, with and without prefix reuse and probe early stop.

    python benchmarks/bread_overhead.py                 # the light-SFT chain setting
    python benchmarks/bread_overhead.py --steps 6 --init runs/experiments/light-sft/final
    python benchmarks/bread_overhead.py --init runs/demo/sft/final --difficulty 8 --max-new-tokens 80  # the demo's
    python benchmarks/bread_overhead.py --init runs/demo/sft/final --difficulty 8 --max-new-tokens 80 --strict \
        --sides grpo,bread,bread-early-stop --steps 20   # the demo's, with its strict verifier
    python benchmarks/bread_overhead.py --init runs/demo/sft/final --difficulty 8 --max-new-tokens 80 --strict \
        --sides grpo,bread --steps 10 --share-prompt     # ... and its shared-prompt update
    python benchmarks/bread_overhead.py --init runs/demo/sft/final --difficulty 8 --max-new-tokens 80 --strict \
        --sides grpo,bread --steps 40 --share-prompt --micro-batch 32   # the demo's whole RL run, as it trains

The setting: a tiny character transformer after a light SFT (`--init`, default
runs/experiments/light-sft/final; when missing, recipes/experiments/light-sft.yaml
is trained once into ~/.cache/thinkling/bench/), GRPO on 6-step chain
problems, 16 prompts x G=8, 64 new tokens. Each side trains its own copy from
the same checkpoint over the same steps (same seeds), alternating every step:

  grpo / bread                   prefix reuse on: each distinct prompt (or prompt +
                                 anchor) is prefilled once for its G copies
  bread-early-stop               `bread` with rl.bread.early_stop: a probe group stops
                                 once none of its samples can succeed (`--strict`: the
                                 strict verifier can tell after a wrong step line)
  grpo-no-reuse / bread-no-reuse every row prefilled separately

`bread` and `bread-no-reuse` run without early stop (the BREAD of earlier
measurements). The BREAD overhead is the extra step time of a BREAD side over
its GRPO side, as a share of the GRPO step, measured in the same run. Early
stop changes no result: `bread` and `bread-early-stop` train identical models,
which the script checks every step (every logged number but time and tokens).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import Recorder, footer, header, rotate, table

import thinkling.rollout.bread as bread_module
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


SIDES = ("grpo", "bread", "bread-early-stop", "grpo-no-reuse", "bread-no-reuse")


class ProbeRounds:
    """Times BREAD's probe rounds (each one `sample_groups` call of `rollout.bread`): wall and CPU
    seconds, rows, generated tokens (all, and those of groups with a success, which no early stop
    can save) and decode steps (the longest sample) of every round."""

    def __init__(self):
        self.rounds: list[dict] = []
        self._sample_groups = bread_module.sample_groups
        bread_module.sample_groups = self

    def __call__(self, policy, task, requests, group_size, params, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        groups = self._sample_groups(policy, task, requests, group_size, params, **kw)
        lengths = [c.tokens for g in groups for c in g.completions]
        self.rounds.append({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "rows": len(lengths),
                            "tokens": sum(lengths), "success_tokens": sum(c.tokens for g in groups if g.has_success
                                                                          for c in g.completions),
                            "decode_steps": max(lengths, default=0)})
        return groups

    def take(self) -> list[dict]:
        out, self.rounds = self.rounds, []
        return out


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
    ap.add_argument("--strict", action="store_true", help="strict chain verifier (every step line checked), as the "
                    "demo's RL recipes use; without it only the answer is checked and early stop cannot act")
    ap.add_argument("--share-prompt", action="store_true",
                    help="rl.share_prompt on every side (the update runs each prompt + anchor once), as the quick-start "
                         "recipes train")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="rl.micro_batch_size on every side (rows per forward/backward pass of the update)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}")
    args = ap.parse_args(argv)
    names = args.sides.split(",")
    unknown = [n for n in names if n not in SIDES]
    if unknown:
        ap.error(f"--sides: unknown side {unknown[0]!r} (known: {', '.join(SIDES)})")
    for name in names:
        if name.startswith("bread") and base_of(name) not in names:
            ap.error(f"--sides: {name} needs {base_of(name)}, its baseline")
    torch.set_num_threads(args.threads)
    header("BREAD probe overhead per RL step", ["benchmarks/bread_overhead.py", *sys.argv[1:]])
    init = checkpoint(args.init)
    task = get_task("chain", strict=args.strict)
    problems = task.problems(2000, seed=2, difficulty=[args.difficulty])
    print(f"init={init} task=chain strict={args.strict} difficulty={args.difficulty} prompts={args.prompts} "
          f"G={args.group} max_new_tokens={args.max_new_tokens} steps={args.steps} (+{args.warmup} warm-up) "
          f"share_prompt={args.share_prompt} micro_batch={args.micro_batch}\n")

    def trainer(name: str) -> RLTrainer:
        policy = TinyPolicy.load(init)
        rl = RLConfig(algorithm="grpo", prompts_per_step=args.prompts, group_size=args.group, lr=1e-4,
                      max_new_tokens=args.max_new_tokens, rewards={"accuracy": 1.0, "format": 0.0},
                      share_prompt=args.share_prompt, micro_batch_size=args.micro_batch, bread=BreadConfig(enabled=name.startswith("bread"), remember_anchors=True,
                                        early_stop=name == "bread-early-stop"))
        optimizer = make_optimizer(policy.model, rl.lr, rl.weight_decay)
        reuse = "no-reuse" not in name
        return RLTrainer(policy if reuse else NoReuse(policy), task, problems, rl, resolve_knobs(rl), optimizer, seed=0)

    sides = {name: trainer(name) for name in names}
    rec = Recorder()
    probes = ProbeRounds()
    logged: dict[str, dict] = {}  # this step's metrics of each side
    mismatches = []
    total = args.warmup + args.steps
    for step in range(total):
        for name in rotate(list(sides), step):
            probes.take()
            with rec.measure(name) as m:
                metrics, _ = sides[name].step(step, total)
            rounds = probes.take()
            logged[name] = metrics
            if step < args.warmup:
                continue
            rec.add("step", name, "probe_s", sum(r["seconds"] for r in rounds))
            rec.add("step", name, "probe_cpu", sum(r["cpu"] for r in rounds))
            for r in rounds:
                for k, v in r.items():
                    rec.add("round", name, k, v)
            rec.add("step", name, "total", m["seconds"])
            rec.add("step", name, "cpu", m["cpu_seconds"])
            rec.add("step", name, "generate", metrics["time/generate_s"])
            rec.add("step", name, "update", m["seconds"] - metrics["time/generate_s"])
            rec.add("step", name, "tokens", metrics["generated_tokens"])
            rec.add("step", name, "probe_tokens", metrics.get("bread/probe_tokens", 0))
            rec.add("step", name, "probe_groups", metrics.get("bread/probe_groups", 0))
            print(f"  step {step} {name:16s} {m['seconds']:5.2f} s, CPU {m['cpu_seconds']:5.2f} s (generate "
                  f"{metrics['time/generate_s']:.2f} s, probes {sum(r['seconds'] for r in rounds):.2f} s; "
                  f"{metrics['generated_tokens']} tokens, {metrics.get('bread/probe_tokens', 0)} in "
                  f"{metrics.get('bread/probe_groups', 0)} probe groups; accuracy {metrics.get('accuracy', 0):.2f})",
                  flush=True)
        if "bread" in logged and "bread-early-stop" in logged:
            diff = same_results(logged["bread"], logged["bread-early-stop"])
            if diff:
                mismatches.append(step)
                print(f"  step {step}: bread and bread-early-stop differ in {', '.join(diff)}", flush=True)

    rows = []
    for name in sides:
        med = {k: rec.median("step", name, k) for k in ("total", "cpu", "generate", "update", "tokens", "probe_tokens",
                                                         "probe_groups", "probe_s", "probe_cpu")}
        base = rec.median("step", base_of(name), "total")
        base_cpu = rec.median("step", base_of(name), "cpu")
        extra = f"{100 * (med['total'] - base) / base:+.0f}%" if name.startswith("bread") else ""
        extra_cpu = f"{100 * (med['cpu'] - base_cpu) / base_cpu:+.0f}%" if name.startswith("bread") else ""
        rows.append([name, f"{med['total']:.2f}", rec.spread("step", name, "total"), f"{med['cpu']:.2f}",
                     f"{med['generate']:.2f}", f"{med['probe_s']:.2f}", f"{med['probe_cpu']:.2f}", f"{med['update']:.2f}",
                     f"{med['tokens']:.0f}", f"{med['probe_tokens']:.0f}", f"{med['probe_groups']:.0f}", extra, extra_cpu])
    print()
    print(table(["side", "s/step (median)", "min–max", "CPU s/step", "generate s", "probes s", "probes CPU s",
                 "update s", "tokens/step", "probe tokens", "probe groups", "BREAD overhead vs grpo",
                 "same, CPU time"], rows))
    for name in sides:  # what a run of these steps costs: early steps probe most, so medians alone mislead
        if name.startswith("bread"):
            cpu, base_cpu = (sum(rec.values[("step", n)]["cpu"]) for n in (name, base_of(name)))
            wall, base_wall = (sum(rec.values[("step", n)]["total"]) for n in (name, base_of(name)))
            probe_cpu = sum(rec.values[("step", name)]["probe_cpu"])
            print(f"all {args.steps} measured steps: {name} {cpu:.1f} CPU-s ({wall:.1f} s), {base_of(name)} "
                  f"{base_cpu:.1f} CPU-s ({base_wall:.1f} s): BREAD overhead {100 * (cpu - base_cpu) / base_cpu:+.0f}% "
                  f"in CPU time ({100 * (wall - base_wall) / base_wall:+.0f}% wall); its probes alone "
                  f"{probe_cpu:.1f} CPU-s = {100 * probe_cpu / base_cpu:.0f}% of the {base_of(name)} side's CPU time "
                  f"(the rest: the update on the branched groups, and the two runs' models drifting apart)")
    if "bread-no-reuse" in sides and "bread" in sides:
        reuse = rec.median("step", "bread-no-reuse", "total") / rec.median("step", "bread", "total")
        print(f"prefix reuse makes a BREAD step {reuse:.2f}x faster "
              f"(GRPO step {rec.median('step', 'grpo-no-reuse', 'total') / rec.median('step', 'grpo', 'total'):.2f}x)")
    if "bread" in sides and "bread-early-stop" in sides:
        early_stop_summary(rec, total, mismatches)
    print()
    print(table(["side", "probe rounds/step", "rows/round", "decode steps/round", "tokens/round",
                 "of which in groups with a success", "s/round", "CPU s/round", "CPU ms per decode step"],
                [[name, f"{len(rec.values[('round', name)]['rows']) / args.steps:.1f}",
                  *(f"{statistics.mean(rec.values[('round', name)][k]):.{d}f}"
                    for k, d in (("rows", 0), ("decode_steps", 1), ("tokens", 0), ("success_tokens", 0), ("seconds", 3),
                                 ("cpu", 3))),
                  f"{1000 * sum(rec.values[('round', name)]['cpu']) / sum(rec.values[('round', name)]['decode_steps']):.2f}"]
                 for name in sides if ("round", name) in rec.values]))
    footer(rec)


def base_of(name: str) -> str:
    """The GRPO side a side's BREAD overhead is measured against."""
    return "grpo-no-reuse" if "no-reuse" in name else "grpo"


def same_results(a: dict, b: dict) -> list[str]:
    """The logged numbers of one step that differ, time and token counts aside (they may). Floats
    may differ by rounding: the sampler's log-probs of a kept probe move in the last bits when the
    other rows of its batch change (matmul rounding depends on the batch), and `offpolicy/kl` reads them."""
    skip = ("time/", "generated_tokens", "total/generated_tokens", "bread/probe_tokens", "tokens_per_s", "mem/")

    def same(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6)
        return x == y

    return sorted(k for k in set(a) | set(b) if not k.startswith(skip) and not same(a.get(k), b.get(k)))


def early_stop_summary(rec: Recorder, steps: int, mismatches: list[int]) -> None:
    """What early stop saves, step by step (the two BREAD sides compute the same steps, so each step's
    ratio compares like with like), and in how many of all `steps` (warm-up included) they agreed."""
    def per_step(metric: str) -> list[float]:
        return [x / y for x, y in zip(rec.values[("step", "bread")][metric], rec.values[("step", "bread-early-stop")][metric])]

    def fmt(v: list[float]) -> str:
        return f"{statistics.median(v):.2f}x (min–max {min(v):.2f}–{max(v):.2f})"

    print(f"early stop, per step (bread / bread-early-stop): step {fmt(per_step('total'))}, CPU {fmt(per_step('cpu'))}, "
          f"probes' CPU {fmt(per_step('probe_cpu'))}, probe tokens {fmt(per_step('probe_tokens'))}")
    for metric, what in (("total", "wall"), ("cpu", "CPU")):
        base = rec.median("step", "grpo", metric)
        before, after = (100 * (rec.median("step", side, metric) - base) / base for side in ("bread", "bread-early-stop"))
        print(f"BREAD overhead over GRPO ({what} time, medians): {before:+.0f}% without early stop, {after:+.0f}% with")
    print(f"bread and bread-early-stop logged the same numbers (floats to 1e-4) in {steps - len(mismatches)} of {steps} "
          f"steps (warm-up included)" + (f"; they differ at steps {mismatches}" if mismatches else ""))


if __name__ == "__main__":
    main()
