"""Accuracy by training-difficulty mix at a fixed SFT budget (the SST "scaling by difficulty" question).

A fresh tiny model is trained with SFT on `chain` problems drawn from one or more difficulty
buckets (easy = 1-2 steps, medium = 3-4, hard = 5-6), every mix with the same number of
optimiser steps, batch size and learning rate. Every trained model is then evaluated greedy and
strict (every step line must be right) on held-out problems at each test difficulty 1..8
(seeds 1001..1008, none of them a training seed), so test difficulties 7 and 8 are longer than
anything any mix saw. The table gives accuracy per mix and test difficulty (mean, min-max over
seeds) and the plot the overall held-out accuracy by mix.
Finished runs are reused: rerunning only re-evaluates and rebuilds the table. Results already in
the output folder's results.json (same step budget) are kept, so a later seed is added with
`--first-seed 2 --seeds 1` and the table covers every seed measured so far.

`.venv/bin/python experiments/difficulty_scaling.py [--seeds 2] [--first-seed 0] [--jobs 1] [--quick] [--steps 800] [--mixes easy,hard,...]`
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import (
    evaluate_model,
    experiment_args,
    fail,
    last_metric,
    output_dir,
    run_parallel,
    run_recipe,
    write_results,
)

BUCKETS = {"easy": [1, 2], "medium": [3, 4], "hard": [5, 6]}
MIXES = {  # name -> buckets, in the order of the plot (roughly easy -> hard)
    "easy": ["easy"], "easy+medium": ["easy", "medium"], "medium": ["medium"],
    "easy+hard": ["easy", "hard"], "all three": ["easy", "medium", "hard"],
    "medium+hard": ["medium", "hard"], "hard": ["hard"],
}
TEST_DIFFICULTIES = list(range(1, 9))
RECIPE = "recipes/experiments/difficulty-scaling-sft.yaml"  # model, lr, batch, the sanity eval


def mix_levels(mix: str) -> list[int]:
    return [k for b in MIXES[mix] for k in BUCKETS[b]]


def train_job(job: dict) -> dict:
    """One SFT run (skipped when its folder already holds a finished run); adds its wall time."""
    t0 = time.time()
    reused = (Path(job["folder"]) / "final" / "policy.json").exists()
    levels = ",".join(map(str, mix_levels(job["mix"])))
    run_recipe("sft", RECIPE, [
        f"output_dir={job['folder']}", f"seed={job['seed']}", f"train.size={job['size']}",
        f"train.difficulty=[{levels}]", f"train.seed={job['seed']}", f"sft.steps={job['steps']}",
        f"sft.save_every={job['steps']}",
    ])
    return {**job, "seconds": time.time() - t0, "reused": reused}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def seeds_of(results: dict, mix: str) -> list[str]:
    return sorted(results[mix], key=int)


def plot(path, mixes: list[str], results: dict, seeds: int):
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(mixes))
    overall = [[results[m][s]["overall"] for s in seeds_of(results, m)] for m in mixes]
    ax1.errorbar(x, [statistics.mean(v) for v in overall],
                 yerr=[[statistics.mean(v) - min(v) for v in overall], [max(v) - statistics.mean(v) for v in overall]],
                 marker="o", capsize=4)
    ax1.set_xticks(list(x), mixes, rotation=30, ha="right")
    ax1.set_ylabel("held-out greedy accuracy, test difficulty 1-8")
    ax1.set_title(f"overall accuracy by training mix (mean, min-max over {seeds} seeds)")
    ax1.set_ylim(0, 1)
    for m in mixes:
        means = [statistics.mean(results[m][s]["by_k"][str(k)] for s in seeds_of(results, m)) for k in TEST_DIFFICULTIES]
        ax2.plot(TEST_DIFFICULTIES, means, marker="o", label=m)
    ax2.axvline(6.5, color="grey", ls=":", lw=1)
    ax2.set_xlabel("test difficulty (steps)")
    ax2.set_ylabel("greedy accuracy (strict)")
    ax2.set_title("accuracy per test difficulty (mean over seeds)")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    def extra(p):
        p.add_argument("--mixes", default="all", help=f"comma-separated subset of: {', '.join(MIXES)}")
        p.add_argument("--steps", type=int, default=None, help="SFT steps per run (default 800, --quick 40)")
        p.add_argument("--first-seed", type=int, default=0, help="first seed to train (earlier seeds' results are kept)")

    args = experiment_args(__doc__.splitlines()[0], extra)
    mixes = list(MIXES) if args.mixes == "all" else [m.strip() for m in args.mixes.split(",")]
    for m in mixes:
        if m not in MIXES:
            fail(f"--mixes: unknown mix {m!r} (known: {', '.join(MIXES)})")
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 2))))
    steps, size, per_k = (40, 2000, 20) if args.quick else (800, 20000, 100)
    steps = args.steps or steps
    out = output_dir("difficulty-scaling", args.out, args.quick)
    results_file = out / "results.json"
    earlier = json.loads(results_file.read_text()) if results_file.exists() else {"meta": {"runs": []}, "results": {}}
    if earlier["meta"].get("sft_steps", steps) != steps or earlier["meta"].get("test_per_difficulty", per_k) != per_k:
        fail(f"{results_file}: holds results for {earlier['meta']['sft_steps']} SFT steps and "
             f"{earlier['meta']['test_per_difficulty']} problems per difficulty, not {steps} / {per_k}; use another --out")
    jobs = [{"mix": m, "seed": s, "steps": steps, "size": size, "folder": str(out / f"{m.replace(' ', '-')}-s{s}")}
            for s in seeds for m in mixes]
    t0 = time.time()
    done = run_parallel(train_job, jobs, args.jobs)
    train_seconds = time.time() - t0

    from thinkling.models import load_policy
    from thinkling.tasks import get_task

    task = get_task("chain", strict=True)
    tests = {k: task.problems(per_k, 1000 + k, [k]) for k in TEST_DIFFICULTIES}
    results: dict = earlier["results"]
    t1 = time.time()
    for job in done:
        policy = load_policy(f"{job['folder']}/final")
        by_k = {str(k): evaluate_model(policy, task, tests[k], max_new_tokens=96)["accuracy"] for k in TEST_DIFFICULTIES}
        before = results.get(job["mix"], {}).get(str(job["seed"]), {})  # a reused run keeps its training time
        results.setdefault(job["mix"], {})[str(job["seed"])] = {
            "by_k": by_k, "overall": statistics.mean(by_k.values()),
            "train_seconds": before.get("train_seconds", job["seconds"]) if job["reused"] else job["seconds"],
            "final_loss": last_metric(job["folder"], "loss")}
        print(f"{job['mix']:>12} s{job['seed']}: " + " ".join(f"{by_k[str(k)]:.2f}" for k in TEST_DIFFICULTIES), flush=True)
    eval_seconds = time.time() - t1

    shown = [m for m in MIXES if m in results]
    header = ["training mix", "levels", "seeds", *[f"k={k}" for k in TEST_DIFFICULTIES], "overall", "final train loss (seed: value)"]
    rows = []
    for m in shown:
        runs = [results[m][s] for s in seeds_of(results, m)]
        losses = ", ".join(f"{s}: {results[m][s]['final_loss']:.3f}" for s in seeds_of(results, m)
                           if results[m][s].get("final_loss") is not None)  # older results did not log it
        rows.append([m, ",".join(map(str, mix_levels(m))), ",".join(seeds_of(results, m)),
                     *[spread([r["by_k"][str(k)] for r in runs]) for k in TEST_DIFFICULTIES],
                     spread([r["overall"] for r in runs]), losses or "-"])
    old = earlier["meta"]  # results.json of the first version kept one run's seeds and times flat in meta
    runs_meta = [*old.get("runs", [{"seeds": list(range(old["seeds"])), "mixes": list(results),
                                     "train_seconds": old["train_seconds"], "eval_seconds": old["eval_seconds"]}]
                             if "seeds" in old else []),
                 {"seeds": seeds, "mixes": mixes, "train_seconds": train_seconds, "eval_seconds": eval_seconds}]
    meta = {"sft_steps": steps, "batch_size": 64, "train_size": size, "recipe": RECIPE, "test_per_difficulty": per_k,
            "runs": runs_meta}
    n_seeds = len({s for m in shown for s in results[m]})
    table = write_results(out, f"Greedy strict accuracy by training mix and test difficulty "
                               f"({n_seeds} seeds, {steps} SFT steps x 64, {per_k} problems per test difficulty; "
                               f"mean (min-max))", header, rows, {"meta": meta, "results": results})
    plot(out / "difficulty_scaling.png", shown, results, n_seeds)
    print(table)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
