"""Experiment 1: BREAD vs GRPO from the same SFT checkpoint (claim of arXiv 2506.17211; docs/methods.md#bread).

One light SFT on 1-8-step `chain` problems (recipes/experiments/light-sft.yaml, shared by every run), then
GRPO and BREAD on hard problems with the same RL seeds, prompts, G and steps. Measured per run:
held-out greedy accuracy every `--eval-every` steps, against RL steps and against generated tokens
(BREAD's probe generations included, see `common.count_all_bread_probes`); steps and tokens BREAD
needs to reach GRPO's final accuracy; BREAD's expert-token fraction (claim: < 40 %) and the share of
groups that needed an anchor. Main setting: difficulty 6, lr 1e-4, 3 seeds; exploration (1 seed):
difficulty 4 and lr 3e-4.

`.venv/bin/python experiments/bread_vs_grpo.py [--quick] [--seeds 3] [--steps 100] [--no-explore]`
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
from common import (
    ensure_sft,
    eval_curve,
    experiment_args,
    last_metric,
    output_dir,
    reach,
    read_metrics,
    run_parallel,
    run_recipe,
    write_results,
)

RECIPES = {"GRPO": "recipes/experiments/light-grpo.yaml", "BREAD": "recipes/experiments/light-bread.yaml"}


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 100, quick 6)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--no-explore", action="store_true", help="only the main setting")
    p.add_argument("--fresh", type=int, default=None,
                   help="re-evaluate SFT and every final policy on this many fresh problems (seed 7; default 600, quick 50)")
    p.add_argument("--regime", choices=["quickstart", "rewrite"], default="quickstart",
                   help="quickstart: light SFT on 1-8-step equation traces (recipes/experiments/light-*.yaml); rewrite: SFT on "
                        "1-4-step rewrite traces (recipes/experiments/sft-chain-rewrite.yaml), RL on 6 steps")


def one_run(job: dict) -> dict:
    t0 = time.time()
    run_recipe("rl", RECIPES[job["method"]], job["overrides"])
    return {**job, "seconds": time.time() - t0}


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    n = min(len(c) for c in curves)
    return [{"step": curves[0][i]["step"],
             "accuracy": sum(c[i]["accuracy"] for c in curves) / len(curves),
             "tokens": sum(c[i]["tokens"] for c in curves) / len(curves)} for i in range(n)]


def main():
    args = experiment_args(__doc__.splitlines()[0], add_args)
    rewrite = args.regime == "rewrite"
    out = output_dir("bread-vs-grpo" + ("-rewrite" if rewrite else ""), args.out, args.quick)
    quick = args.quick
    steps = args.steps or (6 if quick else 100)
    every = args.eval_every or (3 if quick else 10)
    eval_size = args.eval_size or (50 if quick else 200)
    n_seeds = args.seeds or (1 if quick else 3)
    extra = []
    if rewrite:
        sft = ensure_sft(out.parent / ("sft-chain-rewrite" + ("-quick" if quick else "")),
                         "recipes/experiments/sft-chain-rewrite.yaml", ["sft.steps=100"] if quick else [])
        extra = ["train.options={trace: rewrite}", "eval.options={trace: rewrite}", "rl.max_new_tokens=128",
                 "eval.max_new_tokens=128"]
    else:
        sft = ensure_sft(out.parent / "sft-chain")  # the quick-start SFT, shared with the other experiments
    settings = [{"name": "d6-lr1e-4", "difficulty": 6, "lr": 1e-4, "seeds": list(range(n_seeds))}]
    if rewrite and not args.no_explore and not quick:
        settings += [{"name": "d6-lr3e-4", "difficulty": 6, "lr": 3e-4, "seeds": [0]}]
    elif not args.no_explore and not quick:
        settings += [{"name": "d4-lr1e-4", "difficulty": 4, "lr": 1e-4, "seeds": [0]},
                     {"name": "d6-lr3e-4", "difficulty": 6, "lr": 3e-4, "seeds": [0]}]
    jobs = []
    for s in settings:
        for seed in s["seeds"]:
            for method in RECIPES:
                folder = out / s["name"] / f"{method.lower()}-s{seed}"
                jobs.append({"setting": s["name"], "method": method, "seed": seed, "folder": str(folder),
                             "overrides": [f"output_dir={folder}", f"model.init={sft}", f"seed={seed}",
                                           f"rl.lr={s['lr']}", f"rl.steps={steps}", f"train.difficulty=[{s['difficulty']}]",
                                           f"eval.difficulty=[{s['difficulty']}]", f"eval.size={eval_size}",
                                           f"eval.every={every}", f"rl.save_every={steps}",
                                           "rl.samples_every=0", *extra]})
    t0 = time.time()
    done = run_parallel(one_run, jobs, args.jobs)
    wall = time.time() - t0
    if all(j["seconds"] < 5 for j in done):  # every run was reused: keep the wall time of the run that made them
        previous = out / "results.json"
        if previous.exists():
            wall = json.loads(previous.read_text()).get("wall_s", wall)

    results = {"sft": str(sft), "steps": steps, "eval_every": every, "eval_size": eval_size, "wall_s": wall,
               "settings": {}}
    rows = []
    for s in settings:
        runs = {m: [j for j in done if j["setting"] == s["name"] and j["method"] == m] for m in RECIPES}
        curves = {m: [eval_curve(Path(j["folder"])) for j in runs[m]] for m in RECIPES}
        mean = {m: mean_curve(curves[m]) for m in RECIPES}
        target = mean["GRPO"][-1]["accuracy"]
        hit = {m: reach(mean[m], target) for m in RECIPES}
        per_seed = []
        for jg, jb, cg, cb in zip(runs["GRPO"], runs["BREAD"], curves["GRPO"], curves["BREAD"]):
            t = cg[-1]["accuracy"]
            hg, hb = reach(cg, t), reach(cb, t)
            bfolder = Path(jb["folder"])
            per_seed.append({
                "seed": jg["seed"], "grpo_final": t, "bread_final": cb[-1]["accuracy"], "start": cg[0]["accuracy"],
                "grpo_steps_to_target": hg["step"], "grpo_tokens_to_target": hg["tokens"],
                "bread_steps_to_target": hb and hb["step"], "bread_tokens_to_target": hb and hb["tokens"],
                "grpo_total_tokens": cg[-1]["tokens"], "bread_total_tokens": cb[-1]["tokens"],
                "bread_expert_token_fraction": last_metric(bfolder, "bread/expert_token_fraction"),
                "bread_expert_token_fraction_anchored": last_metric(bfolder, "bread/expert_token_fraction_anchored"),
                "bread_anchored_share": _share(bfolder, "bread/anchored", "groups_sampled"),
                "bread_dropped_unsolved_share": _share(bfolder, "bread/dropped_unsolved", "groups_sampled"),
                "grpo_skipped_updates": _sum(Path(jg["folder"]), "skipped_update"),
                "bread_skipped_updates": _sum(bfolder, "skipped_update"),
                "seconds": {"GRPO": jg["seconds"], "BREAD": jb["seconds"]},
            })
        entry = {"difficulty": s["difficulty"], "lr": s["lr"], "seeds": s["seeds"], "curves": curves, "mean": mean,
                 "target_grpo_final_mean": target,
                 "reach": {m: hit[m] for m in RECIPES}, "per_seed": per_seed}
        results["settings"][s["name"]] = entry
        hb, hg = hit["BREAD"], hit["GRPO"]
        frac = sum(p["bread_expert_token_fraction"] or 0 for p in per_seed) / len(per_seed)
        frac_a = sum(p["bread_expert_token_fraction_anchored"] or 0 for p in per_seed) / len(per_seed)
        entry["last3"] = {m: sum(p["accuracy"] for p in mean[m][-3:]) / len(mean[m][-3:]) for m in RECIPES}
        entry["best"] = {m: max(p["accuracy"] for p in mean[m][1:]) for m in RECIPES}
        rows.append([s["name"], len(s["seeds"]), mean["GRPO"][0]["accuracy"], target, mean["BREAD"][-1]["accuracy"],
                     entry["last3"]["GRPO"], entry["last3"]["BREAD"],
                     "yes" if target > mean["GRPO"][0]["accuracy"] else "no",
                     f"{hg['step']} / {hb['step'] if hb else '-'}",
                     f"{hg['tokens'] / 1e3:.0f}k / {hb['tokens'] / 1e3:.0f}k" if hb else f"{hg['tokens'] / 1e3:.0f}k / -",
                     f"{mean['GRPO'][-1]['tokens'] / 1e3:.0f}k / {mean['BREAD'][-1]['tokens'] / 1e3:.0f}k",
                     frac, frac_a])
        _plot(out / f"{s['name']}.png", s, curves, mean, target)

    # Re-check on a fresh, larger problem set (the in-training eval set is reused at every eval point).
    fresh_n = args.fresh or (50 if quick else 600)
    fresh = _fresh_eval(sft, [j for j in done], settings, fresh_n, 128 if rewrite else 64,
                        {"trace": "rewrite"} if rewrite else {})
    results["fresh"] = fresh
    fresh_rows = [[name, e["sft"]] + [e[m]["mean"] for m in RECIPES] + [" / ".join(f"{v:.3f}" for v in e[m]["per_seed"])
                                                                         for m in RECIPES]
                  for name, e in fresh.items()]
    header = ["setting", "seeds", "acc @0", "GRPO final", "BREAD final", "GRPO last-3 evals", "BREAD last-3 evals",
              "GRPO improved on start?", "steps to GRPO final (GRPO/BREAD)",
              "tokens to GRPO final (GRPO/BREAD)", "total tokens (GRPO/BREAD)", "expert-token frac (all)",
              "expert-token frac (anchored)"]
    seed_rows = [[name, p["seed"], p["start"], p["grpo_final"], p["bread_final"],
                  f"{p['grpo_steps_to_target']} / {p['bread_steps_to_target']}",
                  f"{p['grpo_tokens_to_target'] / 1e3:.0f}k / " + (f"{p['bread_tokens_to_target'] / 1e3:.0f}k" if p["bread_tokens_to_target"] is not None else "-"),
                  p["bread_expert_token_fraction"] or 0.0, p["bread_anchored_share"], p["bread_dropped_unsolved_share"]]
                 for name, e in results["settings"].items() for p in e["per_seed"]]
    print(write_results(out, f"BREAD vs GRPO on chain ({steps} RL steps × 16 prompts × G=8; greedy accuracy on "
                             f"{eval_size} held-out problems; seed means)", header, rows, results))
    print(write_results(out, "Per seed (target = that seed's GRPO final accuracy)",
                        ["setting", "seed", "acc @0", "GRPO final", "BREAD final", "steps to target (GRPO/BREAD)",
                         "tokens to target (GRPO/BREAD)", "expert-token frac", "anchored share of groups",
                         "dropped unsolved share"], seed_rows, {}, name="per_seed"))
    print(write_results(out, f"Re-check: greedy accuracy on {fresh_n} fresh problems (seed 7) of the same difficulty",
                        ["setting", "SFT", "GRPO mean", "BREAD mean", "GRPO per seed", "BREAD per seed"], fresh_rows, {},
                        name="fresh"))
    print(f"wall time {wall:.0f} s; plots in {out}")


def _fresh_eval(sft, done, settings, n, max_new, options):
    from thinkling.models import load_policy
    from thinkling.models.base import SamplingParams
    from thinkling.rollout.scoring import complete
    from thinkling.tasks import get_task

    task = get_task("chain", **options)

    def acc(path, problems):
        comps = complete(load_policy(path), task, problems, SamplingParams(max_new, 0.0))
        return sum(c.correct for c in comps) / len(comps)

    out = {}
    for s in settings:
        problems = task.problems(n, 7, [s["difficulty"]])
        e = {"sft": acc(sft, problems)}
        for m in RECIPES:
            per = [acc(Path(j["folder"]) / "final", problems) for j in done if j["setting"] == s["name"] and j["method"] == m]
            e[m] = {"per_seed": per, "mean": sum(per) / len(per)}
        out[s["name"]] = e
    return out


def _share(folder: Path, key: str, denom: str) -> float:
    rows = read_metrics(folder)
    num = sum(r.get(key, 0) for r in rows if denom in r)
    den = sum(r.get(denom, 0) for r in rows)
    return num / den if den else 0.0


def _sum(folder: Path, key: str) -> int:
    return int(sum(r.get(key, 0) for r in read_metrics(folder) if "eval/accuracy" not in r))


def _plot(path: Path, s: dict, curves: dict, mean: dict, target: float) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(curves):
        for c in curves[m]:
            axes[0].plot([p["step"] for p in c], [p["accuracy"] for p in c], color=f"C{i}", alpha=0.25)
            axes[1].plot([p["tokens"] / 1e3 for p in c], [p["accuracy"] for p in c], color=f"C{i}", alpha=0.25)
        axes[0].plot([p["step"] for p in mean[m]], [p["accuracy"] for p in mean[m]], color=f"C{i}", marker="o",
                     label=f"{m} (mean of {len(curves[m])})")
        axes[1].plot([p["tokens"] / 1e3 for p in mean[m]], [p["accuracy"] for p in mean[m]], color=f"C{i}",
                     marker="o", label=m)
    for ax, xl in zip(axes, ("RL step", "generated tokens (k), BREAD probes included")):
        ax.axhline(target, color="grey", ls=":", lw=1, label="GRPO final (mean)")
        ax.set(xlabel=xl, ylabel="greedy accuracy (held-out)", title=f"chain k={s['difficulty']}, lr {s['lr']:g}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
