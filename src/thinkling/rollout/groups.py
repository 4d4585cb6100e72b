"""Group sampling for GRPO and BREAD's branched probes.

A `Group` is G completions of one problem from one prefix. The prefix is the
prompt, plus — for a BREAD branch — the first k expert steps; prefix tokens are
always context, never actions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from thinkling.models.base import EarlyStop, Sample, SamplingParams
from thinkling.rollout.prompts import anchor_text, prompt_ids
from thinkling.rollout.scoring import Completion, score
from thinkling.tasks.base import Problem


@dataclass
class Group:
    problem: Problem
    prefix: list[int]
    completions: list[Completion]
    level: str | None = None
    anchor_steps: int = 0
    anchor_tokens: int = 0
    rewards: list[float] = field(default_factory=list)
    key: int = 0  # the request's sampling-stream key (see `sample_groups`)
    position: int = 0  # its place among the step's groups of all processes (data-parallel RL)

    @property
    def has_success(self) -> bool:
        return any(c.correct for c in self.completions)


def branch_prefix(policy, problem: Problem, level: str | None, k: int) -> tuple[list[int], int]:
    """Prompt ids followed by the first k expert steps; returns (ids, number of anchor tokens)."""
    base = prompt_ids(policy, problem, level)
    anchor = policy.encode_text(anchor_text(problem, k)) if k > 0 else []
    return base + anchor, len(anchor)


def sample_groups(policy, task, requests: list[tuple[Problem, str | None, int]], group_size: int,
                  params: SamplingParams, keys: list[int] | None = None, early_stop: bool = False) -> list[Group]:
    """One group per (problem, level, anchor steps) request, all generated in one batch.

    Each prefix is repeated G times consecutively so the engine can prefill it once. Completion i
    of request j samples from the stream (params.seed, keys[j] * G + i) (default keys: 0, 1, ...),
    so a group's samples do not depend on the other requests of the batch.
    `early_stop` stops a group once none of its samples can succeed any more (`lost_rows`): for
    groups that are discarded unless they succeed (BREAD's probes); the samples of a group with a
    success are the same either way, a stopped group's end where they were stopped.
    """
    prefixes = [branch_prefix(policy, p, level, k) for p, level, k in requests]
    batch = [ids for ids, _ in prefixes for _ in range(group_size)]
    keys = list(range(len(requests))) if keys is None else keys
    rows = tuple(key * group_size + i for key in keys for i in range(group_size))
    stop = lost_rows(policy, task, requests, group_size) if early_stop else None
    outputs = policy.sample(batch, params if params is None else dataclasses.replace(params, keys=rows, early_stop=stop))
    groups = []
    for i, ((problem, level, k), (ids, n_anchor)) in enumerate(zip(requests, prefixes)):
        outs = outputs[i * group_size : (i + 1) * group_size]
        comps = [_score_branch(policy, task, problem, k, o) for o in outs]
        groups.append(Group(problem, ids, comps, level, k, n_anchor, key=keys[i]))
    return groups


def lost_rows(policy, task, requests: list[tuple[Problem, str | None, int]], group_size: int) -> EarlyStop:
    """The sampler's `EarlyStop` for `sample_groups`' batch: row i belongs to request i // G; it is
    lost once finished and wrong, or when the task says its text (anchor + continuation) cannot
    succeed any more (`Task.cannot_succeed`), checked after every line end."""
    anchors = [anchor_text(p, k) if k > 0 else "" for p, _, k in requests]

    def lost(i: int, ids: list[int], finished: bool) -> bool:
        j = i // group_size
        text = anchors[j] + policy.decode(ids)
        return not task.verify(requests[j][0], text).correct if finished else task.cannot_succeed(requests[j][0], text)

    newline = policy.encode_text("\n")
    return EarlyStop(tuple(i // group_size for i in range(len(requests) * group_size)), lost,
                     frozenset(newline if len(newline) == 1 else ()))


def _score_branch(policy, task, problem: Problem, k: int, sample: Sample) -> Completion:
    """Score the full solution (anchor + continuation); the completion ids stay the model's own."""
    if k == 0:
        return score(policy, task, problem, sample.ids, sample.logprobs)
    text = anchor_text(problem, k) + policy.decode(sample.ids)
    verdict = task.verify(problem, text)
    return Completion(text, sample.ids, verdict.correct, verdict.extracted, task.format_ok(text), sample.logprobs)
