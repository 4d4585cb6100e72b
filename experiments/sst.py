"""SST on the tiny model: plain SFT vs structured-solution-template SFT, same budget (docs/sst.md).

Three SFT runs per seed, identical model, data draw, steps, batch and learning rate:
- `plain`:      chain expert traces (recipes/sst/sft-plain.yaml);
- `sst`:        `<plan>` + steps + answer, plan and step-boundary tokens weighted 2x annealed to 1x
                (recipes/sst/sft-sst.yaml);
- `sst-inject`: `sst` whose train and eval prompts start with the retrieved template
                (recipes/sst/sft-sst-inject.yaml);
- `template-only`: `sst` with weight 1 everywhere (the plan without the weighted loss);
- `sst-check`:  `sst` where 30 % of the traces slip once and fix it in a `<check>` line (the S2R
                pipeline's SFT stage, recipes/sst/s2r-pipeline.yaml).
Training uses 1-4-step problems; every model is tested on held-out 2, 4, 6 and 8-step problems
(strict: every step must be right), once with plain prompts and once with the template injected,
greedy. Reported: accuracy by difficulty (mean and min-max over seeds) and generated tokens per
solution.

With `--s2r`, the S2R comparison: the RL stage of recipes/sst/s2r-pipeline.yaml (outcome-reward GRPO)
from the `sst-check` model and, as the control, from the `sst` model of the same seed.

`python experiments/sst.py [--quick] [--seeds 2] [--steps 1000] [--conditions plain,sst] [--s2r]`
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import experiment_args, output_dir, run_recipe, write_results

CONDITIONS = {"plain": ("recipes/sst/sft-plain.yaml", []), "sst": ("recipes/sst/sft-sst.yaml", []),
              "sst-inject": ("recipes/sst/sft-sst-inject.yaml", []),
              "template-only": ("recipes/sst/sft-sst.yaml", ["sft.template_weight=1.0"]),
              "sst-check": ("recipes/sst/sft-sst.yaml", ["train.options={template: true, self_correct: 0.3}"])}
TEST_K = [2, 4, 6, 8]


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default 500, quick 20)")
    p.add_argument("--size", type=int, default=200, help="held-out problems per evaluation (all difficulties)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--s2r", action="store_true", help="GRPO (S2R stage 2) from the sst-check and sst models")
    p.add_argument("--rl-steps", type=int, default=None, help="GRPO steps for --s2r (default: the recipe's)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of SFT conditions to run")


def model_overrides(quick: bool) -> list[str]:
    """A small model and batch so that one run takes minutes on one thread."""
    return ["model.tiny={d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 224}", "sft.batch_size=64",
            "sft.log_every=25"]


def evaluate(model: Path, inject: str, size: int, seed: int, out: Path) -> dict:
    from thinkling.config import EvalConfig
    from thinkling.jobs import run_eval

    if out.exists():
        return json.loads(out.read_text())
    cfg = EvalConfig(name="chain", options={"strict": True}, size=size, difficulty=TEST_K, seed=1,
                     max_new_tokens=128, inject_template=inject)
    cfg.validate("eval")
    return run_eval(str(model), cfg, str(out), seed=seed)


def grpo_from(model: Path, run: Path, seed: int, steps: int | None, quick: bool) -> None:
    """The RL stage of the S2R pipeline recipe, started from `model` (skipped when already done)."""
    import dataclasses

    from thinkling import jobs
    from thinkling.config import load_yaml
    from thinkling.pipeline import stage_configs

    if (run / "final" / "policy.json").exists():
        return
    _, _, cfg = stage_configs(load_yaml("recipes/sst/s2r-pipeline.yaml"))[1]
    rl = dataclasses.replace(cfg.rl, steps=2 if quick else (steps or cfg.rl.steps))
    cfg = dataclasses.replace(cfg, output_dir=str(run), seed=seed, rl=rl,
                              model=dataclasses.replace(cfg.model, init=str(model)),
                              eval=dataclasses.replace(cfg.eval, size=8))
    jobs.run_rl(cfg, resume=run.exists() and any(run.iterdir()))


def check_stats(rows_file: Path) -> dict:
    """How often greedy completions write a `<check>` line, and how often such a completion is right."""
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()[1:] if line.strip()]
    rows = [r for r in rows if r["mode"] == "greedy"]
    checked = [r for r in rows if "<check>" in r["completion"]]
    return {"check_rate": len(checked) / max(1, len(rows)),
            "check_correct": sum(r["correct"] for r in checked) / len(checked) if checked else None}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _mean_or_dash(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.1f}" if values else "-"


def main():
    args = experiment_args("SST vs plain SFT on chain", add_args)
    out = output_dir("sst", args.out, args.quick)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 2))))
    steps = args.steps or (20 if args.quick else 1000)
    conditions = {name: CONDITIONS[name] for name in args.conditions.split(",")}
    size = 40 if args.quick else args.size
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": {}}
    results.update({"steps": steps, "size": size})
    for seed in seeds:
        for name, (recipe, extra) in conditions.items():
            run = out / f"{name}-s{seed}"
            t0 = time.time()
            # the run's own final evaluation is a small smoke check; the two below are the measurement
            run_recipe("sft", recipe, [f"output_dir={run}", f"seed={seed}", f"sft.steps={steps}", "eval.size=8",
                                       *model_overrides(args.quick), *extra])
            train_s = time.time() - t0
            for inject in ("none", "tag"):
                summary = evaluate(run / "final", inject, size, seed, out / f"eval-{name}-s{seed}-{inject}.json")
                checks = check_stats(out / f"eval-{name}-s{seed}-{inject}.jsonl")
                results["runs"][f"{name}/s{seed}/{inject}"] = {**checks,
                    "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
                    "mean_tokens_correct": summary["mean_tokens_correct"],
                    "by_difficulty": {str(int(float(d))): e["accuracy"] for d, e in summary["by_difficulty"].items()},
                    "train_seconds": train_s}
            results_file.write_text(json.dumps(results, indent=2))
    if args.s2r:
        for seed in seeds:
            for start in ("sst-check", "sst"):
                run = out / f"grpo-from-{start}-s{seed}"
                t0 = time.time()
                grpo_from(out / f"{start}-s{seed}" / "final", run, seed, args.rl_steps, args.quick)
                rl_s = time.time() - t0
                summary = evaluate(run / "final", "none", size, seed, out / f"eval-grpo-{start}-s{seed}-none.json")
                results["runs"][f"grpo<-{start}/s{seed}/none"] = {
                    **check_stats(out / f"eval-grpo-{start}-s{seed}-none.jsonl"),
                    "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
                    "mean_tokens_correct": summary["mean_tokens_correct"],
                    "by_difficulty": {str(int(float(d))): e["accuracy"] for d, e in summary["by_difficulty"].items()},
                    "train_seconds": rl_s}
                results_file.write_text(json.dumps(results, indent=2))
    header = ["SFT", "test prompt", *[f"k={k}" for k in TEST_K], "all", "tokens / solution", "tokens (correct)",
              "with <check>"]
    rows = []
    for name in [*CONDITIONS, "grpo<-sst", "grpo<-sst-check"]:  # every condition run so far, with its seeds
        for inject in ("none", "tag"):
            runs = [results["runs"][key] for s in range(10) if (key := f"{name}/s{s}/{inject}") in results["runs"]]
            if not runs:
                continue
            rows.append([name, "template injected" if inject == "tag" else "plain",
                         *[spread([r["by_difficulty"][str(k)] for r in runs]) for k in TEST_K],
                         spread([r["accuracy"] for r in runs]),
                         f"{statistics.mean(r['mean_tokens'] for r in runs):.1f}",
                         _mean_or_dash([r["mean_tokens_correct"] if r["accuracy"] > 0 else None for r in runs]),
                         f"{statistics.mean(r['check_rate'] for r in runs):.2f}"])
    title = (f"chain, trained on k=1-4, {steps} SFT steps x 64: held-out greedy strict accuracy, "
             f"mean (min-max) over seeds, {size} problems per evaluation")
    header.insert(1, "seeds")
    for row in rows:
        name, inject = row[0], "tag" if row[1] == "template injected" else "none"
        row.insert(1, sum(f"{name}/s{s}/{inject}" in results["runs"] for s in range(10)))
    print(write_results(out, title, header, rows, results))


if __name__ == "__main__":
    main()
