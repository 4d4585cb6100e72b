"""Completions scored by a task's verifier: what rollouts, rewards and evaluation all read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
    logprobs: list[float] | None = None  # the sampler's log-prob of each id (None: not recorded)

    @property
    def tokens(self) -> int:
        return len(self.ids)


def score(policy, task: Task, problem: Problem, ids: list[int], logprobs: list[float] | None = None) -> Completion:
    text = policy.decode(ids)
    verdict = task.verify(problem, text)
    return Completion(text, ids, verdict.correct, verdict.extracted, task.format_ok(text), logprobs)


def complete(policy, task: Task, problems: list[Problem], params: SamplingParams, *,
             batch_size: int = 256, level: str | None = None, on_batch=None) -> list[Completion]:
    """One scored completion per problem, generated in batches; `on_batch(problems, completions)` after each."""
    out: list[Completion] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        chunk_params = dataclasses.replace(params, keys=tuple(range(start, start + len(chunk))))  # batch-size free
        done = [score(policy, task, p, ids) for p, ids in
                zip(chunk, policy.generate([prompt_ids(policy, p, level) for p in chunk], chunk_params))]
        out += done
        if on_batch is not None:
            on_batch(chunk, done)
    return out
