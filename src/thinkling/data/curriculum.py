"""Curriculum samplers: which training problems a step draws.

A sampler picks indices into the training problems from the step's random stream, so its choice
is a function of (seed, step, its state). RL reports each group's outcome back (`observe`), and
the state is saved in the checkpoint as JSON, so a resumed run picks exactly what an
uninterrupted one does. `uniform` is the plain draw the trainers always made (same stream, same
picks). `ordered` and `bandit` work on difficulty buckets; `filter` and `lfr` on each problem's
own record of outcomes.
"""

from __future__ import annotations

import math

import torch

from thinkling.data.records import read_records
from thinkling.errors import ThinklingError

NEEDS_DIFFICULTY = ("ordered", "bandit")
PROGRESS_EMA = 0.3  # bandit: weight of the newest change in a cluster's success rate
SOLVED = 0.5  # lfr: a visit solves a problem when at least this share of its group is right
HARD, FORGOTTEN, UNSEEN = 2.0, 4.0, 1.0  # lfr: draw weights (a solved problem waits for review)


# ------------------------------------------------------------------ the maths (pure functions)
def difficulty_buckets(difficulties: list[float], n_buckets: int) -> list[int]:
    """The bucket of each problem, 0 = easiest: equal-count splits of the sorted difficulties,
    with equal difficulties always in one bucket (so there may be fewer than `n_buckets`)."""
    ordered = sorted(difficulties)
    first_rank: dict[float, int] = {}
    for rank, d in enumerate(ordered):
        first_rank.setdefault(d, rank)
    raw = {d: r * n_buckets // len(ordered) for d, r in first_rank.items()}
    renumber = {b: i for i, b in enumerate(sorted(set(raw.values())))}
    return [renumber[raw[d]] for d in difficulties]


def ordered_bucket(step: int, steps: int, n_buckets: int) -> int:
    """The bucket step `step` of `steps` trains on: the run is cut into equal phases, easiest first."""
    return min(n_buckets - 1, step * n_buckets // max(1, steps))


def saturated(rates: list[float], window: int) -> bool:
    """The last `window` visits were all solved G/G, or all failed 0/G: no group-relative signal."""
    last = rates[-window:]
    return len(last) == window and (all(r == 1 for r in last) or all(r == 0 for r in last))


def bandit_probs(progress: list[float], temperature: float, explore: float) -> list[float]:
    """Softmax of each cluster's learning progress, mixed with an even spread so no cluster starves."""
    top = max(progress)
    e = [math.exp((p - top) / temperature) for p in progress]
    return [(1 - explore) * x / sum(e) + explore / len(e) for x in e]


def lfr_weight(last: float | None, solved_before: bool) -> float:
    """Draw weight of one problem from its latest pass rate (None: never drawn): forgotten (solved
    once, failed now) > hard (failed) > unseen > solved (0: solved ones come back only for review)."""
    if last is None:
        return UNSEEN
    if last >= SOLVED:
        return 0.0
    return FORGOTTEN if solved_before else HARD


# ----------------------------------------------------------------------------- samplers
class Uniform:
    """Every problem equally likely, with replacement."""

    learns_from_outcomes = False  # True: `observe` changes what it picks (RL must report every group)

    def __init__(self, n: int):
        self.n = n

    def pick(self, n: int, step: int, g: torch.Generator) -> list[int]:
        return torch.randint(self.n, (n,), generator=g).tolist()

    def observe(self, outcomes: list[tuple[int, int, int]]) -> None:
        """(problem index, right completions, group size) of each sampled group."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def stats(self) -> dict:
        return {}


def _draw(pool: list[int], n: int, g: torch.Generator) -> list[int]:
    return [pool[i] for i in torch.randint(len(pool), (n,), generator=g).tolist()]


def _weighted(weights: list[float], n: int, g: torch.Generator) -> list[int]:
    return torch.multinomial(torch.tensor(weights, dtype=torch.float64), n, replacement=True, generator=g).tolist()


class Ordered(Uniform):
    """Easy to hard: the run is cut into one phase per difficulty bucket, each drawing from its bucket."""

    def __init__(self, buckets: list[int], steps: int):
        super().__init__(len(buckets))
        self.members = [[i for i, b in enumerate(buckets) if b == k] for k in range(max(buckets) + 1)]
        self.steps, self.bucket = steps, 0

    def pick(self, n, step, g):
        self.bucket = ordered_bucket(step, self.steps, len(self.members))
        return _draw(self.members[self.bucket], n, g)

    def stats(self):
        return {"curriculum/bucket": self.bucket}


class PassRateFilter(Uniform):
    """Skip problems whose last `window` groups were all right or all wrong: GRPO learns nothing
    from a group with equal rewards, so those rollouts are wasted. When every problem is skipped
    it draws from all of them."""

    learns_from_outcomes = True

    def __init__(self, n: int, window: int):
        super().__init__(n)
        self.window, self.rates, self.skipped = window, {}, 0

    def pick(self, n, step, g):
        pool = [i for i in range(self.n) if not saturated(self.rates.get(str(i), []), self.window)]
        self.skipped = self.n - len(pool)
        return _draw(pool or list(range(self.n)), n, g)

    def observe(self, outcomes):
        for i, right, size in outcomes:
            self.rates[str(i)] = (self.rates.get(str(i), []) + [right / size])[-self.window:]

    def state(self):
        return {"rates": self.rates}

    def load_state(self, state):
        self.rates = {k: list(v) for k, v in state.get("rates", {}).items()}

    def stats(self):
        return {"curriculum/skipped": self.skipped}


class Bandit(Uniform):
    """SPaRFT-style: a bandit over difficulty clusters, each rewarded by its learning progress
    (how much its success rate changed between visits, smoothed). Mass moves to the clusters
    the policy is learning (or forgetting) now, away from mastered or hopeless ones."""

    learns_from_outcomes = True

    def __init__(self, buckets: list[int], temperature: float, explore: float):
        super().__init__(len(buckets))
        self.bucket_of = buckets
        self.members = [[i for i, b in enumerate(buckets) if b == k] for k in range(max(buckets) + 1)]
        self.temperature, self.explore = temperature, explore
        self.progress = [0.0] * len(self.members)
        self.last_rate: list[float | None] = [None] * len(self.members)

    def probs(self) -> list[float]:
        return bandit_probs(self.progress, self.temperature, self.explore)

    def pick(self, n, step, g):
        clusters = _weighted(self.probs(), n, g)
        return [self.members[c][int(torch.randint(len(self.members[c]), (1,), generator=g))] for c in clusters]

    def observe(self, outcomes):
        right, total = [0] * len(self.members), [0] * len(self.members)
        for i, r, size in outcomes:
            right[self.bucket_of[i]] += r
            total[self.bucket_of[i]] += size
        for c in range(len(self.members)):
            if not total[c]:
                continue
            rate = right[c] / total[c]
            if self.last_rate[c] is not None:
                change = abs(rate - self.last_rate[c])
                self.progress[c] = (1 - PROGRESS_EMA) * self.progress[c] + PROGRESS_EMA * change
            self.last_rate[c] = rate

    def state(self):
        return {"progress": self.progress, "last_rate": self.last_rate}

    def load_state(self, state):
        self.progress = list(state.get("progress", self.progress))
        self.last_rate = list(state.get("last_rate", self.last_rate))

    def stats(self):
        return {f"curriculum/p{c}": p for c, p in enumerate(self.probs())}


class LFR(Uniform):
    """Learn, Focus, Review: draw failed problems more than unseen ones and forgotten ones (solved
    once, failed since) most; solved problems leave the draw, and every `review_every`-th step
    draws only from them, so forgetting is noticed and the problem comes back as forgotten."""

    learns_from_outcomes = True

    def __init__(self, n: int, review_every: int):
        super().__init__(n)
        self.review_every = review_every
        self.last: dict[str, float] = {}  # latest pass rate by problem index
        self.solved: set[str] = set()  # solved on some visit
        self.reviewing = 0

    def pick(self, n, step, g):
        solved_now = [i for i in range(self.n) if self.last.get(str(i), 0.0) >= SOLVED]
        self.reviewing = int(bool(solved_now) and (step + 1) % self.review_every == 0)
        if self.reviewing:
            return _draw(solved_now, n, g)
        weights = [lfr_weight(self.last.get(str(i)), str(i) in self.solved) for i in range(self.n)]
        return _weighted(weights, n, g) if any(weights) else _draw(list(range(self.n)), n, g)

    def observe(self, outcomes):
        for i, right, size in outcomes:
            self.last[str(i)] = right / size
            if right / size >= SOLVED:
                self.solved.add(str(i))

    def state(self):
        return {"last": self.last, "solved": sorted(self.solved)}

    def load_state(self, state):
        self.last = dict(state.get("last", {}))
        self.solved = set(state.get("solved", []))

    def stats(self):
        return {"curriculum/reviewing": self.reviewing,
                "curriculum/forgotten": sum(1 for k in self.solved if self.last[k] < SOLVED)}


# --------------------------------------------------------------------------- building
def measured_difficulties(path: str, problems) -> list[float]:
    """Each problem's difficulty from a `thinkling difficulty` file (1 − pass rate, by problem id)."""
    rows = read_records(path)
    if not rows:
        raise ThinklingError(f"config key 'curriculum.difficulty_file': {path} has no rows (run `thinkling difficulty`)")
    by_id = {}
    for number, row in enumerate(rows, start=1):
        d = row.get("difficulty")
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise ThinklingError(f"{path}:{number}: 'difficulty' must be a number, got {d!r}")
        by_id[str(row["id"])] = float(d)
    missing = [p.id for p in problems if p.id not in by_id]
    if missing:
        raise ThinklingError(f"config key 'curriculum.difficulty_file': {path} has no difficulty for {len(missing)} "
                             f"training problems (first: {missing[0]}); measure the same task, seed and size")
    return [by_id[p.id] for p in problems]


def make_sampler(cfg, problems, steps: int, kind: str = "rl"):
    """The sampler a recipe's `curriculum` section names, for these training problems and `steps`
    steps; one error when it cannot work (no outcomes in SFT, no spread of difficulty)."""
    name = cfg.sampler
    learns = {"filter": PassRateFilter, "bandit": Bandit, "lfr": LFR}.get(name, Uniform).learns_from_outcomes
    if kind == "sft" and learns:  # SFT has no rollouts to learn outcomes from
        raise ThinklingError(f"config key 'curriculum.sampler': '{name}' learns from rollout outcomes, which SFT "
                             "does not have; SFT takes uniform or ordered")
    difficulties = (measured_difficulties(cfg.difficulty_file, problems) if cfg.difficulty_file
                    else [p.difficulty for p in problems])
    if name in NEEDS_DIFFICULTY and len(set(difficulties)) < 2:
        raise ThinklingError(f"config key 'curriculum.sampler': '{name}' needs problems of different difficulty, "
                             f"but all {len(problems)} training problems have difficulty {difficulties[0]:g}; "
                             "use a task that generates several levels or measure them (thinkling difficulty, "
                             "then curriculum.difficulty_file)")
    if name == "ordered":
        return Ordered(difficulty_buckets(difficulties, cfg.buckets), steps)
    if name == "bandit":
        return Bandit(difficulty_buckets(difficulties, cfg.buckets), cfg.temperature, cfg.explore)
    if name == "filter":
        return PassRateFilter(len(problems), cfg.window)
    if name == "lfr":
        return LFR(len(problems), cfg.review_every)
    return Uniform(len(problems))
