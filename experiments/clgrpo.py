"""Experiment 4: the CLGRPO staged pipeline and an ε sweep for its clip-low stage (arXiv 2506.18048; docs/methods.md#clgrpo-pipeline).

Part A runs recipes/clgrpo-pipeline.yaml (SFT → GRPO format-only → GRPO format+accuracy → clip-low
GRPO) and reports held-out accuracy after each stage; part A2 reruns stages 2-4 from the same SFT at
`--lr` when it differs from the recipe's RL lr (1e-4 now; the 5e-4 the recipe once had wrecks the tiny
model). Part B restarts stage 4 from the A2 stage-3 checkpoint (part A's when A2 is not run) with
(ε_low, ε_high) ∈ {(0.2,0.1), (0.2,0.2), (0.2,0.28), (0.1,0.1)}. With μ = 1 PPO epoch and one
mini-batch the ratio is exactly 1 and clipping cannot act, so part B first checks that two ε pairs give
identical runs at μ = 1, then sweeps with μ = 2 epochs × 2 mini-batches (4 updates per batch of
rollouts, so π_θ drifts from π_old and the clip range matters).

`.venv/bin/python experiments/clgrpo.py [--quick] [--seeds 2] [--epochs 2] [--minibatches 2]`
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import yaml
from common import (
    eval_curve,
    experiment_args,
    fail,
    output_dir,
    read_metrics,
    run_parallel,
    run_recipe,
    write_results,
)

RECIPE = "recipes/clgrpo-pipeline.yaml"
PAIRS = [(0.2, 0.1), (0.2, 0.2), (0.2, 0.28), (0.1, 0.1)]


def add_args(p):
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs μ in the sweep")
    p.add_argument("--minibatches", type=int, default=2, help="mini-batches per epoch in the sweep")
    p.add_argument("--sweep-steps", type=int, default=None, help="stage-4 steps in the sweep (default: recipe's)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="RL lr of the variant pipeline (stages 2-4 rerun from the same SFT) and of the sweep")


def one_run(job):
    t0 = time.time()
    run_recipe("rl", None, job["overrides"], data=job["data"])
    return {**job, "seconds": time.time() - t0}


def main():
    args = experiment_args(__doc__.splitlines()[0], add_args)
    quick = args.quick
    out = output_dir("clgrpo", args.out, quick)
    n_seeds = args.seeds or (1 if quick else 2)
    t0 = time.time()
    data = yaml.safe_load(Path(RECIPE).read_text())
    data["output_dir"] = str(out / "pipeline")
    if quick:
        data["sft"]["steps"] = 100
        data["rl"]["steps"] = 3
        data["stages"][1]["rl"]["steps"] = 2
        data["eval"]["size"] = 50
    recipe = out / "pipeline-recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))

    # ------------------------------------------------------------------ part A
    from thinkling.pipeline import run_pipeline, stage_configs

    root = Path(data["output_dir"])
    saved = root / "pipeline.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != data:  # finished stages would be reused
        fail(f"{root} was run with another version of {RECIPE}; delete {out} or pass --out to rerun")
    stages = run_pipeline(str(recipe), [], resume=root.exists())
    cfgs = stage_configs(copy.deepcopy(data))
    for st, (name, kind, cfg) in zip(stages, cfgs):
        rows = read_metrics(Path(cfg.output_dir))
        train = [r for r in rows if "skipped_update" in r or "loss" in r and "eval/accuracy" not in r]
        st["folder"] = cfg.output_dir
        st["by_difficulty"] = json.loads((Path(cfg.output_dir) / "eval.json").read_text())["by_difficulty"]
        if kind == "rl":
            st["skipped_updates"] = int(sum(r.get("skipped_update", 0) for r in train))
            st["steps"] = cfg.rl.steps
            st["train_reward_mean"] = sum(r.get("reward_mean", 0) for r in train) / max(1, len(train))
    stage_rows = [[i + 1, s["stage"], s["kind"], s["accuracy"], s["format_rate"], s["mean_tokens"],
                   f"{s.get('skipped_updates', '-')}/{s.get('steps', '-')}" if s["kind"] == "rl" else "-"]
                  for i, s in enumerate(stages)]

    # ------------------------------------------------ part A2: the same pipeline at another RL lr
    # Rerun stages 2-4 from the same SFT checkpoint at --lr (the first stage of a pipeline takes
    # model.init). When --lr is the recipe's lr, part A already is that run.
    lr_tag = f"lr{args.lr:g}"
    rerun = args.lr != data["rl"]["lr"]
    if not rerun:
        variant, vstages, vcfgs = data, stages[1:], cfgs[1:]
    else:
        variant = copy.deepcopy(data)
        variant["output_dir"] = str(out / f"pipeline-{lr_tag}")
        variant["rl"]["lr"] = args.lr
        variant["model"] = {**variant["model"], "init": str(Path(cfgs[0][2].output_dir) / "final")}
        variant["stages"] = variant["stages"][1:]
        vrecipe = out / f"pipeline-{lr_tag}-recipe.yaml"
        vrecipe.write_text(yaml.safe_dump(variant, sort_keys=False))
        vroot = Path(variant["output_dir"])
        vstages = run_pipeline(str(vrecipe), [], resume=vroot.exists())
        vcfgs = stage_configs(copy.deepcopy(variant))
        for st, (name, kind, cfg) in zip(vstages, vcfgs):
            rows = [r for r in read_metrics(Path(cfg.output_dir)) if "eval/accuracy" not in r]
            st["folder"] = cfg.output_dir
            st["skipped_updates"] = int(sum(r.get("skipped_update", 0) for r in rows))
            st["steps"] = cfg.rl.steps
        stage_rows += [[i + 2, s["stage"] + f" ({lr_tag})", s["kind"], s["accuracy"], s["format_rate"],
                        s["mean_tokens"], f"{s['skipped_updates']}/{s['steps']}"] for i, s in enumerate(vstages)]

    # ------------------------------------------------------------------ part B
    stage3_final = Path(vcfgs[1][2].output_dir) / "final"
    base = {k: v for k, v in variant.items() if k != "stages"}
    from thinkling.pipeline import deep_merge

    base = deep_merge(base, {k: v for k, v in data["stages"][3].items() if k not in ("name", "kind")})
    base["model"] = {**base.get("model", {}), "init": str(stage3_final)}
    steps = args.sweep_steps or base["rl"]["steps"]
    every = max(1, steps // 3)
    jobs = []

    def job(tag, eps, seed, extra):
        folder = out / f"sweep-{lr_tag}" / tag
        return {"tag": tag, "eps": eps, "seed": seed, "folder": str(folder), "data": copy.deepcopy(base),
                "overrides": [f"output_dir={folder}", f"seed={seed}", f"rl.eps_low={eps[0]}", f"rl.eps_high={eps[1]}",
                              f"rl.steps={steps}", f"rl.save_every={steps}", f"eval.every={every}", *extra]}

    for eps in (PAIRS[0], PAIRS[2]):  # μ = 1: clipping is inert, both runs must be identical
        jobs.append(job(f"mu1-eps{eps[0]}-{eps[1]}-s0", eps, 0, ["rl.ppo_epochs=1", "rl.minibatches=1"]))
    mu = [f"rl.ppo_epochs={args.epochs}", f"rl.minibatches={args.minibatches}"]
    for eps in PAIRS:
        for seed in range(n_seeds):
            jobs.append(job(f"mu{args.epochs}x{args.minibatches}-eps{eps[0]}-{eps[1]}-s{seed}", eps, seed, mu))
    done = run_parallel(one_run, jobs, args.jobs)

    sweep = []
    for j in done:
        folder = Path(j["folder"])
        rows = [r for r in read_metrics(folder) if "loss" in r]
        ev = json.loads((folder / "eval.json").read_text())
        sweep.append({"tag": j["tag"], "eps_low": j["eps"][0], "eps_high": j["eps"][1], "seed": j["seed"],
                      "mu1": j["tag"].startswith("mu1-"), "accuracy": ev["accuracy"], "format_rate": ev["format_rate"],
                      "curve": eval_curve(folder),
                      "clip_frac": _mean(r.get("clip_frac", 0) for r in rows),
                      "clip_frac_low": _mean(r.get("clip_frac_low", 0) for r in rows),
                      "clip_frac_high": _mean(r.get("clip_frac_high", 0) for r in rows),
                      "updates": len(rows), "seconds": j["seconds"]})
    mu1 = [s for s in sweep if s["mu1"]]
    identical = len(mu1) == 2 and mu1[0]["curve"] == mu1[1]["curve"]
    sweep_rows = []
    for eps in PAIRS:
        runs = [s for s in sweep if not s["mu1"] and (s["eps_low"], s["eps_high"]) == eps]
        sweep_rows.append([f"({eps[0]}, {eps[1]})", len(runs), _mean(s["accuracy"] for s in runs),
                           " / ".join(f"{s['accuracy']:.3f}" for s in runs), _mean(s["clip_frac_low"] for s in runs),
                           _mean(s["clip_frac_high"] for s in runs)])
    for s in mu1:
        sweep_rows.append([f"({s['eps_low']}, {s['eps_high']}) μ=1", 1, s["accuracy"], f"{s['accuracy']:.3f}",
                           s["clip_frac_low"], s["clip_frac_high"]])
    results = {"recipe": RECIPE, "stages": stages, "variant_lr": args.lr, "variant_stages": vstages,
               "stage3_final": str(stage3_final), "sweep_steps": steps,
               "epochs": args.epochs, "minibatches": args.minibatches, "mu1_runs_identical": identical,
               "sweep": sweep, "wall_s": time.time() - t0}
    print(write_results(out, "CLGRPO pipeline: held-out greedy accuracy after each stage (chain k=4)",
                        ["stage", "name", "kind", "accuracy", "format rate", "mean tokens", "skipped updates/steps"],
                        stage_rows, results))
    print(write_results(out, f"Stage-4 ε sweep from the {lr_tag} stage-3 checkpoint ({steps} steps at {lr_tag}, μ={args.epochs} epochs × "
                             f"{args.minibatches} mini-batches; μ=1 rows: one update per rollout batch)",
                        ["(ε_low, ε_high)", "seeds", "accuracy (mean)", "per seed", "clip frac low", "clip frac high"],
                        sweep_rows, {}, name="sweep"))
    print(f"μ=1 runs with different ε identical: {identical}")
    _plot(out / "clgrpo.png", stages + [{**v, "stage": v["stage"] + "@" + lr_tag} for v in vstages if rerun], sweep)
    print(f"wall time {time.time() - t0:.0f} s")


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _plot(path, stages, sweep):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(range(len(stages)), [s["accuracy"] for s in stages], color="C0")
    axes[0].set_xticks(range(len(stages)), [f"{i + 1}-{s['stage']}" for i, s in enumerate(stages)], fontsize=8)
    axes[0].set(ylabel="greedy accuracy (chain k=4)", title="CLGRPO pipeline, after each stage")
    for i, s in enumerate(stages):
        axes[0].annotate(f"{s['accuracy']:.3f}", (i, s["accuracy"]), ha="center", fontsize=8, xytext=(0, 2),
                         textcoords="offset points")
    for i, eps in enumerate(PAIRS):
        for s in sweep:
            if not s["mu1"] and (s["eps_low"], s["eps_high"]) == eps:
                axes[1].plot([p["step"] for p in s["curve"]], [p["accuracy"] for p in s["curve"]], color=f"C{i}",
                             marker="o", alpha=0.7, label=f"ε=({eps[0]},{eps[1]}) s{s['seed']}")
    axes[1].set(xlabel="stage-4 step", ylabel="greedy accuracy", title="stage-4 ε sweep (from stage-3 checkpoint)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
