"""Experiment 2: TLDR length-level GRPO vs the SFT model (arXiv 2505.07961; docs/methods.md#tldr).

Why a verbose task: the plain `chain` expert trace has no slack (every step line is needed), so a
shorter correct answer does not exist and "50 % fewer tokens" could only mean skipping steps. The
`chain_verbose` SFT data (experiments/common.py) append r ~ U{0..k} redundant `check` lines that
re-do the last r steps, so the SFT model over-thinks by a measured amount and the shortest correct
completion is known (the table prints it). 75 % of SFT prompts carry a random, uninformative
`[short]`/`[medium]`/`[long]` tag so the tags are not out of distribution when RL starts.

RL: GRPO with r = acc·(1 − λ·clip((L − B_ℓ)/B_ℓ, 0, 1)), levels sampled per prompt
(recipes/experiments/tldr-chain-verbose.yaml). Evaluation on held-out k = 2, 3, 4 problems per
level (and untagged): greedy accuracy and tokens, sampled pass@1 and tokens. Claims: ≈ 50 % fewer
tokens than the SFT model with little accuracy loss; the levels separate.

`.venv/bin/python experiments/tldr.py [--quick] [--seeds 2] [--lr 2e-4] [--steps 100]`
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
from common import (
    VERBOSE_EVAL_K,
    eval_levels,
    experiment_args,
    output_dir,
    read_metrics,
    run_parallel,
    run_rl_job,
    verbose_sft,
    write_results,
)

RECIPE = "recipes/experiments/tldr-chain-verbose.yaml"


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="RL steps (default 100, quick 5)")
    p.add_argument("--lr", type=float, default=None, help="RL learning rate (default: the recipe's)")
    p.add_argument("--lam", type=float, default=None, help="TLDR λ (default: the recipe's)")
    p.add_argument("--samples", type=int, default=None, help="sampled completions per eval problem (default 4)")
    p.add_argument("--size", type=int, default=None, help="held-out problems (default 300, quick 60)")
    p.add_argument("--checks", choices=["suffix", "repeat"], default="suffix",
                   help="suffix: check lines re-do the last r steps; repeat: they restate the last step")
    p.add_argument("--no-control", action="store_true",
                   help="skip the control run: the same GRPO with the accuracy reward only (no length term)")


def main():
    args = experiment_args(__doc__.splitlines()[0], add_args)
    quick = args.quick
    out = output_dir("tldr" + ("" if args.checks == "suffix" else f"-{args.checks}"), args.out, quick)
    steps = args.steps or (5 if quick else 100)
    n_seeds = args.seeds or (1 if quick else 2)
    samples = args.samples or (2 if quick else 4)
    size = args.size or (60 if quick else 300)
    t0 = time.time()
    sft = verbose_sft(quick, args.checks)
    tag = "" if args.lr is None and args.lam is None else f"-lr{args.lr or 'r'}-lam{args.lam or 'r'}"
    jobs = []
    for seed in range(n_seeds):
        folder = out / f"rl{tag}-s{seed}"
        over = [f"output_dir={folder}", f"model.init={sft}", f"seed={seed}", f"rl.steps={steps}",
                f"rl.save_every={steps}", f"eval.every={max(1, steps // 5)}"]
        if args.lr is not None:
            over.append(f"rl.lr={args.lr}")
        if args.lam is not None:
            over.append(f"rl.rewards.length.lam={args.lam}")
        if quick:
            over.append("eval.size=50")
        if args.checks != "suffix":
            over += [f"train.options={{checks: {args.checks}}}", f"eval.options={{checks: {args.checks}}}"]
        jobs.append({"seed": seed, "folder": str(folder), "recipe": RECIPE, "overrides": over})
    if not args.no_control:  # same GRPO, accuracy reward only: how much shortening comes from accuracy alone?
        folder = out / f"control-acc-only{tag}-s0"
        over = [o for o in jobs[0]["overrides"] if not o.startswith("output_dir=")]
        jobs.append({"seed": 0, "control": True, "folder": str(folder), "recipe": RECIPE,
                     "overrides": [f"output_dir={folder}", *over, "rl.rewards={accuracy: 1.0, format: 0.0}"]})
    done = run_parallel(run_rl_job, jobs, args.jobs)

    from thinkling.tasks import get_task

    task = get_task("chain_verbose", checks=args.checks)
    problems = task.problems(size, 1, VERBOSE_EVAL_K)
    evals = {"SFT": eval_levels(sft, problems, task, samples=samples, max_new_tokens=160)}
    for j in done:
        name = f"GRPO acc-only s{j['seed']}" if j.get("control") else f"TLDR s{j['seed']}"
        evals[name] = eval_levels(Path(j["folder"]) / "final", problems, task, samples=samples, max_new_tokens=160)
    tldr_keys = [k for k in evals if k.startswith("TLDR")]
    mean = {lv: {key: sum(evals[k][lv][key] for k in tldr_keys) / len(tldr_keys)
                 for key in ("acc_greedy", "tokens_greedy", "acc_sampled", "tokens_sampled", "checks_sampled")}
            for lv in evals["SFT"]}
    evals[f"TLDR mean of {len(tldr_keys)}"] = mean
    rows = []
    sft_untagged = evals["SFT"]["none"]
    for name, ev in evals.items():
        for lv, e in ev.items():
            rows.append([name, lv, e["acc_greedy"], e["tokens_greedy"], e["acc_sampled"], e["tokens_sampled"],
                         1 - e["tokens_sampled"] / sft_untagged["tokens_sampled"], e["checks_sampled"]])
    minimal = evals["SFT"]["none"]["minimal_tokens"]
    results = {"sft": str(sft), "checks": args.checks, "recipe": RECIPE, "steps": steps, "lr": args.lr, "lam": args.lam, "size": size,
               "samples": samples, "minimal_tokens_mean": minimal, "evals": evals,
               "runs": [{"seed": j["seed"], "folder": j["folder"], "seconds": j["seconds"]} for j in done],
               "wall_s": time.time() - t0}
    header = ["model", "level", "acc greedy", "tokens greedy", "pass@1 sampled", "tokens sampled",
              "token cut vs SFT (sampled)", "check lines (sampled)"]
    print(write_results(out, f"TLDR on chain_verbose ({args.checks} checks) k={VERBOSE_EVAL_K} ({size} problems; {steps} RL steps; "
                             f"shortest correct completion {minimal:.1f} tokens)", header, rows, results,
                        name=f"results{tag}"))
    evals = {k: evals[k] for k in sorted(evals, key=lambda k: ("SFT" not in k, "acc-only" in k, k))}
    _plot(out / f"tldr{tag}.png", evals, minimal, [Path(j["folder"]) for j in done])
    print(f"wall time {time.time() - t0:.0f} s")


def _plot(path, evals, minimal, folders):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    markers = {"short": "v", "medium": "o", "long": "^", "none": "s"}
    for ax, mode in zip(axes[:2], ("greedy", "sampled")):
        for i, (name, ev) in enumerate(evals.items()):
            if name.startswith("TLDR s"):
                continue
            for lv, e in ev.items():
                ax.scatter(e[f"tokens_{mode}"], e[f"acc_{mode}"], color=f"C{i}", marker=markers[lv],
                           label=f"{name} [{lv}]")
        ax.axvline(minimal, color="grey", ls=":", lw=1, label="shortest correct")
        ax.set(xlabel="mean tokens", ylabel="accuracy" if mode == "greedy" else "pass@1 (T=1)", title=f"{mode}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    for f in folders:
        rows = [r for r in read_metrics(f) if "completion_len_mean" in r]
        axes[2].plot([r["step"] for r in rows], [r["completion_len_mean"] for r in rows], alpha=0.7, label=f"{f.name} length")
        axes[2].plot([r["step"] for r in rows], [100 * r["accuracy"] for r in rows], alpha=0.4, ls="--",
                     label=f"{f.name} train acc ×100")
    axes[2].set(xlabel="RL step", title="training rollouts (all levels)")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
