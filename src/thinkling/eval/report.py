"""Reports that show a result: Markdown + PNG plots built from run folders' metrics.jsonl.

`write_report(runs, out)` works for one run (its own report.md, written at the end of every
SFT / RL run) and for several side by side (`thinkling report A B --out DIR`): the same
tables and plots, one row and one line per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from thinkling.errors import ThinklingError  # noqa: E402
from thinkling.files import atomic_write_text, read_jsonl  # noqa: E402

# (metric key, panel title). A panel is drawn when some run logged its key.
HELD_OUT = [("eval/accuracy", "held-out accuracy (greedy)"), ("eval/pass@1", "held-out pass@1 (sampled)"),
            ("eval/mean_tokens", "held-out mean tokens (greedy)")]
TRAINING = [("loss", "training loss"), ("reward_mean", "reward (rollouts)"), ("accuracy", "rollout success"),
            ("completion_len_mean", "rollout length (tokens)"), ("lr", "learning rate"),
            ("mem/peak_rss_gb", "peak memory (GB)")]
DYNAMICS = [("kl_mean", "KL(π ‖ π_start) on the samples"), ("update_norm_rel", "update size ‖Δθ‖ / ‖θ‖"),
            ("entropy_estimate", "entropy (mean −log π of samples)"), ("clip_frac", "clipped tokens"),
            ("tokens/adv_neg_frac", "tokens pushed down (A < 0)"), ("groups_with_signal", "groups with signal"),
            ("advantage_abs_mean", "mean |advantage|"), ("grad_norm", "gradient norm"),
            ("offpolicy/kl", "sampler vs trainer KL"), ("bread/expert_token_fraction", "BREAD expert-token fraction"),
            ("rewards/margins", "DPO implicit-reward margin (chosen − rejected)"),
            ("rewards/accuracies", "DPO pairs ranked right"), ("pairs", "DPO pairs per update")]


def read_metrics(run: str | Path) -> list[dict]:
    return [row for _, row in read_jsonl(Path(run) / "metrics.jsonl", "a metrics row")]


def series(rows: list[dict], y: str, x: str = "step") -> tuple[list[float], list[float]]:
    """Points (x, y) of rows having both keys; later rows for the same x win (resumed runs)."""
    points = {}
    for r in rows:
        if y in r and x in r and isinstance(r[y], (int, float)):
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


def plot_panels(metrics: dict[str, list[dict]], panels: list[tuple[str, str]], path: Path) -> Path | None:
    """One small plot per metric some run logged (x = step), one line per run; None if no panel has data."""
    shown = [(key, title) for key, title in panels if any(series(rows, key)[0] for rows in metrics.values())]
    if not shown:
        return None
    cols = min(3, len(shown))
    rows_n = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (key, title) in zip(axes.flat, shown):
        for label, rows in metrics.items():
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(metrics) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_summary(run: Path) -> dict:
    """Start and end of a run: held-out metrics at the first and last evaluation, training totals."""
    rows = read_metrics(run)
    final = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    out: dict = {"run": str(run), "kind": "rl" if any("reward_mean" in r for r in rows) else "sft" if rows else "eval"}
    for key in ("eval/accuracy", "eval/pass@1", "eval/mean_tokens"):
        xs, ys = series(rows, key)
        if ys:
            out[f"start {key[5:]}"], out[f"end {key[5:]}"] = ys[0], ys[-1]
            out["start step"], out["end step"] = xs[0], xs[-1]
    if final:
        out["end accuracy"] = final["accuracy"]
        if "pass@1" in final:
            out["end pass@1"] = final["pass@1"]
    train = [r for r in rows if "loss" in r or "reward_mean" in r]
    if train:
        out["steps"] = max(r["step"] for r in train)
    updates = [r for r in rows if "groups_sampled" in r]
    if updates:
        out["steps with an update"] = sum(1 for r in rows if "loss" in r)
        out["mean rollout success"] = sum(r.get("accuracy", 0) for r in updates) / len(updates)
    for key in ("total/generated_tokens", "mem/peak_rss_gb"):
        xs, ys = series(rows, key)
        if ys:
            out[key] = max(ys)
    return out


def write_report(runs: dict[str, Path], out: Path, title: str | None = None) -> Path:
    """report.md in `out` with a start/end table, the held-out accuracy by difficulty and plots of
    the held-out metrics, training curves and (RL) update dynamics, one line per run."""
    for label, run in runs.items():
        if not (run / "metrics.jsonl").exists() and not (run / "eval.json").exists():
            raise ThinklingError(f"{run}: not a run folder (no metrics.jsonl or eval.json)")
    out.mkdir(parents=True, exist_ok=True)
    metrics = {label: read_metrics(run) for label, run in runs.items()}
    summaries = {label: run_summary(run) for label, run in runs.items()}
    columns = ["start accuracy", "end accuracy", "start pass@1", "end pass@1", "start mean_tokens",
               "end mean_tokens", "steps", "steps with an update", "mean rollout success",
               "total/generated_tokens", "mem/peak_rss_gb"]
    columns = [c for c in columns if any(c in s for s in summaries.values())]
    show = lambda v: "-" if v is None else v  # noqa: E731
    md = [f"# {title or ', '.join(str(r) for r in runs.values())}", ""]
    md += ["Start = the first held-out evaluation (step 0 of an RL run: the starting policy); end = the final one.", ""]
    md += [markdown_table(["run", *columns], [[label, *(show(s.get(c)) for c in columns)]
                                              for label, s in summaries.items()]), ""]
    by_difficulty = _by_difficulty(runs)
    if by_difficulty:
        md += ["## Final held-out accuracy by difficulty", "", by_difficulty, ""]
    by_label = _by_label(runs)
    if by_label:
        md += ["## Final held-out recall by label", "", by_label, ""]
    for name, panels, heading in (("heldout", HELD_OUT, "Held-out evaluation"), ("training", TRAINING, "Training"),
                                  ("dynamics", DYNAMICS, "Update dynamics")):
        if plot_panels(metrics, panels, out / f"{name}.png") is not None:
            md += [f"## {heading}", "", f"![{heading}]({name}.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path


def _by_difficulty(runs: dict[str, Path]) -> str:
    rows = []
    for label, run in runs.items():
        f = run / "eval.json"
        if not f.exists():
            continue
        for d, e in json.loads(f.read_text())["by_difficulty"].items():
            rows.append([label, d, e["n"], e["accuracy"], e.get("pass@1", "-"), e["mean_tokens"]])
    return markdown_table(["run", "difficulty", "n", "accuracy", "pass@1", "mean tokens"], rows) if rows else ""


def _by_label(runs: dict[str, Path]) -> str:
    """Recall per class label of each run's final evaluation (tasks that tag problems `label=X`)."""
    rows = []
    for label, run in runs.items():
        f = run / "eval.json"
        if f.exists():
            for name, e in json.loads(f.read_text()).get("recall_by_label", {}).items():
                rows.append([label, name, e["n"], e["recall"]])
    return markdown_table(["run", "label", "n", "recall"], rows) if rows else ""


def eval_report(summary: dict, title: str) -> str:
    """The Markdown of one evaluation (`thinkling eval --out F` writes it to F with .md)."""
    keys = [k for k in ("accuracy", "strict_accuracy", "pass@1", "format_rate", "mean_tokens") if k in summary]
    rows = [[d, e["n"], e["accuracy"], e.get("pass@1", "-"), e["mean_tokens"]] for d, e in summary["by_difficulty"].items()]
    return "\n".join([f"# {title}", "", markdown_table(["n", *keys], [[summary["n"], *(summary[k] for k in keys)]]), "",
                      "## By difficulty", "", markdown_table(["difficulty", "n", "accuracy", "pass@1", "mean tokens"], rows),
                      ""])
