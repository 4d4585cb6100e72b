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

    def __init__(self, digits: int = 1, trace: str = "equation", slips: float = 0.0):
        """`digits` = operand digits; values stay in 0 .. 10**(digits+1) - 1 (0..99 by default).

        `trace` picks the expert step format:
        - "equation" (default): one equation per step, `37+5=42`, `42-8=34`, ... The model must
          find the j-th operation in the prompt by counting lines, which fails beyond the lengths
          seen in training (a positional failure that expert anchors cannot fix).
        - "rewrite": each step applies the first operation and copies what is left,
          `37 +5 -8 +9` -> `37+5=42 -8 +9` -> `42-8=34 +9` -> `34+9=43`. Every step reads only
          the line above, so k expert steps turn an n-step problem into an (n-k)-step one —
          what anchors rely on when a model has seen only short problems. It costs O(k²) tokens.

        `slips` > 0 makes imperfect demonstrations: each step's result is off by 1 to 5 with this
        probability, and the rest of the trace and the answer follow from the slip (the answer is
        then wrong — for SFT sets only; slips of several sizes rarely cancel out). A model trained on them knows each step but samples it
        right only ~(1 − slips) of the time, so success on a k-step problem falls like
        (1 − slips)^k under sampling while the most likely step stays correct.
        """
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
            raise ThinklingError(f"task 'chain': digits must be an int in 1..6, got {digits!r}")
        if trace not in ("rewrite", "equation"):
            raise ThinklingError(f"task 'chain': trace must be 'rewrite' or 'equation', got {trace!r}")
        if isinstance(slips, bool) or not isinstance(slips, (int, float)) or not 0 <= slips < 1:
            raise ThinklingError(f"task 'chain': slips must be a number in [0, 1), got {slips!r}")
        self.digits = digits
        self.trace = trace
        self.slips = float(slips)

    def problems(self, n, seed, difficulty=None):
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
                delta = rng.choice([d for d in (operand, -operand) if 0 <= value + d <= top])
                ops.append(f"{delta:+d}")
                result = value + delta
                if self.slips and rng.random() < self.slips:
                    result = rng.choice([r for d in range(1, 6) for r in (result - d, result + d) if 0 <= r <= top])
                steps.append(f"{value}{delta:+d}={result}")
                value = result
            if self.trace == "rewrite":
                steps = [" ".join([eq, *ops[j + 1 :]]) for j, eq in enumerate(steps)]
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
