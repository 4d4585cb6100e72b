"""SST on the tiny model: plain SFT vs structured-solution-template SFT, same budget (docs/sst.md).

Three SFT runs per seed, identical model, data draw, steps, batch and learning rate:
- `plain`:      chain expert traces (recipes/sst/sft-plain.yaml);
- `sst`:        `<plan>` + steps + answer, plan and step-boundary tokens weighted 2x annealed to 1x
                (recipes/sst/sft-sst.yaml);
- `sst-inject`: `sst` whose train and eval prompts start with the retrieved template
                (recipes/sst/sft-sst-inject.yaml).
Training uses 1-4-step problems; every model is tested on held-out 2, 4, 6 and 8-step problems
(strict: every step must be right), once with plain prompts and once with the template injected,
greedy. Reported: accuracy by difficulty (mean and min-max over seeds) and generated tokens per
solution.

`python experiments/sst.py [--quick] [--seeds 2] [--steps 500]`
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import experiment_args, output_dir, run_recipe, write_results

CONDITIONS = {"plain": "recipes/sst/sft-plain.yaml", "sst": "recipes/sst/sft-sst.yaml",
              "sst-inject": "recipes/sst/sft-sst-inject.yaml"}
TEST_K = [2, 4, 6, 8]


def add_args(p):
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default 500, quick 20)")
    p.add_argument("--size", type=int, default=200, help="held-out problems per evaluation (all difficulties)")


def model_overrides(quick: bool) -> list[str]:
    """A small model and batch so that one run takes minutes on one thread."""
    return ["model.tiny={d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 224}", "sft.batch_size=32",
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
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    steps = args.steps or (20 if args.quick else 500)
    size = 40 if args.quick else args.size
    results: dict = {"steps": steps, "seeds": seeds, "size": size, "runs": {}}
    for seed in seeds:
        for name, recipe in CONDITIONS.items():
            run = out / f"{name}-s{seed}"
            t0 = time.time()
            run_recipe("sft", recipe, [f"output_dir={run}", f"seed={seed}", f"sft.steps={steps}",
                                       f"eval.size={size}", *model_overrides(args.quick)])
            train_s = time.time() - t0
            for inject in ("none", "tag"):
                summary = evaluate(run / "final", inject, size, seed, out / f"eval-{name}-s{seed}-{inject}.json")
                results["runs"][f"{name}/s{seed}/{inject}"] = {
                    "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
                    "mean_tokens_correct": summary["mean_tokens_correct"],
                    "by_difficulty": {str(int(float(d))): e["accuracy"] for d, e in summary["by_difficulty"].items()},
                    "train_seconds": train_s}
            (out / "results.json").write_text(json.dumps(results, indent=2))
    header = ["SFT", "test prompt", *[f"k={k}" for k in TEST_K], "all", "tokens / solution", "tokens (correct)"]
    rows = []
    for name in CONDITIONS:
        for inject in ("none", "tag"):
            runs = [results["runs"][f"{name}/s{s}/{inject}"] for s in seeds]
            rows.append([name, "template injected" if inject == "tag" else "plain",
                         *[spread([r["by_difficulty"][str(k)] for r in runs]) for k in TEST_K],
                         spread([r["accuracy"] for r in runs]),
                         f"{statistics.mean(r['mean_tokens'] for r in runs):.1f}",
                         _mean_or_dash([r["mean_tokens_correct"] for r in runs])])
    title = (f"chain, trained on k=1-4, {steps} SFT steps x 32, seeds {seeds}: held-out greedy strict accuracy, "
             f"mean (min-max) over seeds, {size} problems per evaluation")
    print(write_results(out, title, header, rows, results))


if __name__ == "__main__":
    main()
