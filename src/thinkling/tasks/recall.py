"""`recall`: associative recall, the classic probe of in-context retrieval.

The prompt lists n key-value pairs (distinct letter keys, digit values) and then
a query key; the answer is the value stored with that key: `a3k7Z1 k` -> `A:7`.
Difficulty = n, so a length-generalisation split trains at one n and tests at
larger ones. There are no steps: retrieval is one attention hop, which is the
point of the architecture lab's comparisons.
"""

from __future__ import annotations

import string

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for

KEYS = string.ascii_letters
VALUES = string.digits


@register_task("recall")
class AssociativeRecallTask(Task):
    """n key-value pairs (letter -> digit) then a query key; answer its value (difficulty = n)."""

    description = "Associative recall: n letter->digit pairs then a query key; answer its value (difficulty = n)"

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("recall", difficulty, default=8, minimum=1)
        if max(levels) > len(KEYS):
            raise ThinklingError(f"task 'recall': difficulty (number of pairs) is at most {len(KEYS)}")
        rng = rng_for("recall", seed)
        problems = []
        for i in range(check_count("recall", n)):
            pairs = rng.choice(levels)
            keys = rng.sample(KEYS, pairs)
            values = [rng.choice(VALUES) for _ in keys]
            query = rng.randrange(pairs)
            problems.append(
                Problem(
                    id=f"recall-{seed}-{i}",
                    prompt="".join(k + v for k, v in zip(keys, values)) + " " + keys[query],
                    answer=values[query],
                    difficulty=float(pairs),
                    tags=("recall", f"n={pairs}"),
                )
            )
        return problems
