"""Rollout DPO vs GRPO from the quick-start SFT checkpoint, with the same rollout budget.

Both arms start from the quick-start SFT policy (`recipes/quickstart/sft.yaml`, shared with
quickstart_seeds.py) and train on 4-step chain problems with the strict verifier: GRPO with
`recipes/quickstart/grpo.yaml`, rollout DPO with `recipes/quickstart/dpo.yaml` (online: a fresh
round of 16 prompts × 8 completions every step, up to 4 (right, wrong) pairs per prompt). Both
sample 100 steps × 16 prompts × 8 completions, so they generate about the same number of tokens
(the table gives the exact count). Held-out: 200 other 4-step problems, greedy and 4 samples at
temperature 1 (pass@1), at step 0 and at the end. Finished runs are reused.

`.venv/bin/python experiments/dpo_vs_grpo.py [--seeds 3] [--jobs 1] [--quick]`
"""

from __future__ import annotations

import json
from pathlib import Path

from common import (
    experiment_args,
    output_dir,
    read_metrics,
    run_parallel,
    run_rl_job,
    write_results,
)
from quickstart_seeds import PASS1_HEADER, pass1_columns, quickstart_sft, spread

# 4-step problems; held-out evaluation at step 0 and at the end only (the recipes' every-25-step
# evaluations do not change training and cost a fifth of a run).
FOUR = ["train.difficulty=[4]", "eval.difficulty=[4]", "eval.every=100"]
ARMS = {  # name -> (verb, recipe, extra overrides)
    "GRPO": ("rl", "recipes/quickstart/grpo.yaml", FOUR),
    "rollout DPO": ("dpo", "recipes/quickstart/dpo.yaml", FOUR),
}


def summarise(folder: Path) -> dict:
    rows = read_metrics(folder)
    start = next(r for r in rows if "eval/pass@1" in r)
    final = json.loads((folder / "eval.json").read_text())
    trained = [r for r in rows if "groups_sampled" in r]
    out = {"start_pass@1": start["eval/pass@1"], "end_pass@1": final["pass@1"], "start_greedy": start["eval/accuracy"],
           "end_greedy": final["accuracy"], "tokens": max(r.get("total/generated_tokens", 0) for r in rows),
           "updates": sum(1 for r in rows if "loss" in r)}
    if any("pairs" in r for r in trained):
        out["pairs_per_step"] = sum(r.get("pairs", 0) for r in trained) / len(trained)
    return out


def main():
    args = experiment_args(__doc__.splitlines()[0])
    out = output_dir("dpo-vs-grpo", args.out, args.quick)
    seeds = args.seeds or (1 if args.quick else 3)
    sft, small = quickstart_sft(out, args.quick)
    jobs = []
    for s in range(seeds):
        for arm, (verb, recipe, extra) in ARMS.items():
            folder = out / f"{arm.replace(' ', '-').lower()}-s{s}"
            shrink = [o.replace("rl.", f"{verb}.", 1) for o in small]  # --quick: the arm's own steps key
            jobs.append({"arm": arm, "seed": s, "folder": folder, "kind": verb, "recipe": recipe,
                         "overrides": [f"output_dir={folder}", f"model.init={sft / 'final'}", f"seed={s}", *extra,
                                       *shrink]})
    run_parallel(run_rl_job, jobs, args.jobs)
    results, rows = {}, []
    for arm in ARMS:
        runs = [summarise(j["folder"]) for j in jobs if j["arm"] == arm]
        results[arm] = runs
        rows.append([arm, *pass1_columns(runs), spread([r["tokens"] / 1e6 for r in runs]),
                     spread([r["updates"] for r in runs]), spread([r.get("pairs_per_step") for r in runs])])
    header = ["arm", *PASS1_HEADER, "tokens (M)", "updates", "pairs / step"]
    print(write_results(out, "Rollout DPO vs GRPO on 4-step chain problems (mean (min-max))", header, rows, results))


if __name__ == "__main__":
    main()
