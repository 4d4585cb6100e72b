"""Reports that show a result: Markdown + PNG plots built from run folders' metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run: str | Path) -> list[dict]:
    f = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def series(rows: list[dict], y: str, x: str = "step") -> tuple[list[float], list[float]]:
    """Points (x, y) of rows having both keys; later rows for the same x win (resumed runs)."""
    points = {}
    for r in rows:
        if y in r and x in r:
            points[r[x]] = r[y]
    xs = sorted(points)
    return xs, [points[k] for k in xs]


def plot_runs(runs: dict[str, str | Path], y: str, x: str, path: Path, *, title: str, ylabel: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        xs, ys = series(read_metrics(run), y, x)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
