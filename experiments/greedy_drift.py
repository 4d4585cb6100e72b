"""Why greedy accuracy slips while GRPO raises pass@1 on 4-step `chain` problems, and what does not fix it.

Reuses `quickstart_seeds.py`'s SFT checkpoint and its "GRPO 4-step" runs (lr 1e-4; trained first if
missing) and adds two one-change arms over the same seeds: a KL anchor to the starting policy
(`rl.beta=0.04`, k3) and half the learning rate (`rl.lr=5e-5`). Greedy accuracy on the in-training
eval set (200 problems) moves by one or two problems, so every final policy and the SFT start are
also evaluated greedy on 1,000 other 4-step problems (seed 5), and the problems whose greedy answer
flipped are counted both ways, with the SFT model's log-prob margin at its weakest token
(log p(right token) - max log p(other token)) before and after RL.

`.venv/bin/python experiments/greedy_drift.py [--seeds 3] [--jobs 2] [--quick] [--arms recipe]`
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from common import (
    evaluate_model,
    experiment_args,
    output_dir,
    run_parallel,
    run_rl_job,
    write_results,
)
from quickstart_seeds import quickstart_sft

from thinkling.models import load_policy
from thinkling.rollout.prompts import prompt_ids
from thinkling.tasks import get_task

RECIPE = "recipes/quickstart/grpo.yaml"
FOUR_STEP = ["train.difficulty=[4]", "eval.difficulty=[4]"]
ARMS = {"lr 1e-4 (recipe)": [], "beta 0.04": ["rl.beta=0.04"], "lr 5e-5": ["rl.lr=5.0e-5"]}


def weakest_margin(policy, problem, completion: str) -> float:
    """min over the completion's tokens of log p(token) - max log p(any other token)."""
    prompt = prompt_ids(policy, problem)
    ids = torch.tensor([prompt + policy.encode_text(completion)])
    with torch.no_grad():
        logp = policy.logits(ids, torch.ones_like(ids)).float().log_softmax(-1)[0, len(prompt) - 1 : -1]
    target = ids[0, len(prompt):]
    right = logp.gather(1, target[:, None])[:, 0]
    other = logp.scatter(1, target[:, None], float("-inf")).max(dim=1).values
    return float((right - other).min())


def greedy_rows(policy, task, problems, max_new_tokens: int) -> dict[str, dict]:
    from thinkling.config import EvalConfig
    from thinkling.eval.evaluate import evaluate
    from thinkling.rollout.stopping import make_stop_processor

    cfg = EvalConfig(max_new_tokens=max_new_tokens, samples=1, temperature=1.0, batch_size=256)
    _, rows = evaluate(policy, task, problems, cfg, seed=0, stop_processor=make_stop_processor(policy, task))
    return {r["id"]: r for r in rows if r["mode"] == "greedy"}


def main():
    args = experiment_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--arms", default="all", choices=["all", "recipe"], help="recipe: only the recipe's runs (no extra training)"))
    arms = ARMS if args.arms == "all" else {k: v for k, v in ARMS.items() if not v}
    base = output_dir("quickstart-seeds", None, args.quick)  # the SFT and lr 1e-4 runs live there
    out = output_dir("greedy-drift", args.out, args.quick)
    seeds = args.seeds or (1 if args.quick else 3)
    sft, small = quickstart_sft(base, args.quick)
    jobs = []
    for s in range(seeds):
        for arm, extra in arms.items():
            folder = base / f"grpo-4-step-s{s}" if not extra else out / f"{arm.replace(' ', '-')}-s{s}"
            jobs.append({"arm": arm, "seed": s, "folder": folder, "recipe": RECIPE,
                         "overrides": [f"output_dir={folder}", f"model.init={sft / 'final'}", f"seed={s}", *FOUR_STEP,
                                       *extra, *small]})
    run_parallel(run_rl_job, jobs, args.jobs)

    task = get_task("chain", strict=True)
    problems = task.problems(100 if args.quick else 1000, 5, difficulty=[4])
    by_id = {p.id: p for p in problems}
    start = load_policy(sft / "final")
    torch.set_num_threads(1)
    start_rows = greedy_rows(start, task, problems, 80)
    start_acc = statistics.mean(r["correct"] for r in start_rows.values())
    results, table = {"start_greedy_1000": start_acc}, []
    for arm in arms:
        runs = []
        for job in (j for j in jobs if j["arm"] == arm):
            policy = load_policy(Path(job["folder"]) / "final")
            end_rows = greedy_rows(policy, task, problems, 80)
            lost = [i for i in start_rows if start_rows[i]["correct"] and not end_rows[i]["correct"]]
            won = [i for i in start_rows if not start_rows[i]["correct"] and end_rows[i]["correct"]]
            margins = [(weakest_margin(start, by_id[i], start_rows[i]["completion"]),
                        weakest_margin(policy, by_id[i], start_rows[i]["completion"])) for i in lost]
            pass1 = evaluate_model(policy, task, problems[:200], max_new_tokens=80, samples=4)["pass@1"]
            runs.append({"seed": job["seed"], "greedy": statistics.mean(r["correct"] for r in end_rows.values()),
                         "lost": len(lost), "won": len(won), "pass@1_200": pass1,
                         "lost_margin_start": statistics.median(m[0] for m in margins) if margins else None,
                         "lost_margin_end": statistics.median(m[1] for m in margins) if margins else None})
        results[arm] = runs
        fmt = lambda key: " / ".join("-" if r[key] is None else f"{r[key]:.3f}" for r in runs)  # noqa: E731
        table.append([arm, len(runs), f"{start_acc:.3f}", fmt("greedy"), " / ".join(f"{r['lost']}/{r['won']}" for r in runs),
                      fmt("lost_margin_start"), fmt("lost_margin_end"), fmt("pass@1_200")])
    header = ["arm", "seeds", "greedy start (1,000)", "greedy end, per seed", "flips right->wrong / wrong->right",
              "lost problems' weakest margin at start (nats, median)", "same after RL", "pass@1 end (200, 4 samples)"]
    print(write_results(out, "Greedy drift under GRPO on 4-step chain problems", header, table, results))


if __name__ == "__main__":
    main()
