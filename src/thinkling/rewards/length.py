"""TLDR length control: length levels as prompt tags and the over-budget reward factor."""

from __future__ import annotations

import random

from thinkling.errors import ThinklingError

LENGTH_LEVELS = ("short", "medium", "long")


def tldr_length_factor(length: int, budget: float, lam: float) -> float:
    """1 − λ·clip((L − B)/B, 0, 1): no penalty within budget, at most λ from 2B on.

    Multiplies the accuracy reward, so a wrong answer gains nothing from being short.
    """
    return 1.0 - lam * min(max((length - budget) / budget, 0.0), 1.0)


def check_level(level: str) -> str:
    if level not in LENGTH_LEVELS:
        raise ThinklingError(f"unknown length level '{level}'; known: {', '.join(LENGTH_LEVELS)}")
    return level


def tag_prompt(prompt: str, level: str) -> str:
    """The prompt with its length level as a control tag, e.g. "[short] 3+4=?"."""
    return f"[{check_level(level)}] {prompt}"


def sample_levels(n: int, seed: int, levels: tuple[str, ...] = LENGTH_LEVELS) -> list[str]:
    """`n` levels drawn uniformly from `levels`, deterministic in `seed` (one per training prompt)."""
    for level in levels:
        check_level(level)
    rng = random.Random(seed)
    return [rng.choice(levels) for _ in range(n)]
