"""Length control at inference: sweep temperature-scaled stopping (α) and budget forcing (B).

Both trade accuracy for tokens without training, in different ways:

- temperature-scaled stopping multiplies the probability of ending the thinking
  by α at every step (α > 1 stops earlier, α < 1 later, α = 1 is the plain model);
- budget forcing lets the model think freely until B tokens, then makes it write
  the end-of-thinking marker and answer.

`stop_sweep` evaluates one policy at every α and every B on the same problems
and reports accuracy against mean completion length, as a JSON table and one
plot with both curves, so the two controls are compared at equal cost. Each
setting's completions go to their own JSONL file, so an interrupted sweep
continues where it stopped (delete the folder to start over).

Greedy decoding hides most of α's effect: a boost of log α only matters where
it flips the argmax, so a confident model ignores any moderate α. With
`temperature` > 0 the sweep also samples `samples` completions per problem and
plots pass@1 against the mean sampled length, where α scales the stopping
probability exactly as intended; greedy numbers stay in the table.

Where the task has no end-of-thinking text (GSM8K, MATH: `end_of_thinking` is
None), the marker is the model's EOS: α then scales the probability of ending
the answer, and budget forcing with EOS is a hard cut at B tokens. Passing
`budget_marker="\\nThe answer is"` instead forces the model to state an answer
at the budget (s1's "Final Answer:"), which is the fairer comparison there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

from thinkling.config import EvalConfig
from thinkling.errors import ThinklingError
from thinkling.eval.evaluate import RowLog, evaluate
from thinkling.files import atomic_write_text
from thinkling.models import open_policy
from thinkling.progress import bar, console
from thinkling.rollout.stopping import make_stop_processor
from thinkling.tasks import problem_set

# Tokens allowed after a forced marker: the answer itself (a number, a short \boxed{}).
ANSWER_ROOM = 24


def _check(values, name: str, kind, low) -> list:
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or not (v > low) or not math.isfinite(v):
            raise ThinklingError(f"{name}: expected numbers > {low}, got {v!r}")
    return values


def stop_sweep(model, task_cfg, alphas, budgets, out_dir, max_new_tokens: int, *, batch_size: int = 32,
               seed: int = 0, dtype: str | None = None, budget_marker: str | None = None,
               temperature: float = 0.0, samples: int = 4, answer_room: int = ANSWER_ROOM,
               trust_remote_code: bool = False) -> dict:
    """Evaluate TS at each α and budget forcing at each B; write `sweep.json` and `sweep.png` in `out_dir`.

    `model` is a policy object or what `thinkling eval --model` takes. A budget
    row generates at most B + overrun + `answer_room` tokens: thinking up to B,
    the marker (for a line-based task after finishing the current line, see
    `BudgetForcing.max_overrun`), then the answer (without the cap a model that does not
    stop after answering would ramble on to max_new_tokens and blur the cost
    axis). `max_new_tokens` is the limit of the TS rows. With `temperature` > 0,
    `samples` (>= 2) sampled completions per problem are scored too and plotted.
    Returns the table.
    """
    alphas = _check(alphas, "alphas", (int, float), 0)
    budgets = _check(budgets, "budgets", int, 0)
    if not alphas and not budgets:
        raise ThinklingError("stop sweep: give at least one alpha or one budget")
    if temperature < 0 or (temperature > 0 and samples < 2):
        raise ThinklingError("stop sweep: temperature must be >= 0, and sampling needs samples >= 2")
    sampled = temperature > 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task, problems = problem_set(task_cfg, "eval")
    policy = open_policy(model, dtype, trust_remote_code) if isinstance(model, str) else model
    marker_task = (SimpleNamespace(end_of_thinking=budget_marker, line_based=getattr(task, "line_based", False))
                   if budget_marker else task)

    settings = [("ts", float(a), max_new_tokens, make_stop_processor(policy, task, ts_alpha=float(a)))
                for a in alphas]
    for b in budgets:  # line-based tasks get line-aware forcing: up to max_overrun tokens past B
        forcing = make_stop_processor(policy, marker_task, budget=b)
        settings.append(("budget", b, b + forcing.max_overrun + answer_room, forcing))
    table_model = model if isinstance(model, str) else type(model).__name__
    rows = []
    for method, value, limit, processor in settings:
        name = f"{method}-{value:g}"
        cfg = EvalConfig(max_new_tokens=limit, samples=samples if sampled else 1, temperature=temperature,
                         batch_size=batch_size)
        with bar(name, len(problems) * (1 + (samples if sampled else 0))) as advance:
            summary, _ = evaluate(policy, task, problems, cfg, seed=seed, stop_processor=processor,
                                  progress=advance, log=RowLog(out / f"{name}.jsonl", {
                                      "model": table_model, "dtype": dtype, "task": dataclasses.asdict(task_cfg),
                                      "seed": seed, "budget_marker": budget_marker, "max_new_tokens": limit,
                                      "samples": cfg.samples, "temperature": temperature}))
        row = {"method": method, "value": value, "max_new_tokens": limit, "n": summary["n"],
               "greedy_accuracy": summary["accuracy"], "greedy_mean_tokens": summary["mean_tokens"],
               "greedy_format_rate": summary["format_rate"]}
        if sampled:
            row.update({"pass@1": summary["pass@1"], f"pass@{samples}": summary[f"pass@{samples}"],
                        "sampled_mean_tokens": summary["mean_tokens_sampled"]})
        # The plotted pair: sampled pass@1 when sampling, else greedy accuracy.
        row["accuracy"] = row["pass@1"] if sampled else row["greedy_accuracy"]
        row["mean_tokens"] = row["sampled_mean_tokens"] if sampled else row["greedy_mean_tokens"]
        rows.append(row)
        console.print(f"{name}: accuracy {row['accuracy']:.3f}, mean tokens {row['mean_tokens']:.1f}")
    table = {"model": table_model, "task": task_cfg.name,
             "n": len(problems), "max_new_tokens": max_new_tokens, "budget_marker": budget_marker,
             "decoding": f"sampled T={temperature:g}, {samples} per problem (pass@1)" if sampled else "greedy",
             "end_of_thinking": getattr(task, "end_of_thinking", None) or "<eos>", "rows": rows}
    atomic_write_text(out / "sweep.json", json.dumps(table, indent=2) + "\n")
    plot_sweep(table, out / "sweep.png")
    return table


def plot_sweep(table: dict, path) -> None:
    """Accuracy against mean completion tokens: one curve per method, each point labelled by α or B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, label, style, tag in (("ts", "temperature-scaled stopping", "o-", "α="),
                                      ("budget", "budget forcing", "s--", "B=")):
        rows = sorted((r for r in table["rows"] if r["method"] == method), key=lambda r: r["mean_tokens"])
        if not rows:
            continue
        ax.plot([r["mean_tokens"] for r in rows], [r["accuracy"] for r in rows], style, label=label)
        # Settings that land on the same point (α that changes nothing, B above every length) share one label.
        labels: dict[tuple, list[str]] = {}
        for r in rows:
            labels.setdefault((round(r["mean_tokens"], 1), round(r["accuracy"], 3)), []).append(f"{r['value']:g}")
        for (x, y), values in labels.items():
            ax.annotate(tag + ",".join(values), (x, y), textcoords="offset points", fontsize=7,
                        xytext=(4, -10 if method == "budget" else 4))
    top = max((r["accuracy"] for r in table["rows"]), default=1.0)
    ax.set_ylim(-0.02, min(1.04, max(0.1, top * 1.15)))  # accuracy is >= 0; a flat 0 % run stays readable
    ax.set_xlabel("mean completion tokens")
    ax.set_ylabel("pass@1 (sampled)" if table.get("decoding", "greedy") != "greedy" else "accuracy (greedy)")
    ax.set_title(f"{table['model']} on {table['task']} ({table['n']} problems, {table.get('decoding', 'greedy')})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
