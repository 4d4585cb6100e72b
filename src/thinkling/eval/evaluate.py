"""Run a policy on a problem set and score it.

One greedy pass gives accuracy and token counts; `samples` sampled completions
per problem give pass@1 and unbiased pass@k. Every completion becomes a row;
with a `RowLog` the rows are appended to a JSONL file as each batch finishes,
so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.table import Table

from thinkling.errors import ThinklingError
from thinkling.eval.metrics import pass_at_k
from thinkling.files import append_jsonl, atomic_write_text, read_jsonl
from thinkling.models.base import SamplingParams
from thinkling.progress import bar, console
from thinkling.rollout.scoring import Completion, complete
from thinkling.rollout.stopping import make_stop_processor
from thinkling.tasks.base import Problem, Task


class RowLog:
    """Completed rows keyed by (problem id, mode), mirrored to an append-only JSONL file.

    The file's first line records the `settings` it was written with (model, problems,
    decoding); reopening it with other settings is refused, so rows of two different
    evaluations never mix in one file.
    """

    def __init__(self, path: str | Path | None = None, settings: dict | None = None):
        self.path = Path(path) if path else None
        self.rows: dict[tuple[str, str], dict] = {}
        settings = json.loads(json.dumps(settings)) if settings is not None else None  # as stored
        if self.path is None:
            return
        if self.path.is_dir():
            raise ThinklingError(f"{self.path}: is a folder; name a file for the evaluation's rows")
        if not self.path.exists():
            atomic_write_text(self.path, json.dumps({"settings": settings}) + "\n" if settings is not None else "")
            return
        entries = read_jsonl(self.path, "an evaluation row; delete the file to start over")
        first = entries[0][1] if entries else None
        if isinstance(first, dict) and "settings" in first:
            saved, entries = first["settings"], entries[1:]
            if settings is not None and saved != settings:
                changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
                raise ThinklingError(f"{self.path} holds completions of another evaluation (different "
                                     f"{', '.join(changed)}); use another --out or delete the file")
        elif settings is not None and entries:
            raise ThinklingError(f"{self.path} holds completions of an unknown evaluation; use another --out or delete it")
        for n, row in entries:
            if not isinstance(row, dict) or "id" not in row or "mode" not in row:
                raise ThinklingError(f"{self.path}:{n}: not an evaluation row; delete the file to start over")
            self.rows[(row["id"], row["mode"])] = row

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows[(row["id"], row["mode"])] = row
        if self.path:
            append_jsonl(self.path, rows, durable=False)

    def __contains__(self, key) -> bool:
        return key in self.rows


def evaluate(policy, task: Task, problems: list[Problem], cfg, *, seed: int = 0, stop_processor=None,
             level: str | None = None, progress=None, log: RowLog | None = None) -> tuple[dict, list[dict]]:
    """Score `problems` greedily (and with `cfg.samples` samples when > 1); returns (summary, rows)."""
    log = log or RowLog()
    modes = [("greedy", SamplingParams(cfg.max_new_tokens, 0.0, 1.0, stop_processor))]
    if cfg.samples > 1:
        modes += [(f"sample{s}", SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop_processor,
                                                seed + 1_000_003 * (s + 1))) for s in range(cfg.samples)]
    for mode, params in modes:
        todo = [p for p in problems if (p.id, mode) not in log]
        if progress is not None and len(todo) < len(problems):
            progress(len(problems) - len(todo))

        def on_batch(chunk, comps, mode=mode):
            log.add([_row(p, c, mode) for p, c in zip(chunk, comps)])
            if progress is not None:
                progress(len(chunk))

        complete(policy, task, todo, params, batch_size=cfg.batch_size, level=level, on_batch=on_batch)
    rows = [log.rows[(p.id, mode)] for mode, _ in modes for p in problems]
    return summarize(problems, log, [m for m, _ in modes]), rows


def evaluate_policy(policy, task: Task, problems: list[Problem], cfg, seed: int = 0, level: str | None = None,
                    description: str = "eval", log: RowLog | None = None) -> tuple[dict, list[dict]]:
    """`evaluate` with a progress bar and the stopping control `cfg` asks for (`ts_alpha`, `budget`, `wait`)."""
    total = len(problems) * (1 + (cfg.samples if cfg.samples > 1 else 0))
    with bar(description, total) as advance:
        return evaluate(policy, task, problems, cfg, seed=seed, level=level, progress=advance, log=log,
                        stop_processor=make_stop_processor(policy, task, ts_alpha=cfg.ts_alpha, budget=cfg.budget,
                                                           wait=cfg.wait_text, max_waits=cfg.wait))


def eval_metrics(summary: dict) -> dict:
    """What a run logs of an evaluation: greedy accuracy and tokens, plus sampled pass@1 when
    `samples` > 1 (what RL at temperature 1 optimises; greedy can hide it)."""
    out = {"eval/accuracy": summary["accuracy"], "eval/mean_tokens": summary["mean_tokens"]}
    if "pass@1" in summary:
        out["eval/pass@1"] = summary["pass@1"]
    return out


def print_summary(summary: dict, title: str) -> None:
    table = Table(title=title)
    passes = [k for k in next(iter(summary["by_difficulty"].values()), {}) if k.startswith("pass@")]
    for col in ("difficulty", "n", "accuracy", "strict accuracy", "mean tokens", *passes):
        table.add_column(col, justify="right")
    for d, e in summary["by_difficulty"].items():
        table.add_row(d, str(e["n"]), f"{e['accuracy']:.3f}", f"{e['strict_accuracy']:.3f}",
                      f"{e['mean_tokens']:.1f}", *[f"{e[k]:.3f}" for k in passes])
    extra = [f"{summary[k]:.3f}" for k in passes]
    table.add_row("all", str(summary["n"]), f"{summary['accuracy']:.3f}", f"{summary['strict_accuracy']:.3f}",
                  f"{summary['mean_tokens']:.1f}", *extra)
    console.print(table)


def summarize(problems: list[Problem], log: RowLog, modes: list[str]) -> dict:
    greedy = [log.rows[(p.id, "greedy")] for p in problems]
    summary = {
        "n": len(problems),
        "accuracy": _mean(r["correct"] for r in greedy),
        "strict_accuracy": _strict(greedy),
        "format_rate": _mean(r["format_ok"] for r in greedy),
        "mean_tokens": _mean(r["tokens"] for r in greedy),
        "mean_tokens_correct": _mean(r["tokens"] for r in greedy if r["correct"]),
        "mean_tokens_wrong": _mean(r["tokens"] for r in greedy if not r["correct"]),
    }
    sampled = [m for m in modes if m != "greedy"]
    counts = None
    if sampled:
        n = len(sampled)
        counts = {p.id: sum(log.rows[(p.id, m)]["correct"] for m in sampled) for p in problems}
        summary["mean_tokens_sampled"] = _mean(log.rows[(p.id, m)]["tokens"] for p in problems for m in sampled)
        for k in sorted({1, min(4, n), n}):
            summary[f"pass@{k}"] = _mean(pass_at_k(n, counts[p.id], k) for p in problems)
    groups = defaultdict(list)
    for p, r in zip(problems, greedy):
        groups[p.difficulty].append((p, r))
    table = {}
    for d in sorted(groups):
        entry = {"n": len(groups[d]), "accuracy": _mean(r["correct"] for _, r in groups[d]),
                 "strict_accuracy": _strict(r for _, r in groups[d]),
                 "mean_tokens": _mean(r["tokens"] for _, r in groups[d])}
        if counts is not None:
            for k in sorted({1, len(sampled)}):
                entry[f"pass@{k}"] = _mean(pass_at_k(len(sampled), counts[p.id], k) for p, _ in groups[d])
        table[_key(d)] = entry
    summary["by_difficulty"] = table
    labels = defaultdict(list)  # problems tagged `label=X` (a class label, e.g. `shapes`' mood): recall per class
    for p, r in zip(problems, greedy):
        for tag in p.tags:
            if tag.startswith("label="):
                labels[tag[len("label="):]].append(r["correct"])
    if labels:
        summary["recall_by_label"] = {k: {"n": len(v), "recall": _mean(v)} for k, v in sorted(labels.items())}
    return summary


def _strict(rows) -> float:
    """Share correct AND in the expected answer form (`format_ok`): math answers found only by
    the last-number fallback count for `accuracy` but not here."""
    return _mean(r["correct"] and r["format_ok"] for r in rows)


def _key(d) -> str:
    return str(int(d)) if float(d).is_integer() else str(d)


def _row(p: Problem, c: Completion, mode: str) -> dict:
    return {"id": p.id, "difficulty": p.difficulty, "mode": mode, "answer": p.answer, "extracted": c.extracted,
            "correct": c.correct, "format_ok": c.format_ok, "tokens": c.tokens, "completion": c.text}


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
