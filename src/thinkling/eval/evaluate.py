"""Run a policy on a problem set and score it.

One greedy pass gives accuracy and token counts; `samples` sampled completions
per problem give pass@1 and unbiased pass@k. Every completion is kept as a row
so reports and JSONL dumps read the same objects.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from thinkling.eval.metrics import pass_at_k
from thinkling.models.base import SamplingParams
from thinkling.rollout.prompts import prompt_ids
from thinkling.tasks.base import Problem, Task


@dataclass
class Completion:
    text: str
    ids: list[int]
    correct: bool
    extracted: str | None
    format_ok: bool

    @property
    def tokens(self) -> int:
        return len(self.ids)


def complete(policy, task: Task, problems: list[Problem], params: SamplingParams, *,
             batch_size: int = 256, level: str | None = None, progress=None) -> list[Completion]:
    """One scored completion per problem, generated in batches."""
    out: list[Completion] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [prompt_ids(policy, p, level) for p in chunk]
        chunk_params = params
        if params.seed is not None:  # each batch its own stream, independent of batch size changes elsewhere
            chunk_params = SamplingParams(**{**vars(params), "seed": params.seed + start})
        for p, ids in zip(chunk, policy.generate(prompts, chunk_params)):
            out.append(score(policy, task, p, ids))
        if progress is not None:
            progress(len(chunk))
    return out


def score(policy, task: Task, problem: Problem, ids: list[int]) -> Completion:
    text = policy.decode(ids)
    verdict = task.verify(problem, text)
    return Completion(text, ids, verdict.correct, verdict.extracted, task.format_ok(text))


def evaluate(policy, task: Task, problems: list[Problem], cfg, *, seed: int = 0,
             stop_processor=None, level: str | None = None, progress=None) -> tuple[dict, list[dict]]:
    """Score `problems` greedily (and with `cfg.samples` samples when > 1).

    Returns a summary dict and one row per completion.
    """
    greedy = complete(policy, task, problems,
                      SamplingParams(cfg.max_new_tokens, 0.0, 1.0, stop_processor),
                      batch_size=cfg.batch_size, level=level, progress=progress)
    rows = [_row(p, c, "greedy") for p, c in zip(problems, greedy)]
    summary = {
        "n": len(problems),
        "accuracy": _mean([c.correct for c in greedy]),
        "format_rate": _mean([c.format_ok for c in greedy]),
        "mean_tokens": _mean([c.tokens for c in greedy]),
        "mean_tokens_correct": _mean([c.tokens for c in greedy if c.correct]),
        "mean_tokens_wrong": _mean([c.tokens for c in greedy if not c.correct]),
    }
    correct_counts = None
    if cfg.samples > 1:
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop_processor, seed)
        correct_counts = [0] * len(problems)
        sampled_tokens = []
        for s in range(cfg.samples):
            params.seed = seed + 1_000_003 * (s + 1)
            for i, (p, c) in enumerate(zip(problems, complete(policy, task, problems, params, batch_size=cfg.batch_size,
                                                               level=level, progress=progress))):
                correct_counts[i] += c.correct
                sampled_tokens.append(c.tokens)
                rows.append(_row(p, c, f"sample{s}"))
        n = cfg.samples
        summary["mean_tokens_sampled"] = _mean(sampled_tokens)
        for k in sorted({1, min(4, n), n}):
            summary[f"pass@{k}"] = _mean([pass_at_k(n, c, k) for c in correct_counts])
    summary["by_difficulty"] = _by_difficulty(problems, greedy, correct_counts, cfg.samples)
    return summary, rows


def _by_difficulty(problems, greedy, correct_counts, n_samples) -> dict:
    groups = defaultdict(list)
    for i, p in enumerate(problems):
        groups[p.difficulty].append(i)
    table = {}
    for d in sorted(groups):
        idx = groups[d]
        entry = {
            "n": len(idx),
            "accuracy": _mean([greedy[i].correct for i in idx]),
            "mean_tokens": _mean([greedy[i].tokens for i in idx]),
        }
        if correct_counts is not None:
            entry[f"pass@{n_samples}"] = _mean([pass_at_k(n_samples, correct_counts[i], n_samples) for i in idx])
        table[_key(d)] = entry
    return table


def _key(d) -> str:
    return str(int(d)) if float(d).is_integer() else str(d)


def _row(p: Problem, c: Completion, mode: str) -> dict:
    return {"id": p.id, "difficulty": p.difficulty, "mode": mode, "answer": p.answer, "extracted": c.extracted,
            "correct": c.correct, "format_ok": c.format_ok, "tokens": c.tokens, "completion": c.text}


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
