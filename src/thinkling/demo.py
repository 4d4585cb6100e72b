"""The quick-start: a light SFT on `chain` problems, then GRPO and BREAD from the same
checkpoint on long (hard) ones, same budget and seeds, and a report comparing them.

Recipes live in `recipes/quickstart/`; the demo only wires their folders together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from thinkling.config import load_recipe
from thinkling.errors import ThinklingError
from thinkling.eval.report import markdown_table, plot_runs, read_metrics, series
from thinkling.progress import console
from thinkling.runs import atomic_write_text

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"


def _recipe(name: str) -> Path:
    path = RECIPES / name
    if not path.exists():
        path = Path("recipes/quickstart") / name
    if not path.exists():
        raise ThinklingError(f"demo recipe {name} not found (run from the repository root)")
    return path


def run_demo(out: str = "runs/demo", overrides: list[str] = (), resume: bool = False) -> dict:
    from thinkling import jobs

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not resume:
        raise ThinklingError(f"demo folder {root} already exists; pass --resume or --out another folder")
    t0 = time.time()
    sft_dir, grpo_dir, bread_dir = root / "sft", root / "grpo", root / "bread"
    timings = {}
    if not (sft_dir / "final" / "policy.json").exists():
        console.rule("1/3  light SFT on 1-8-step chain problems")
        t = time.time()
        jobs.run_sft(load_recipe(_recipe("sft.yaml"), [f"output_dir={sft_dir}", *overrides]), resume=sft_dir.exists())
        timings["sft"] = time.time() - t
    for i, (name, folder) in enumerate((("grpo", grpo_dir), ("bread", bread_dir)), start=2):
        if (folder / "eval.json").exists():
            continue
        console.rule(f"{i}/3  {name.upper()} on long chain problems, from the SFT checkpoint")
        t = time.time()
        cfg = load_recipe(_recipe(f"{name}.yaml"), [f"output_dir={folder}", f"model.init={sft_dir / 'final'}", *overrides])
        jobs.run_rl(cfg, resume=folder.exists())
        timings[name] = time.time() - t
    summary = write_report(root, {"GRPO": grpo_dir, "BREAD": bread_dir}, sft_dir)
    summary["wall_time_s"] = time.time() - t0
    summary["stage_time_s"] = timings
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2))
    console.print(f"report: {root / 'report.md'}  ({summary['wall_time_s']:.0f} s)")
    return summary


def write_report(root: Path, runs: dict[str, Path], sft_dir: Path) -> dict:
    """Plots and a Markdown table comparing RL runs that started from one SFT checkpoint."""
    plot_runs(runs, "eval/accuracy", "step", root / "accuracy_vs_step.png",
              title="held-out accuracy on hard problems", xlabel="RL step", ylabel="greedy accuracy")
    plot_runs(runs, "eval/accuracy", "total/generated_tokens", root / "accuracy_vs_tokens.png",
              title="accuracy vs generated tokens", xlabel="tokens generated (incl. BREAD probes)", ylabel="greedy accuracy")
    plot_runs({k: v for k, v in runs.items() if k == "BREAD"}, "bread/expert_token_fraction", "step",
              root / "bread_expert_fraction.png", title="BREAD: expert-trace tokens used / all trace tokens",
              xlabel="RL step", ylabel="fraction")
    rows, summary = [], {"runs": {}}
    for label, folder in runs.items():
        metrics = read_metrics(folder)
        final = json.loads((folder / "eval.json").read_text())
        steps, acc = series(metrics, "eval/accuracy")
        _, tokens = series(metrics, "total/generated_tokens")
        _, frac = series(metrics, "bread/expert_token_fraction")
        train_rows = [r for r in metrics if "groups_sampled" in r]
        entry = {"final_accuracy": final["accuracy"], "start_accuracy": acc[0] if acc else None,
                 "updates": sum(1 for r in train_rows if "loss" in r), "steps": len(train_rows),
                 "rollout_accuracy": sum(r.get("accuracy", 0) for r in train_rows) / max(1, len(train_rows)),
                 "generated_tokens": tokens[-1] if tokens else 0, "expert_token_fraction": frac[-1] if frac else None,
                 "by_difficulty": final["by_difficulty"]}
        summary["runs"][label] = entry
        rows.append([label, entry["start_accuracy"] if entry["start_accuracy"] is not None else "-", entry["final_accuracy"],
                     f"{entry['updates']}/{entry['steps']}", entry["rollout_accuracy"], int(entry["generated_tokens"]),
                     "-" if entry["expert_token_fraction"] is None else entry["expert_token_fraction"]])
    table = markdown_table(["run", "accuracy at step 0", "final accuracy", "steps with an update",
                            "mean rollout success", "tokens generated", "expert-token fraction"], rows)
    md = [
        "# thinkling quick-start: GRPO vs BREAD on long `chain` problems",
        "",
        f"Both runs start from the SFT checkpoint `{sft_dir / 'final'}` (a light SFT) with the same",
        "seeds, prompts per step, group size and number of steps. Accuracy is greedy, on held-out long problems.",
        "A step without an update is one where every group was all-wrong (or all-right): no learning signal.",
        "Rollout success counts BREAD's branched groups, which start from expert anchors.",
        "",
        table,
        "",
        "![accuracy vs step](accuracy_vs_step.png)",
        "![accuracy vs generated tokens](accuracy_vs_tokens.png)",
        "![BREAD expert-token fraction](bread_expert_fraction.png)",
        "",
    ]
    atomic_write_text(root / "report.md", "\n".join(md))
    console.print(table)
    return summary
