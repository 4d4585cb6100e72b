"""`mnns`: minimum non-negative sum, the CoT2 paper's benchmark.

Give each of m digits a sign so that the total is the smallest value >= 0.
Several sign assignments are usually optimal; CoT2's continuous supervision
needs all of them (`optimal_traces`), while SFT and BREAD use one expert
trace (`Problem.steps`). Difficulty = m. Found by brute force over the 2**m
assignments, hence the cap on m.
"""

from __future__ import annotations

from itertools import product

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for

MAX_DIGITS = 16


def optimal_signs(digits: list[int] | tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every ±1 assignment reaching the minimum non-negative sum, '+' before '-' in order."""
    assignments = list(product((1, -1), repeat=len(digits)))
    totals = [sum(s * d for s, d in zip(signs, digits)) for signs in assignments]
    best = min(t for t in totals if t >= 0)
    return [signs for signs, t in zip(assignments, totals) if t == best]


def trace(digits, signs) -> tuple[str, ...]:
    """The steps of one assignment: each signed digit and the partial sum after it."""
    steps, total = [], 0
    for s, d in zip(signs, digits):
        total += s * d
        steps.append(f"{'+' if s > 0 else '-'}{d}={total}")
    return tuple(steps)


def optimal_traces(digits) -> list[tuple[str, ...]]:
    """The steps of every optimal assignment: the set of valid targets CoT2 supervises with."""
    return [trace(digits, signs) for signs in optimal_signs(digits)]


@register_task("mnns")
class MNNSTask(Task):
    """Minimum non-negative sum of m signed digits; steps are partial sums (difficulty = m)."""

    description = "Minimum non-negative sum of m signed digits; steps are partial sums (difficulty = m)"
    default_template = "mnns"

    def __init__(self, max_digit: int = 9, template=False, self_correct: float = 0.0):
        """`template` / `self_correct`: a `<plan>` and corrected slips in the trace (`tasks.templates`)."""
        if isinstance(max_digit, bool) or not isinstance(max_digit, int) or not 1 <= max_digit <= 9:
            raise ThinklingError(f"task 'mnns': max_digit must be an int in 1..9, got {max_digit!r}")
        self.max_digit = max_digit
        self.set_scaffold(template, self_correct)

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("mnns", difficulty, default=4, minimum=1)
        if max(levels) > MAX_DIGITS:
            raise ThinklingError(f"task 'mnns': difficulty (number of digits) is at most {MAX_DIGITS}")
        rng = rng_for("mnns", seed)
        problems = []
        for i in range(check_count("mnns", n)):
            m = rng.choice(levels)
            digits = [rng.randint(1, self.max_digit) for _ in range(m)]
            signs = optimal_signs(digits)
            problems.append(
                Problem(
                    id=f"mnns-{seed}-{i}",
                    prompt=" ".join(map(str, digits)),
                    answer=str(sum(s * d for s, d in zip(signs[0], digits))),
                    steps=trace(digits, signs[0]),
                    difficulty=float(m),
                    tags=("mnns", f"m={m}"),
                    meta={"digits": digits},
                )
            )
        return problems
