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

Every evaluation also samples `--samples` completions per problem at temperature 1 (pass@1), and
counts what the `<check>` lines did (`tasks.chain.check_outcomes`): how many completions write one,
and how many checks follow a wrong step line and fix it.

With `--s2r`, the S2R comparison: the RL stage of recipes/sst/s2r-pipeline.yaml (outcome-reward GRPO)
from the `sst-check` model and, as controls, from the other SFT models of the same seed
(`--s2r-from`, default `sst-check,sst`), evaluated as above.

`python experiments/sst.py [--quick] [--seeds 2] [--steps 1000] [--conditions plain,sst] [--s2r]`
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

from common import experiment_args, output_dir, run_recipe, write_results

from thinkling.eval.report import markdown_table
from thinkling.tasks import get_task
from thinkling.tasks.chain import check_outcomes

CONDITIONS = {"plain": ("recipes/sst/sft-plain.yaml", []), "sst": ("recipes/sst/sft-sst.yaml", []),
              "sst-inject": ("recipes/sst/sft-sst-inject.yaml", []),
              "template-only": ("recipes/sst/sft-sst.yaml", ["sft.template_weight=1.0"]),
              "sst-check": ("recipes/sst/sft-sst.yaml", ["train.options={template: true, self_correct: 0.3}"])}
TEST_K = [2, 4, 6, 8]


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default 1000, quick 20)")
    p.add_argument("--size", type=int, default=200, help="held-out problems per evaluation (all difficulties)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--s2r", action="store_true", help="GRPO (S2R stage 2) from the sst-check and sst models")
    p.add_argument("--rl-steps", type=int, default=None, help="GRPO steps for --s2r (default: the recipe's)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of SFT conditions to run")
    p.add_argument("--s2r-from", default="sst-check,sst", help="SFT conditions that --s2r runs GRPO from")
    p.add_argument("--prompts", default="none,tag", help="test prompts of the SFT models: none (plain), tag (injected)")
    p.add_argument("--init", default=None, help="SFT from this saved policy instead of a fresh small model")
    p.add_argument("--samples", type=int, default=4, help="sampled completions per problem (pass@1), temperature 1")


def model_overrides(init: str | None) -> list[str]:
    """A small fresh model and batch so that one run takes minutes on one thread; with `init`, SFT
    goes on from that saved policy instead (its own size), with a short warm-up."""
    if init:
        return [f"model.init={init}", "sft.batch_size=64", "sft.log_every=25", "sft.warmup_steps=10"]
    return ["model.tiny={d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 224}", "sft.batch_size=64",
            "sft.log_every=25"]


def evaluate(model: Path, inject: str, size: int, seed: int, out: Path, samples: int) -> dict:
    from thinkling.config import EvalConfig
    from thinkling.jobs import run_eval

    if out.exists():
        return json.loads(out.read_text())
    cfg = EvalConfig(name="chain", options={"strict": True}, size=size, difficulty=TEST_K, seed=1,
                     max_new_tokens=128, inject_template=inject, samples=samples, temperature=1.0)
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
    """What the `<check>` lines did, over the greedy and over the sampled completions: the share of
    completions with one, and `tasks.chain.check_outcomes` summed (checks, fixed, wrong lines, ...),
    each line judged against its problem (the eval's problems, rebuilt from the file's settings)."""
    lines = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    settings, rows = lines[0]["settings"], lines[1:]
    problems = {p.id: p for p in get_task("chain").problems(settings["size"], seed=settings["seed"],
                                                            difficulty=settings["difficulty"])}
    out = {}
    for mode, picked in (("greedy", [r for r in rows if r["mode"] == "greedy"]),
                         ("sampled", [r for r in rows if r["mode"] != "greedy"])):
        total = Counter()
        for r in picked:
            total.update(check_outcomes(r["completion"], problems[r["id"]]))
        out[mode] = {"completions": len(picked), "with_check": sum("<check>" in r["completion"] for r in picked),
                     **total}
    out["check_rate"] = out["greedy"]["with_check"] / max(1, out["greedy"]["completions"])
    return out


def record(summary: dict, rows_file: Path, seconds: float, before: dict | None) -> dict:
    """One evaluation as results.json keeps it; a rerun that skipped training keeps the first run's time."""
    by_k = summary["by_difficulty"]
    return {**check_stats(rows_file), "accuracy": summary["accuracy"], "pass@1": summary.get("pass@1"),
            "mean_tokens": summary["mean_tokens"], "mean_tokens_correct": summary["mean_tokens_correct"],
            "by_difficulty": {str(int(float(d))): e["accuracy"] for d, e in by_k.items()},
            "pass1_by_difficulty": {str(int(float(d))): e.get("pass@1") for d, e in by_k.items()},
            "train_seconds": before["train_seconds"] if before and seconds < 5 else seconds}


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
    if args.init:  # the starting policy, tested the same way (its pass@1 from seed 0's samples)
        key, file = "start/s0/none", out / "eval-start-s0-none.json"
        summary = evaluate(Path(args.init), "none", size, 0, file, args.samples)
        results["runs"][key] = record(summary, file.with_suffix(".jsonl"), 0.0, None)
    for seed in seeds:
        for name, (recipe, extra) in conditions.items():
            run = out / f"{name}-s{seed}"
            t0 = time.time()
            # the run's own final evaluation is a small smoke check; the two below are the measurement
            run_recipe("sft", recipe, [f"output_dir={run}", f"seed={seed}", f"sft.steps={steps}", "eval.size=8",
                                       *model_overrides(args.init), *extra])
            train_s = time.time() - t0
            for inject in args.prompts.split(","):
                key, file = f"{name}/s{seed}/{inject}", out / f"eval-{name}-s{seed}-{inject}.json"
                summary = evaluate(run / "final", inject, size, seed, file, args.samples)
                results["runs"][key] = record(summary, file.with_suffix(".jsonl"), train_s, results["runs"].get(key))
            results_file.write_text(json.dumps(results, indent=2))
    if args.s2r:
        for seed in seeds:
            for start in args.s2r_from.split(","):
                run = out / f"grpo-from-{start}-s{seed}"
                t0 = time.time()
                grpo_from(out / f"{start}-s{seed}" / "final", run, seed, args.rl_steps, args.quick)
                rl_s = time.time() - t0
                key, file = f"grpo<-{start}/s{seed}/none", out / f"eval-grpo-{start}-s{seed}-none.json"
                summary = evaluate(run / "final", "none", size, seed, file, args.samples)
                results["runs"][key] = record(summary, file.with_suffix(".jsonl"), rl_s, results["runs"].get(key))
                results_file.write_text(json.dumps(results, indent=2))
    names = ["start", *CONDITIONS, *[f"grpo<-{c}" for c in CONDITIONS]]
    header = ["model", "seeds", "test prompt", *[f"k={k}" for k in TEST_K], "all", "pass@1 (all)", "tokens / solution",
              "tokens (correct)", "with <check>"]
    rows = []
    for name in names:  # every condition run so far, with its seeds
        for inject in ("none", "tag"):
            runs = seed_runs(results, name, inject)
            if not runs:
                continue
            rows.append([name, len(runs), "template injected" if inject == "tag" else "plain",
                         *[spread([r["by_difficulty"][str(k)] for r in runs]) for k in TEST_K],
                         spread([r["accuracy"] for r in runs]), spread_or_dash([r.get("pass@1") for r in runs]),
                         f"{statistics.mean(r['mean_tokens'] for r in runs):.1f}",
                         _mean_or_dash([r["mean_tokens_correct"] if r["accuracy"] > 0 else None for r in runs]),
                         f"{statistics.mean(r['check_rate'] for r in runs):.2f}"])
    title = (f"chain, trained on k=1-4, {steps} SFT steps x 64: held-out greedy strict accuracy, "
             f"mean (min-max) over seeds, {size} problems per evaluation")
    tables = [write_results(out, title, header, rows, results)]
    tables.append(pass_table(results, names, size, args.samples))
    tables.append(check_table(results, names))
    tables.append(seed_table(results, names))
    (out / "results.md").write_text("\n".join(tables))
    print("\n".join(tables))


def seed_runs(results: dict, name: str, inject: str) -> list[dict]:
    return [results["runs"][key] for s in range(10) if (key := f"{name}/s{s}/{inject}") in results["runs"]]


def spread_or_dash(values) -> str:
    values = [v for v in values if v is not None]
    return spread(values) if values else "-"


def pass_table(results: dict, names: list[str], size: int, samples: int) -> str:
    """Sampled pass@1 by difficulty (plain prompts), mean (min-max) over seeds."""
    rows = []
    for name in names:
        runs = [r for r in seed_runs(results, name, "none") if r.get("pass@1") is not None]
        if runs:
            rows.append([name, len(runs), *[spread([r["pass1_by_difficulty"][str(k)] for r in runs]) for k in TEST_K],
                         spread([r["pass@1"] for r in runs])])
    header = ["model", "seeds", *[f"k={k}" for k in TEST_K], "all"]
    return (f"## pass@1 ({samples} samples per problem, temperature 1, strict), plain prompts, {size} problems\n\n"
            f"{markdown_table(header, rows)}\n")


def check_table(results: dict, names: list[str]) -> str:
    """What the `<check>` lines did (plain prompts, all seeds summed): completions with a check, and
    checks after a wrong line that fix it / do not, checks after a right line, wrong lines with no check."""
    rows = []
    for name in names:
        runs = seed_runs(results, name, "none")
        for mode in ("greedy", "sampled"):
            t = Counter()
            for r in runs:
                t.update({k: v for k, v in r.get(mode, {}).items() if isinstance(v, int)})
            if not t["completions"]:
                continue
            rows.append([name, mode, t["completions"], f"{t['with_check'] / t['completions']:.3f}", t["checks"],
                         t["fixed"], t["not_fixed"], t["unneeded"], t["broke"], t["wrong"], t["missed"]])
    header = ["model", "decoding", "completions", "share with <check>", "checks", "fix a wrong line", "after a wrong line, no fix",
              "after a right line", "(of those, break it)", "wrong step lines", "wrong lines never checked"]
    return f"## <check> lines, plain prompts, all seeds summed\n\n{markdown_table(header, rows)}\n"


def seed_table(results: dict, names: list[str]) -> str:
    """Every seed's greedy accuracy and pass@1 over all test problems (plain prompts)."""
    rows = []
    for name in names:
        for s in range(10):
            r = results["runs"].get(f"{name}/s{s}/none")
            if r:
                rows.append([name, s, f"{r['accuracy']:.3f}", "-" if r.get("pass@1") is None else f"{r['pass@1']:.3f}",
                             *[f"{r['by_difficulty'][str(k)]:.3f}" for k in TEST_K], f"{r['train_seconds'] / 60:.1f}"])
    header = ["model", "seed", "greedy (all)", "pass@1 (all)", *[f"greedy k={k}" for k in TEST_K], "train min"]
    return f"## per seed, plain prompts\n\n{markdown_table(header, rows)}\n"


if __name__ == "__main__":
    main()
