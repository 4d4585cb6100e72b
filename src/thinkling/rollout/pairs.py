"""Preference pairs from a policy's own rollouts (rollout DPO): a correct and an incorrect
completion of the same prompt, as judged by the task's verifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkling.rollout.groups import Group


@dataclass
class Pair:
    """One prompt (its token ids) with a chosen (verified correct) and a rejected (incorrect)
    completion; `ref_*` are the frozen reference policy's log-probs of each, filled in by the trainer."""

    problem_id: str
    prefix: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def preference_pairs(groups: list[Group], per_prompt: int, generator: torch.Generator) -> list[Pair]:
    """Up to `per_prompt` (correct, incorrect) pairs from each group; a group whose completions
    are all right or all wrong gives none (there is nothing to prefer).

    Both sides are shuffled, then pair i takes correct[i mod c] and incorrect[i mod w], for
    i < min(per_prompt, max(c, w)): every completion of the smaller side is used before one
    repeats, and no pair appears twice.
    """
    pairs = []
    for grp in groups:
        right = [c for c in grp.completions if c.correct]
        wrong = [c for c in grp.completions if not c.correct]
        if not right or not wrong:
            continue
        right = [right[i] for i in torch.randperm(len(right), generator=generator).tolist()]
        wrong = [wrong[i] for i in torch.randperm(len(wrong), generator=generator).tolist()]
        for i in range(min(per_prompt, max(len(right), len(wrong)))):
            pairs.append(Pair(grp.problem.id, grp.prefix, right[i % len(right)].ids, wrong[i % len(wrong)].ids))
    return pairs
