"""TLDR length control: the over-budget reward factor (the levels are prompt tags, `rollout.prompts`)."""

from __future__ import annotations


def tldr_length_factor(length: int, budget: float, lam: float) -> float:
    """1 − λ·clip((L − B)/B, 0, 1): no penalty within budget, at most λ from 2B on.

    Multiplies the accuracy reward, so a wrong answer gains nothing from being short.
    """
    return 1.0 - lam * min(max((length - budget) / budget, 0.0), 1.0)
