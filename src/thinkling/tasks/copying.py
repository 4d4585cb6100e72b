"""`copying`: selective copying, the second probe of the architecture lab.

The prompt scatters n distinct letters among noise dots (`.a..b.cd`); the
answer is the letters in order (`A:abcd`). Each letter is preceded by 0 to
`max_gap` dots, so the offset between a letter and its copy varies from row to
row: a model cannot copy by position alone, it must find "the letter after the
one I just wrote". Difficulty = n.
"""

from __future__ import annotations

import string

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for

LETTERS = string.ascii_letters
NOISE = "."


@register_task("copying")
class SelectiveCopyingTask(Task):
    """n distinct letters among noise dots; answer the letters in order (difficulty = n)."""

    description = "Selective copying: n letters scattered among noise dots; answer them in order (difficulty = n)"

    def __init__(self, max_gap: int = 2):
        if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 0:
            raise ThinklingError(f"task 'copying': max_gap must be an int >= 0, got {max_gap!r}")
        self.max_gap = max_gap

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("copying", difficulty, default=8, minimum=1)
        if max(levels) > len(LETTERS):
            raise ThinklingError(f"task 'copying': difficulty (number of letters) is at most {len(LETTERS)}")
        rng = rng_for("copying", seed)
        problems = []
        for i in range(check_count("copying", n)):
            k = rng.choice(levels)
            letters = rng.sample(LETTERS, k)
            prompt = "".join(NOISE * rng.randint(0, self.max_gap) + c for c in letters)
            problems.append(
                Problem(
                    id=f"copying-{seed}-{i}",
                    prompt=prompt + NOISE * rng.randint(0, self.max_gap),
                    answer="".join(letters),
                    difficulty=float(k),
                    tags=("copying", f"n={k}"),
                )
            )
        return problems
