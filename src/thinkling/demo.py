"""The quick-start: SFT on `chain` problems from imperfect demonstrations, then GRPO and
BREAD from the same checkpoint on long (8-step) ones with a strict reward (every step must be
right), same budget and seeds, and a report comparing them.

Recipes live in `recipes/quickstart/`; the demo wires their folders together and shortens the
RL runs (`DEMO_BUDGET`: 40 steps instead of 100). The SFT, alone on the machine, runs in
length-sorted micro-batches and on two threads when no other job keeps a core busy.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from thinkling import jobs
from thinkling.config import load_recipe
from thinkling.errors import ThinklingError
from thinkling.eval.report import markdown_table, plot_runs, read_metrics, series
from thinkling.files import atomic_write_text
from thinkling.progress import console

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"
# Applied before the user's overrides. The SFT keeps the recipe's 1,500 steps: at 900 the model sat
# just before the drop in loss where it learns the steps, and a change in float summation order
# alone (micro-batches, two threads) took its 8-step greedy accuracy from 0.72 to 0.125. A
# 1,200-step SFT (schedule ending there) did not save enough either: 613 s for the whole demo, and
# a weaker start (8-step greedy 0.44, pass@1 0.01) from which both RL runs gained less.
DEMO_BUDGET = ("rl.steps=40",)


def sft_speed(cpus: int | None, busy: float) -> list[str]:
    """The SFT stage runs alone: on an idle machine two threads are 1.5-1.7x faster than one (the
    RL stages run side by side, a thread each). Under load two threads crawl (measured: ~9 s a
    step, against 0.33 s idle, with two other jobs on the 2 cores), so they are taken only when
    other processes keep less than half a core `busy`. Length-sorted micro-batches of 16 pad
    ~1.6x fewer tokens than one batch of 64; the step and its loss are the same batch's."""
    both = (cpus or 1) >= 2 and busy < 0.5
    return ["sft.micro_batch_size=16", *(["threads=2"] if both else [])]


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over the next `seconds` (/proc/stat), or the
    one-minute load average where there is no /proc: that lags, which matters after a set-up."""
    def ticks() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    try:
        all0, idle0 = ticks()
        time.sleep(seconds)
        all1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, all1 - all0))


def _recipe(name: str) -> Path:
    path = RECIPES / name
    if not path.exists():
        path = Path("recipes/quickstart") / name
    if not path.exists():
        raise ThinklingError(f"demo recipe {name} not found (run from the repository root)")
    return path


def run_demo(out: str = "runs/demo", overrides: list[str] = (), resume: bool = False) -> dict:
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not resume:
        raise ThinklingError(f"demo folder {root} already exists; pass --resume or --out another folder")
    t0 = time.time()
    overrides = [*DEMO_BUDGET, *overrides]
    sft_dir, grpo_dir, bread_dir = root / "sft", root / "grpo", root / "bread"
    sft_final = sft_dir / "final"
    for name in ("grpo", "bread"):  # a bad override fails now, not after the SFT
        load_recipe(_recipe(f"{name}.yaml"), [f"output_dir={root / name}", f"model.init={sft_final}", *overrides])
    timings = {}
    if not (sft_final / "policy.json").exists():
        console.rule("1/2  SFT on 1-8-step chain problems from imperfect demonstrations")
        t = time.time()
        sft_cfg = load_recipe(_recipe("sft.yaml"), [f"output_dir={sft_dir}", *sft_speed(os.cpu_count(), busy_cores()), *overrides])
        jobs.run_sft(sft_cfg, resume=sft_dir.exists())
        timings["sft"] = time.time() - t
    todo = [(name, folder) for name, folder in (("grpo", grpo_dir), ("bread", bread_dir))
            if not (folder / "eval.json").exists()]
    if len(todo) == 2 and (os.cpu_count() or 1) >= 2:
        # The two runs are independent and single-threaded: side by side they take the time of one.
        console.rule("2/2  GRPO and BREAD side by side (a process each) on 8-step problems")
        console.print(f"progress: {grpo_dir / 'metrics.jsonl'} and {bread_dir / 'metrics.jsonl'}")
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs_ = {name: pool.submit(_rl_stage, name, str(folder), str(sft_final), list(overrides), True)
                     for name, folder in todo}
            timings.update({name: job.result() for name, job in jobs_.items()})
    else:
        for name, folder in todo:
            console.rule(f"2/2  {name.upper()} on 8-step problems, from the SFT checkpoint")
            timings[name] = _rl_stage(name, str(folder), str(sft_final), list(overrides), False)
    summary = write_report(root, {"GRPO": grpo_dir, "BREAD": bread_dir}, sft_dir)
    summary["wall_time_s"] = time.time() - t0
    summary["stage_time_s"] = timings
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2))
    console.print(f"report: {root / 'report.md'}  ({summary['wall_time_s']:.0f} s)")
    return summary


def _rl_stage(name: str, folder: str, sft_final: str, overrides: list[str], quiet: bool) -> float:
    """One RL run of the demo (also the body of a worker process); returns its wall time."""
    console.quiet = quiet
    t = time.time()
    cfg = load_recipe(_recipe(f"{name}.yaml"), [f"output_dir={folder}", f"model.init={sft_final}", *overrides])
    jobs.run_rl(cfg, resume=Path(folder).exists())
    return time.time() - t


def write_report(root: Path, runs: dict[str, Path], sft_dir: Path) -> dict:
    """Plots and a Markdown table comparing RL runs that started from one SFT checkpoint."""
    for key, name, label in (("eval/pass@1", "pass1", "pass@1 (2 samples, temperature 1)"),
                             ("eval/accuracy", "greedy", "greedy accuracy")):
        plot_runs(runs, key, "step", root / f"{name}_vs_step.png",
                  title="held-out 8-step problems", xlabel="RL step", ylabel=label)
        plot_runs(runs, key, "total/generated_tokens", root / f"{name}_vs_tokens.png",
                  title="held-out 8-step problems", xlabel="tokens generated (incl. BREAD probes)", ylabel=label)
    plot_runs({k: v for k, v in runs.items() if k == "BREAD"}, "bread/expert_token_fraction", "step",
              root / "bread_expert_fraction.png", title="BREAD: expert-trace tokens used / all trace tokens",
              xlabel="RL step", ylabel="fraction")
    rows, summary = [], {"runs": {}}
    for label, folder in runs.items():
        metrics = read_metrics(folder)
        final = json.loads((folder / "eval.json").read_text())
        _, acc = series(metrics, "eval/accuracy")
        _, pass1 = series(metrics, "eval/pass@1")
        _, tokens = series(metrics, "total/generated_tokens")
        _, frac = series(metrics, "bread/expert_token_fraction")
        train_rows = [r for r in metrics if "groups_sampled" in r]
        entry = {"start_pass@1": pass1[0] if pass1 else None, "final_pass@1": final.get("pass@1"),
                 "start_accuracy": acc[0] if acc else None, "final_accuracy": final["accuracy"],
                 "updates": sum(1 for r in train_rows if "loss" in r), "steps": len(train_rows),
                 "rollout_accuracy": sum(r.get("accuracy", 0) for r in train_rows) / max(1, len(train_rows)),
                 "generated_tokens": tokens[-1] if tokens else 0, "expert_token_fraction": frac[-1] if frac else None,
                 "by_difficulty": final["by_difficulty"]}
        summary["runs"][label] = entry
        show = lambda v: "-" if v is None else v  # noqa: E731
        rows.append([label, show(entry["start_pass@1"]), show(entry["final_pass@1"]), show(entry["start_accuracy"]),
                     entry["final_accuracy"], f"{entry['updates']}/{entry['steps']}", entry["rollout_accuracy"],
                     int(entry["generated_tokens"]), show(entry["expert_token_fraction"])])
    table = markdown_table(["run", "pass@1 at step 0", "final pass@1", "greedy at step 0", "final greedy",
                            "steps with an update", "mean rollout success", "tokens generated",
                            "expert-token fraction"], rows)
    md = [
        "# thinkling quick-start: GRPO vs BREAD on 8-step `chain` problems",
        "",
        f"Both runs start from the SFT checkpoint `{sft_dir / 'final'}` (SFT on imperfect demonstrations:",
        "the model knows each step but samples it right only part of the time) with the same seeds,",
        "prompts per step, group size and number of steps. pass@1 is the success rate of sampled",
        "completions at temperature 1 — what RL optimises — on held-out problems; greedy is shown too.",
        "A step without an update is one where every group was all-wrong (or all-right): no learning signal.",
        "Rollout success counts BREAD's branched groups, which start from expert anchors.",
        "",
        table,
        "",
        "![pass@1 vs step](pass1_vs_step.png)",
        "![pass@1 vs generated tokens](pass1_vs_tokens.png)",
        "![greedy accuracy vs step](greedy_vs_step.png)",
        "![BREAD expert-token fraction](bread_expert_fraction.png)",
        "",
    ]
    atomic_write_text(root / "report.md", "\n".join(md))
    console.print(table)
    return summary
