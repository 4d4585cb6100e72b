"""TLDR length levels on a task where a longer thinking budget buys accuracy (docs/methods.md#tldr).

On `chain_verbose` (experiments/tldr.py) every level gave the same length: nothing rewarded
longer thinking there. Here the task is `chain` with `merge: 0.5`: expert traces join operations
on one line at random (`37+5-8=34`), so one problem has traces of several lengths and the short
ones put more arithmetic on each line. SFT (1-step-per-line and merged traces mixed, prompts with
uninformative length tags) gives a model that writes either; TLDR GRPO with budgets short < medium
< long should then teach the tags: short prompts merge (fewer tokens), long prompts spell every
step out. The claim tested: the levels separate in tokens AND in accuracy (longer = more accurate).

`.venv/bin/python experiments/tldr_levels.py [--quick] [--seeds 1]`
"""

from __future__ import annotations

import time
from pathlib import Path

from common import eval_levels, experiment_args, output_dir, run_parallel, run_rl_job, sft_tagged, write_results

RECIPE = "recipes/experiments/tldr-chain-merge.yaml"
OPTIONS = {"merge": 0.5, "strict": True}

def main():
    args = experiment_args(__doc__.splitlines()[0])
    out = output_dir("tldr-levels", args.out, args.quick)
    steps, seeds, samples, size = (5, 1, 2, 60) if args.quick else (100, args.seeds or 1, 4, 300)
    t0 = time.time()
    sft = sft_tagged(out / "sft", "chain", OPTIONS, [2, 3, 4, 5, 6], steps=200 if args.quick else 1500)
    jobs = [{"seed": s, "folder": str(out / f"rl-s{s}"), "recipe": RECIPE,
             "overrides": [f"output_dir={out / f'rl-s{s}'}", f"model.init={sft}", f"seed={s}", f"rl.steps={steps}",
                           f"rl.save_every={steps}", f"eval.every={max(1, steps // 4)}"]} for s in range(seeds)]
    done = run_parallel(run_rl_job, jobs, args.jobs)

    from thinkling.tasks import get_task

    task = get_task("chain", **OPTIONS)
    problems = task.problems(size, 1, [4, 5, 6])
    evals = {name: eval_levels(path, problems, task, samples=samples, max_new_tokens=96)
             for name, path in [("SFT", sft), *[(f"TLDR s{j['seed']}", Path(j["folder"]) / "final") for j in done]]}
    rows = [[name, lv, e["acc_greedy"], e["tokens_greedy"], e["acc_sampled"], e["tokens_sampled"]]
            for name, ev in evals.items() for lv, e in ev.items()]
    results = {"sft": str(sft), "recipe": RECIPE, "steps": steps, "size": size, "samples": samples, "evals": evals,
               "runs": [{"seed": j["seed"], "folder": j["folder"], "seconds": j["seconds"]} for j in done],
               "wall_s": time.time() - t0}
    header = ["model", "level", "acc greedy", "tokens greedy", "pass@1 sampled", "tokens sampled"]
    print(write_results(out, f"TLDR levels on chain merge 0.5, strict, k=4-6 ({size} problems; {steps} RL steps)",
                        header, rows, results))
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
