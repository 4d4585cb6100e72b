"""What the procedurally generated tasks share: reading the `difficulty` argument."""

from __future__ import annotations

import random

from thinkling.errors import ThinklingError


def difficulty_levels(task: str, difficulty, default: int, minimum: int) -> list[int]:
    """The levels a generator may draw from, checked once so a bad recipe fails early."""
    if difficulty is None:
        return [default]
    levels = list(difficulty) if isinstance(difficulty, (list, tuple)) else [difficulty]
    if not levels:
        raise ThinklingError(f"task '{task}': difficulty is an empty list")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or level < minimum:
            raise ThinklingError(
                f"task '{task}': difficulty must be an int >= {minimum} or a list of them, got {difficulty!r}"
            )
    return levels


def check_count(task: str, n) -> int:
    """Synthetic tasks are infinite, so `n` (the number of problems) is required."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ThinklingError(
            f"task '{task}': give a number of problems (size / --limit); it generates problems without end, "
            f"so 'all' (null or --limit 0) has no meaning here (got {n!r})"
        )
    return n


def rng_for(task: str, seed: int) -> random.Random:
    """One stream per (task, seed): the same seed gives different problems in different tasks."""
    return random.Random(f"{task}:{seed}")
