"""The quick-start recipes over seeds: GRPO and BREAD on 8-step problems, GRPO on 4-step ones.

One SFT checkpoint (`recipes/quickstart/sft.yaml`), then for each RL seed: GRPO and BREAD with
the quick-start recipes (8-step problems, strict reward) and GRPO on 4-step problems (the same
recipe with `difficulty: [4]`). The table gives held-out pass@1 and greedy accuracy at the start
and the end of each run (mean, min-max over seeds), the tokens generated and BREAD's expert-token
fraction. Finished runs are reused: rerunning only rebuilds the table.

`.venv/bin/python experiments/quickstart_seeds.py [--seeds 3] [--jobs 2] [--quick]`
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import (
    experiment_args,
    last_metric,
    output_dir,
    read_metrics,
    run_parallel,
    run_recipe,
    run_rl_job,
    write_results,
)

ARMS = {  # name -> (recipe, extra overrides)
    "GRPO 8-step": ("recipes/quickstart/grpo.yaml", []),
    "BREAD 8-step": ("recipes/quickstart/bread.yaml", []),
    "GRPO 4-step": ("recipes/quickstart/grpo.yaml", ["train.difficulty=[4]", "eval.difficulty=[4]"]),
}


def summarise(folder: Path) -> dict:
    rows = read_metrics(folder)
    evals = [r for r in rows if "eval/pass@1" in r]
    final = json.loads((folder / "eval.json").read_text())
    return {"start_pass@1": evals[0]["eval/pass@1"], "end_pass@1": final["pass@1"],
            "start_greedy": evals[0]["eval/accuracy"], "end_greedy": final["accuracy"],
            "tokens": last_metric(folder, "total/generated_tokens"),
            "expert_fraction": last_metric(folder, "bread/expert_token_fraction")}


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


PASS1_HEADER = ["seeds", "pass@1 start", "pass@1 end", "gain", "greedy start", "greedy end"]


def pass1_columns(runs: list[dict]) -> list:
    """The `PASS1_HEADER` columns of one arm's `summarise`d runs: held-out pass@1 and greedy at
    the start and end, and the pass@1 gain, each as mean (min-max) over seeds."""
    return [len(runs), spread([r["start_pass@1"] for r in runs]), spread([r["end_pass@1"] for r in runs]),
            spread([r["end_pass@1"] - r["start_pass@1"] for r in runs]), spread([r["start_greedy"] for r in runs]),
            spread([r["end_greedy"] for r in runs])]


def quickstart_sft(out: Path, quick: bool) -> tuple[Path, list[str]]:
    """The shared SFT run folder (trained once, reused) and the overrides that shrink the RL runs in `--quick`."""
    small = ["sft.steps=100", "rl.steps=4", "eval.size=40", "eval.every=2"] if quick else []
    sft = out / "sft"
    run_recipe("sft", "recipes/quickstart/sft.yaml", [f"output_dir={sft}", *[o for o in small if o.startswith(("sft", "eval"))]])
    return sft, [o for o in small if not o.startswith("sft")]


def main():
    args = experiment_args(__doc__.splitlines()[0])
    out = output_dir("quickstart-seeds", args.out, args.quick)
    seeds = args.seeds or (1 if args.quick else 3)
    sft, small = quickstart_sft(out, args.quick)
    jobs = []
    for s in range(seeds):
        for arm, (recipe, extra) in ARMS.items():
            folder = out / f"{arm.replace(' ', '-').lower()}-s{s}"
            jobs.append({"arm": arm, "seed": s, "folder": folder, "recipe": recipe,
                         "overrides": [f"output_dir={folder}", f"model.init={sft / 'final'}", f"seed={s}", *extra,
                                       *small]})
    run_parallel(run_rl_job, jobs, args.jobs)
    results, rows = {}, []
    for arm in ARMS:
        runs = [summarise(j["folder"]) for j in jobs if j["arm"] == arm]
        results[arm] = runs
        rows.append([arm, *pass1_columns(runs), spread([r["tokens"] / 1e6 for r in runs]),
                     spread([r["expert_fraction"] for r in runs])])
    header = ["arm", *PASS1_HEADER, "tokens (M)", "expert-token fraction"]
    print(write_results(out, "Quick-start recipes over seeds (mean (min-max))", header, rows, results))


if __name__ == "__main__":
    main()
