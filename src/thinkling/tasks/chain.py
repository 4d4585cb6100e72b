"""`chain`: a start value and k additions/subtractions applied left to right.

Built for tiny character-level models: each step is one local, learnable
operation (`37+5=42`), so a model that gets a step right with probability p
solves a k-step problem with probability about p**k — the regime where
BREAD's expert anchors matter. Difficulty = k.
"""

from __future__ import annotations

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for


@register_task("chain")
class ChainTask(Task):
    """Start value and k single-digit +/- operations; one step per operation (difficulty = k)."""

    description = "Start value and k single-digit +/- operations; one step per operation (difficulty = k)"

    def __init__(self, digits: int = 1):
        """`digits` = operand digits; values stay in 0 .. 10**(digits+1) - 1 (0..99 by default)."""
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
            raise ThinklingError(f"task 'chain': digits must be an int in 1..6, got {digits!r}")
        self.digits = digits

    def generate(self, n, seed, difficulty=None):
        levels = difficulty_levels("chain", difficulty, default=3, minimum=1)
        rng = rng_for("chain", seed)
        top = 10 ** (self.digits + 1) - 1
        problems = []
        for i in range(check_count("chain", n)):
            k = rng.choice(levels)
            start = value = rng.randint(0, top)
            ops, steps = [], []
            for _ in range(k):
                operand = rng.randint(1, 10**self.digits - 1)
                signs = [s for s, v in (("+", value + operand), ("-", value - operand)) if 0 <= v <= top]
                sign = rng.choice(signs)
                new = value + operand if sign == "+" else value - operand
                ops.append(f"{sign}{operand}")
                steps.append(f"{value}{sign}{operand}={new}")
                value = new
            problems.append(
                Problem(
                    id=f"chain-{seed}-{i}",
                    prompt=" ".join([str(start), *ops]),
                    answer=str(value),
                    steps=tuple(steps),
                    difficulty=float(k),
                    tags=("chain", f"k={k}"),
                )
            )
        return problems
