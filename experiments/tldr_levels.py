"""TLDR length levels on a task where a longer thinking budget buys accuracy (docs/methods.md#tldr).

On `chain_verbose` (experiments/tldr.py) every level gave the same length: nothing rewarded longer
thinking there. Here the task is strict `chain` (every line checked) and the SFT model learns one
trace style per length tag: `[short]` puts every operation on one line (`37+5-8+9=43`), `[medium]`
two operations per line (`37+5-8=34`, `34+9=43`; `--medium mix`: each operation joins the line
before with probability 0.5, the first version), `[long]` one operation per line (untagged prompts:
the random mix). Several operations on one line are what the tiny model gets wrong, so on 3-4-step
problems a longer trace is a more accurate one. TLDR GRPO
(recipes/experiments/tldr-chain-styles.yaml: budgets short < medium < long) then trades length
against accuracy per level. The claim tested: after TLDR the levels differ in tokens AND accuracy
rises with the level on the hard problems.

(The first version of this experiment used uninformative SFT tags and `merge: 0.5` traces on 4-6
steps: the SFT model was right on 6 % of the problems and RL shortened every level alike.)

`.venv/bin/python experiments/tldr_levels.py [--quick] [--seeds 2] [--steps 60] [--budgets 20 22 40] [--medium pairs|mix] [--untaught]`
"""

from __future__ import annotations

import time
from pathlib import Path

from common import (
    eval_levels,
    experiment_args,
    output_dir,
    run_parallel,
    run_rl_job,
    sft_tagged,
    write_results,
)

RECIPE = "recipes/experiments/tldr-chain-styles.yaml"
OPTIONS = {"merge": 0.5, "strict": True}
# The medium style: `pairs` (default) = exactly two operations per line, one length per k;
# `mix` (the first version) = each operation joins the line before with probability 0.5.
MEDIUM = {"pairs": {"merge": 0.0, "per_line": 2}, "mix": {"merge": 0.5}}


def styles(medium: str) -> dict:
    return {"short": {"merge": 1.0}, "medium": MEDIUM[medium], "long": {"merge": 0.0}}
SFT_K = [1, 2, 3, 4]
EVAL_K = [2, 3, 4]


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the recipe's 60, quick 4)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default 1500, quick 150)")
    p.add_argument("--size", type=int, default=None, help="held-out problems (default 300, quick 60)")
    p.add_argument("--budgets", type=int, nargs=3, default=None, metavar=("SHORT", "MEDIUM", "LONG"),
                   help="TLDR token budgets per level (default: the recipe's)")
    p.add_argument("--medium", choices=sorted(MEDIUM), default="pairs",
                   help="the [medium] trace style: pairs = two operations per line, mix = random joins (p = 0.5)")
    p.add_argument("--untaught", action="store_true",
                   help="SFT writes every style at random whatever the tag (tags uninformative): can TLDR alone split them?")


def main():
    args = experiment_args(__doc__.splitlines()[0], add_args)
    out = output_dir("tldr-levels", args.out, args.quick)
    steps = args.steps or (4 if args.quick else 60)
    seeds = args.seeds or (1 if args.quick else 2)
    samples = 2 if args.quick else 4
    size = args.size or (60 if args.quick else 300)
    sft_steps = args.sft_steps or (150 if args.quick else 1500)
    t0 = time.time()
    style_tag = "" if args.medium == "mix" else f"-{args.medium}"  # `mix` keeps the first version's folders
    sft_name = ("sft-untaught" if args.untaught else "sft") + style_tag
    sft = sft_tagged(out / sft_name, "chain", OPTIONS, SFT_K, steps=sft_steps, styles=styles(args.medium),
                     styles_follow_tag=not args.untaught)
    t_sft = time.time() - t0
    tag, extra = ("-untaught" if args.untaught else "") + style_tag, ["eval.size=40"] if args.quick else []
    if args.budgets:
        short, medium, long = args.budgets
        tag += f"-b{short}-{medium}-{long}"
        extra.append(f"rl.rewards.length.budgets={{short: {short}, medium: {medium}, long: {long}}}")
    jobs = [{"seed": s, "folder": str(out / f"rl{tag}-s{s}"), "recipe": RECIPE,
             "overrides": [f"output_dir={out / f'rl{tag}-s{s}'}", f"model.init={sft}", f"seed={s}", f"rl.steps={steps}",
                           f"rl.save_every={steps}", f"eval.every={max(1, steps // 3)}", *extra]} for s in range(seeds)]
    done = run_parallel(run_rl_job, jobs, args.jobs)

    from thinkling.tasks import get_task

    task = get_task("chain", **OPTIONS)
    problems = task.problems(size, 1, EVAL_K)
    evals = {name: eval_levels(path, problems, task, samples=samples, max_new_tokens=64)
             for name, path in [("SFT", sft), *[(f"TLDR s{j['seed']}", Path(j["folder"]) / "final") for j in done]]}
    rows = []
    for name, ev in evals.items():
        for lv, e in ev.items():
            by_k = e["by_difficulty"]
            rows.append([name, lv, e["tokens_greedy"], *[by_k[str(k)]["accuracy"] for k in EVAL_K], e["acc_greedy"],
                         e["tokens_sampled"], *[by_k[str(k)]["pass@1"] for k in EVAL_K]])
    tldr = [r for r in rows if r[0].startswith("TLDR s")]
    if len(done) > 1:  # the mean over seeds, per level
        for lv in evals["SFT"]:
            of_level = [r for r in tldr if r[1] == lv]
            rows.append([f"TLDR mean of {len(done)}", lv, *[sum(c) / len(c) for c in list(zip(*of_level))[2:]]])
    results = {"sft": str(sft), "styles": styles(args.medium), "medium": args.medium, "untaught": args.untaught, "recipe": RECIPE, "budgets": args.budgets, "steps": steps, "sft_steps": sft_steps, "size": size,
               "samples": samples, "evals": evals, "sft_seconds": t_sft,
               "runs": [{"seed": j["seed"], "folder": j["folder"], "seconds": j["seconds"]} for j in done],
               "wall_s": time.time() - t0}
    ks = [f"k={k}" for k in EVAL_K]
    header = ["model", "level", "tokens greedy", *[f"acc greedy {k}" for k in ks], "acc greedy all",
              "tokens sampled", *[f"pass@1 {k}" for k in ks]]
    print(write_results(out, f"TLDR levels on strict chain, {'random style per' if args.untaught else 'one trace style per'} SFT tag, k={EVAL_K} "
                             f"({size} problems; {sft_steps} SFT steps; {steps} RL steps{'; ' + tag[1:] if tag else ''})",
                        header, rows, results, name=f"results{tag}"))
    print(f"wall time {time.time() - t0:.0f} s (SFT {t_sft:.0f} s)")


if __name__ == "__main__":
    main()
