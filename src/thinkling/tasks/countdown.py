"""`countdown`: reach a target from given numbers with + - * /.

The steps are the proof: one operation per line (`7*3=21`), each using
numbers still available (given ones, or results of earlier steps, each at
most once) and exactly right in integer arithmetic; the last result must be
the target, which the final line `A:<target>` repeats. Any such sequence
verifies, not only the expert's. Difficulty = how many numbers are given.
"""

from __future__ import annotations

import re
from collections import Counter

from thinkling.errors import ThinklingError
from thinkling.tasks.base import (
    Problem,
    Task,
    Verdict,
    extract_final_answer,
    register_task,
)
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for
from thinkling.tasks.templates import solution_lines

_STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def apply(op: str, a: int, b: int) -> int | None:
    """The result of one operation, or None when it is not a non-negative integer."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def steps_reach(numbers, target: int, lines) -> bool:
    """Whether the step lines are valid operations on available numbers ending at `target`."""
    pool, last = Counter(numbers), None
    for line in lines:
        m = _STEP.fullmatch(line.replace(" ", ""))
        if not m:
            return False
        a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
        pool[a] -= 1
        pool[b] -= 1
        if pool[a] < 0 or pool[b] < 0 or apply(op, a, b) != result:
            return False
        pool[result] += 1
        last = result
    return last == target


@register_task("countdown")
class CountdownTask(Task):
    """Reach a target from given numbers with + - * / (difficulty = count of numbers)."""

    description = "Reach a target from given numbers with + - * / (difficulty = count of numbers)"
    default_template = "countdown"

    def __init__(self, max_number: int = 10, max_value: int = 100, template=False, self_correct: float = 0.0):
        """Numbers are drawn from 1..max_number; every intermediate result stays <= max_value.
        `template` / `self_correct`: a `<plan>` and corrected slips in the trace (`tasks.templates`)."""
        for key, v in (("max_number", max_number), ("max_value", max_value)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ThinklingError(f"task 'countdown': {key} must be an int >= 2, got {v!r}")
        self.max_number, self.max_value = max_number, max_value
        self.set_scaffold(template, self_correct)

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("countdown", difficulty, default=3, minimum=2)
        rng = rng_for("countdown", seed)
        problems = []
        for i in range(check_count("countdown", n)):
            count = rng.choice(levels)
            numbers, steps = self._draw(rng, count)
            target = int(steps[-1].split("=")[1])
            problems.append(
                Problem(
                    id=f"countdown-{seed}-{i}",
                    prompt=f"{' '.join(map(str, numbers))} -> {target}",
                    answer=str(target),
                    steps=steps,
                    difficulty=float(count),
                    tags=("countdown", f"n={count}"),
                )
            )
        return problems

    def _draw(self, rng, count):
        """Random numbers and a random chain of operations using all of them."""
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(count)]
            pool, steps = list(numbers), []
            while len(pool) > 1:
                a, b = sorted(rng.sample(pool, 2), reverse=True)
                ops = [op for op in "+-*/" if self._useful(op, a, b)]
                if not ops:
                    break
                op = rng.choice(ops)
                result = apply(op, a, b)
                pool.remove(a)
                pool.remove(b)
                pool.append(result)
                steps.append(f"{a}{op}{b}={result}")
            if len(pool) == 1 and pool[0] not in numbers:
                return numbers, tuple(steps)

    def _useful(self, op, a, b):
        result = apply(op, a, b)
        trivial = (op == "-" and result == 0) or (op == "/" and b == 1)
        return result is not None and not trivial and result <= self.max_value

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = extract_final_answer(completion)
        lines = [line for line in solution_lines(completion) if line.strip()]
        numbers = [int(x) for x in problem.prompt.split("->")[0].split()]
        ok = got == problem.answer and steps_reach(numbers, int(problem.answer), lines)
        return Verdict(correct=ok, extracted=got)
