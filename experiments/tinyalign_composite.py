"""TinyAlign vs the plain connector on the composite VLM, `shapes` / `mood`
(docs/vlm.md#tinyalign-on-the-composite-vlm).

The runs are ordinary `thinkling sft` runs of recipes/vlm/composite-sft-shapes.yaml (plain) and
composite-tinyalign-shapes.yaml (TinyAlign) with `train.size` = 20 / 40 / 60 / 100 % of the 600
training pictures, each under `/usr/bin/time -v` with its output in `<run folder>.log`; `--commands`
prints them. This script reads the finished runs: the training-loss curve (`metrics.jsonl`, one
8-trace batch every `log_every` steps), the first logged step whose loss is at or below each
`--thresholds`, held-out greedy accuracy and format rate (`eval.json`), what the model sees (the
share of held-out shapes whose colour, form and cell its description names right,
`vlm_perception.scored_file` on the final samples), wall time, CPU time and peak RSS (the `time -v`
log), and writes the table and one plot of the loss curves.

`PYTHONPATH=src python experiments/tinyalign_composite.py --commands`
`PYTHONPATH=src python experiments/tinyalign_composite.py --plot docs/experiments/tinyalign-composite-loss.png`
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from vlm_perception import scored_file

from thinkling.eval.report import markdown_table
from thinkling.files import read_json, read_jsonl

RECIPES = {"plain": "recipes/vlm/composite-sft-shapes.yaml", "tinyalign": "recipes/vlm/composite-tinyalign-shapes.yaml"}
POOL = 600
SHARES = (20, 40, 60, 100)


def command(method: str, share: int, root: str) -> str:
    folder = f"{root}/{method}-{share}"
    return (f"/usr/bin/time -v thinkling sft {RECIPES[method]} output_dir={folder} "
            f"train.size={POOL * share // 100} > {folder}.log 2>&1")


def losses(folder: Path) -> list[tuple[int, float]]:
    """(step, training loss) rows of a run, in step order."""
    return [(r["step"], r["loss"]) for _, r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first logged step whose loss is at or below `threshold`."""
    return next((step for step, loss in curve if loss <= threshold), None)


def usage(log: Path) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GiB) from a `/usr/bin/time -v` log."""
    text = log.read_text(errors="replace")

    def field(name: str) -> str:
        found = re.search(rf"{re.escape(name)}: (.+)", text)
        return found.group(1).strip() if found else ""

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    if not wall:
        return {}
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall": seconds, "cpu": cpu, "rss": int(field("Maximum resident set size (kbytes)")) / 2**20}


def collect(root: Path) -> list[dict]:
    rows = []
    for share in SHARES:
        for method in RECIPES:
            folder = root / f"{method}-{share}"
            if not (folder / "eval.json").is_file():
                continue
            summary = read_json(folder / "eval.json")
            log = root / f"{method}-{share}.log"
            seen = scored_file(str(max((folder / "samples").glob("step_*.jsonl"))), [1, 2, 3])
            rows.append({"method": method, "share": share, "pairs": POOL * share // 100, "curve": losses(folder),
                         "accuracy": summary["accuracy"], "format_rate": summary["format_rate"], "seen": seen,
                         **(usage(log) if log.is_file() else {})})
    return rows


def table(rows: list[dict], thresholds: list[float]) -> str:
    header = ["data", "method", "loss at step 60", *(f"steps to loss <= {t}" for t in thresholds),
              "held-out accuracy", "format rate", "colour / form / cell right", "wall", "CPU", "peak RSS"]
    body = []
    for r in rows:
        reached = [steps_to(r["curve"], t) for t in thresholds]
        body.append([f"{r['share']} % ({r['pairs']})", r["method"], f"{r['curve'][-1][1]:.3f}",
                     *("not reached" if s is None else str(s) for s in reached), f"{r['accuracy']:.3f}",
                     f"{r['format_rate']:.3f}", " / ".join(f"{r['seen'][k]:.3f}" for k in ("colour", "form", "cell")),
                     f"{r['wall'] / 60:.1f} min" if "wall" in r else "-",
                     f"{r['cpu']:.0f} s" if "cpu" in r else "-", f"{r['rss']:.2f} GiB" if "rss" in r else "-"])
    return markdown_table(header, body)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = dict(zip(SHARES, ("tab:red", "tab:orange", "tab:green", "tab:blue")))
    for r in rows:
        steps, values = zip(*r["curve"])
        ax.plot(steps, values, color=colours[r["share"]], linestyle="-" if r["method"] == "plain" else "--",
                marker="o" if r["method"] == "plain" else "x", markersize=3,
                label=f"{r['method']}, {r['share']} % ({r['pairs']} pictures)")
    ax.set_yscale("log")
    ax.set_xlabel("SFT step (batch of 8 traces)")
    ax.set_ylabel("training loss (nats / target token, one batch)")
    ax.set_title("Composite VLM (SmolLM2-135M), shapes / mood: plain connector vs TinyAlign")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/vlm-composite", help="folder holding <method>-<share> runs and logs")
    p.add_argument("--thresholds", default="0.5,0.3")
    p.add_argument("--plot", default=None, help="PNG of the loss curves")
    p.add_argument("--commands", action="store_true", help="print the command of every run, run nothing")
    args = p.parse_args(argv)
    if args.commands:
        print("\n".join(command(m, s, args.root) for s in SHARES for m in RECIPES))
        return
    rows = collect(Path(args.root))
    print(table(rows, [float(t) for t in args.thresholds.split(",")]))
    print(json.dumps({f"{r['method']}-{r['share']}": r["curve"] for r in rows}))
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
