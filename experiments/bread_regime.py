"""BREAD's regime on `chain`: the model knows every step but samples each one right under half the time.

BREAD's claim is about problems whose sampled success is exponentially rare: GRPO then sees almost
no group with a success and stalls, while groups branched from a prefix of the expert trace do
contain successes. To make that regime on purpose, the quick-start SFT checkpoint (trained on
demonstrations where 20 % of the step results slip by 1-5) is fine-tuned for a few hundred steps
on demonstrations where half of them slip (`recipes/quickstart/sft-noisy.yaml`). The model still knows
each step (greedy stays high) but samples it right about 45 % of the time, so a sampled 8-step
solution is right about once in a thousand: a GRPO group of 8 almost never has a success.
Then GRPO and BREAD (the quick-start RL recipes, strict reward) run from that checkpoint with the
same seeds. Reported: held-out pass@1 and greedy at the start and end (mean and range over seeds),
the first evaluation at which BREAD reaches GRPO's final pass@1, the expert-token fraction and
the generated tokens (BREAD's probes included). Finished runs are reused.

`.venv/bin/python experiments/bread_regime.py [--seeds 3] [--steps 60] [--jobs 2] [--quick]`
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
from common import eval_curve, experiment_args, output_dir, reach, run_parallel, run_recipe, run_rl_job, write_results
from quickstart_seeds import PASS1_HEADER, pass1_columns, spread, summarise

ARMS = {"GRPO": "recipes/quickstart/grpo.yaml", "BREAD": "recipes/quickstart/bread.yaml"}


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 60, quick 4)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N RL steps (default 10)")
    p.add_argument("--noisy-steps", type=int, default=300, help="SFT steps on 50 %%-slip demonstrations")
    p.add_argument("--base", default=None, help="an existing quick-start SFT run folder to start from")


def main():
    args = experiment_args(__doc__.splitlines()[0], add_args)
    out = output_dir("bread-regime", args.out, args.quick)
    small = ["sft.steps=60", "eval.size=40"] if args.quick else []
    base = Path(args.base) if args.base else out / "sft"
    if not args.base:
        run_recipe("sft", "recipes/quickstart/sft.yaml", [f"output_dir={base}", *small])
    noisy = out / "sft-noisy"
    run_recipe("sft", "recipes/quickstart/sft-noisy.yaml",
               [f"output_dir={noisy}", f"model.init={base / 'final'}", f"sft.steps={20 if args.quick else args.noisy_steps}",
                *[o for o in small if o.startswith("eval")]])
    steps = args.steps or (4 if args.quick else 60)
    every = args.eval_every or (2 if args.quick else 10)
    seeds = args.seeds or (1 if args.quick else 3)
    jobs = [{"arm": arm, "seed": s, "recipe": recipe, "folder": out / f"{arm.lower()}-s{s}",
             "overrides": [f"output_dir={out / f'{arm.lower()}-s{s}'}", f"model.init={noisy / 'final'}", f"seed={s}",
                           f"rl.steps={steps}", f"eval.every={every}", f"rl.save_every={steps}",
                           *(["eval.size=40"] if args.quick else [])]}
            for s in range(seeds) for arm, recipe in ARMS.items()]
    run_parallel(run_rl_job, jobs, args.jobs)

    results = {arm: [] for arm in ARMS}
    for j in jobs:
        results[j["arm"]].append({"seed": j["seed"], **summarise(j["folder"]),
                                  "curve": eval_curve(j["folder"], "eval/pass@1")})
    for g, b in zip(results["GRPO"], results["BREAD"]):
        hit = reach(b["curve"], g["end_pass@1"])
        b["step_reaching_grpo_final"] = hit and hit["step"]
    rows = []
    for arm, runs in results.items():
        steps_to_grpo = [r.get("step_reaching_grpo_final") for r in runs]
        rows.append([arm, *pass1_columns(runs),
                     " / ".join("-" if x is None else str(x) for x in steps_to_grpo) if arm == "BREAD" else "-",
                     spread([r["tokens"] / 1e6 for r in runs]), spread([r["expert_fraction"] for r in runs])])
    header = ["arm", *PASS1_HEADER, "BREAD's step reaching GRPO's final (per seed)", "tokens (M)", "expert-token fraction"]
    _plot(out / "pass1.png", results, steps)
    (out / "setup.json").write_text(json.dumps({"base": str(base), "noisy_sft": str(noisy), "steps": steps,
                                                "eval_every": every}, indent=2))
    print(write_results(out, f"GRPO vs BREAD from a 50 %-slip SFT, 8-step problems, {steps} steps "
                             f"(mean (min-max) over seeds)", header, rows, results))


def _plot(path: Path, results: dict, steps: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (arm, runs) in enumerate(results.items()):
        for r in runs:
            xs, ys = [p["step"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]]
            ax.plot(xs, ys, color=f"C{i}", marker="o", ms=3, alpha=0.7, label=arm if r["seed"] == 0 else None)
    ax.set(xlabel="RL step", ylabel="held-out pass@1 (8-step, strict)", title="GRPO vs BREAD, rare-success regime")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
