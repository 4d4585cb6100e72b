"""`gym`: any reasoning-gym dataset as a task, e.g. `get_task("gym", dataset="countdown", min_numbers=3)`.

reasoning-gym (offline, ~100 procedural generators) brings questions, answers
and a scorer per dataset, but no expert steps. The completion ends with the
`A:` answer line as in the synthetic tasks, except that the answer may span
several lines (grids, boards); the dataset's own `score_answer` judges it.

Difficulty: `problems(..., difficulty=L)` draws from the dataset's curriculum
at level L (0 = easiest) and records L. Without it, a problem's difficulty is
where its metadata values sit in the configured ranges, averaged (0..1), or
0 when the metadata does not say.
"""

from __future__ import annotations

from thinkling.errors import ThinklingError
from thinkling.tasks.base import ANSWER_PREFIX, Problem, Task, Verdict, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for


def gym_answer(completion: str) -> str | None:
    """Everything after the last line that starts with `A:` (answers may be multi-line)."""
    text = completion.rstrip()
    i = text.rfind("\n" + ANSWER_PREFIX)
    if i >= 0:
        return text[i + 1 + len(ANSWER_PREFIX) :].strip()
    return text[len(ANSWER_PREFIX) :].strip() if text.startswith(ANSWER_PREFIX) else None


def metadata_difficulty(metadata: dict) -> float:
    """Mean position (0..1) of the entry's knob values within the dataset's difficulty ranges."""
    ranges = metadata.get("difficulty")
    if isinstance(ranges, (int, float)) and not isinstance(ranges, bool):
        return float(ranges)
    positions = []
    for key, span in (ranges or {}).items():
        value = metadata.get(key, metadata.get(f"num_{key}"))
        value = len(value) if isinstance(value, (list, tuple)) else value
        if isinstance(value, (int, float)) and isinstance(span, (list, tuple)) and len(span) == 2:
            low, high = span
            if isinstance(low, (int, float)) and isinstance(high, (int, float)) and high > low:
                positions.append(min(1.0, max(0.0, (value - low) / (high - low))))
    return sum(positions) / len(positions) if positions else 0.0


@register_task("gym")
class GymTask(Task):
    """A reasoning-gym dataset (option: dataset, plus the dataset's own config keys)."""

    description = "A reasoning-gym dataset (option: dataset, plus the dataset's own config keys)"

    def __init__(self, dataset: str, **gym_kwargs):
        from reasoning_gym.factory import DATASETS, create_dataset

        if dataset not in DATASETS:
            raise ThinklingError(f"task 'gym': unknown reasoning-gym dataset {dataset!r}")
        if {"size", "seed"} & set(gym_kwargs):
            raise ThinklingError("task 'gym': size and seed come from problems(n, seed); remove them from the options")
        self.dataset, self.gym_kwargs = dataset, gym_kwargs
        try:  # also validates the options now rather than at the first call
            self._scorer = create_dataset(dataset, size=1, seed=0, **gym_kwargs)
        except Exception as e:
            raise ThinklingError(f"task 'gym' ({dataset}): bad options {gym_kwargs}: {e}") from None

    def problems(self, n, seed, difficulty=None):
        from reasoning_gym.factory import create_dataset

        n = check_count("gym", n)
        if difficulty is None:
            entries = list(create_dataset(self.dataset, size=n, seed=seed, **self.gym_kwargs)) if n else []
            return [self._problem(e, seed, i, metadata_difficulty(e["metadata"])) for i, e in enumerate(entries)]
        levels = difficulty_levels("gym", difficulty, default=0, minimum=0)
        rng = rng_for(f"gym/{self.dataset}", seed)
        drawn = [rng.choice(levels) for _ in range(n)]
        entries = {level: iter(self._at_level(level, drawn.count(level), seed)) for level in set(drawn)}
        return [self._problem(next(entries[level]), seed, i, float(level)) for i, level in enumerate(drawn)]

    def _at_level(self, level: int, size: int, seed: int):
        """`size` entries from the dataset's curriculum set to `level`."""
        from reasoning_gym.factory import DATASETS, create_curriculum

        curriculum = create_curriculum(self.dataset)
        curriculum.set_global_level(level)
        config = curriculum.generate_configuration({**self.gym_kwargs, "size": size, "seed": seed * 1000 + level})
        return list(DATASETS[self.dataset][0](config=config))

    def _problem(self, entry: dict, seed: int, i: int, difficulty: float) -> Problem:
        return Problem(
            id=f"gym-{self.dataset}-{seed}-{i}",
            prompt=entry["question"],
            answer=str(entry["answer"]),
            difficulty=difficulty,
            tags=("gym", self.dataset),
            meta={"entry": entry},
        )

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = gym_answer(completion)
        if got is None:
            return Verdict(correct=False, extracted=None)
        if "entry" not in problem.meta:
            raise ThinklingError(f"problem {problem.id}: a gym problem needs its reasoning-gym entry in meta['entry']")
        try:
            score = self._scorer.score_answer(answer=got, entry=problem.meta["entry"])
        except Exception:  # a scorer crashing on malformed model output means "wrong"
            score = 0.0
        return Verdict(correct=score is not None and score >= 1.0 - 1e-9, extracted=got)

    def format_ok(self, completion: str) -> bool:
        return gym_answer(completion) is not None
