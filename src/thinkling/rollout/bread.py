"""BREAD: branched rollouts from expert anchors (arXiv 2506.17211; our reading: docs/methods.md#bread).

When a whole group fails, search for the shortest prefix of the expert trace
from which a freshly sampled group contains a success, and train on that
branched group instead. All failing groups of a step search in lock-step, so
every probe round is one batched generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from thinkling.rollout.groups import Group, sample_groups


def default_max_probes(n_steps: int) -> int:
    return math.ceil(math.log2(max(1, n_steps))) + 1


@dataclass
class _Search:
    group: Group  # the failed on-policy group
    lo: int
    hi: int
    probes: int = 0
    best: Group | None = None
    next_k: int | None = None  # a forced first probe (below the remembered anchor)

    def probe_point(self) -> int:
        return self.next_k if self.next_k is not None else (self.lo + self.hi) // 2


def anchor_failed_groups(policy, task, failed: list[Group], group_size: int, params_for_round,
                         max_probes: int | None, memory: dict | None,
                         early_stop: bool = False) -> tuple[list[Group], dict]:
    """Replace each failed group by its shortest successful branch (or drop it).

    `params_for_round(r)` gives the sampling params of probe round r (its own seed).
    `memory` maps problem id -> last anchor (updated in place) when anchors are remembered.
    Returns (branched groups, stats). Binary search assumes success is monotone in k,
    the premise of anchoring: more expert steps never make the rest harder.
    A failed probe is discarded whole, so with `early_stop` a probe group stops being sampled
    once none of its samples can succeed (`groups.lost_rows`); the outcome is the same.
    """
    searches = []
    dropped_no_trace = 0
    for g in failed:
        n = len(g.problem.steps)
        if n == 0:
            dropped_no_trace += 1
            continue
        s = _Search(g, 1, n)
        last = memory.get(g.problem.id) if memory is not None else None
        if last is not None and 1 <= last - 1 <= n:
            s.next_k = last - 1
        searches.append(s)
    probes = 0
    rounds = 0
    generated = 0  # every probe's tokens, kept or not: BREAD's real generation cost
    while True:
        active = [s for s in searches if s.lo <= s.hi and s.probes < (max_probes or default_max_probes(len(s.group.problem.steps)))]
        if not active:
            break
        requests = [(s.group.problem, s.group.level, s.probe_point()) for s in active]
        results = sample_groups(policy, task, requests, group_size, params_for_round(rounds),
                                keys=[s.group.key for s in active],  # a probe's samples do not depend on the others
                                early_stop=early_stop)
        rounds += 1
        generated += sum(c.tokens for branch in results for c in branch.completions)
        for s, (_, _, k), branch in zip(active, requests, results):
            s.probes += 1
            probes += 1
            s.next_k = None
            if branch.has_success:
                s.best = branch
                s.hi = k - 1
            else:
                s.lo = k + 1
    kept = [s.best for s in searches if s.best is not None]
    if memory is not None:
        for s in searches:
            if s.best is not None:
                memory[s.group.problem.id] = s.best.anchor_steps
    stats = {
        "bread/probe_groups": probes,
        "bread/probe_rounds": rounds,
        "bread/dropped_no_trace": dropped_no_trace,
        "bread/dropped_unsolved": len(searches) - len(kept),
        "generated_tokens": generated,
    }
    return kept, stats
