"""`chain`: a start value and k additions/subtractions applied left to right.

Built for tiny character-level models: each step is one local, learnable
operation (`37+5=42`), so a model that gets a step right with probability p
solves a k-step problem with probability about p**k — the regime where
BREAD's expert anchors matter. Difficulty = k.
"""

from __future__ import annotations

import re
from collections import Counter

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, Verdict, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for
from thinkling.tasks.templates import CHECK_CLOSE, CHECK_OPEN, PLAN_CLOSE, PLAN_OPEN, render_spans, solution_lines

_STEP = re.compile(r"(\d+)((?:[+-]\d+)+)=(\d+)")


def steps_are_right(problem: Problem, completion: str) -> bool:
    """Every line before the answer applies the prompt's next operation(s), in order, to the value
    before it and states the right result; together they use every operation once. A plan line is
    skipped and a `<check>` line stands for the step before it (`templates.solution_lines`)."""
    right, used = _walk_steps(problem, solution_lines(completion))
    return right and used == len(problem.prompt.split()) - 1


def _walk_steps(problem: Problem, lines: list[str]) -> tuple[bool, int]:
    """(every line right, prompt operations they used) of step lines checked in order from the start."""
    start, *ops = problem.prompt.split()
    value, used = int(start), 0
    for line in lines:
        m = _STEP.fullmatch(line.strip())
        if m is None or int(m.group(1)) != value:
            return False, used
        line_ops = re.findall(r"[+-]\d+", m.group(2))
        if line_ops != ops[used : used + len(line_ops)]:
            return False, used
        value, used = value + sum(int(o) for o in line_ops), used + len(line_ops)
        if int(m.group(3)) != value:
            return False, used
    return True, used


def steps_already_wrong(problem: Problem, partial: str) -> bool:
    """Whether no continuation of the partial completion `partial` (none included) can pass
    `steps_are_right`: a step line that stays in every continuation's solution is wrong.

    The lines before the last one with any text stay step lines whatever follows (only the last
    line of a completion is its answer). Of those, the last step may still be replaced by a
    `<check>` line (after plan lines), unless the line after it has begun with text that cannot
    open a check or plan line."""
    text = partial.lstrip()
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=None)
    if last is None:
        return False
    steps = solution_lines("\n".join(lines[: last + 1]))
    head = lines[last].lstrip()
    if any(head[: len(tag)] == tag[: len(head)] for tag in (CHECK_OPEN, PLAN_OPEN)):
        steps = steps[:-1]  # its last step may still be replaced
    return not _walk_steps(problem, steps)[0]


def check_outcomes(completion: str, problem: Problem | None = None) -> Counter:
    """What the `<check>` lines of a completion did (S2R-style self-verification).

    A step line is right when its stated result is its start plus its operations; with `problem`
    also when it starts from the result of the line before (the prompt's start for the first) and
    applies the prompt's next operation(s), so a line that reads the wrong operation is wrong too.
    A `<check>` line stands for the step line before it:
    - `steps`, `wrong`: step lines, and the wrong ones;
    - `checks`; `fixed`: a check after a wrong line that is itself a right version of it (same
      start); `not_fixed`: a check after a wrong line that is not; `unneeded`: a check after a
      right line, `broke` when that check is not right itself (it turned a right line wrong);
    - `missed`: wrong lines with no check after them.
    Plan lines and the answer line (the last) are skipped."""
    out: Counter = Counter({k: 0 for k in ("steps", "wrong", "checks", "fixed", "not_fixed", "unneeded", "broke",
                                           "missed")})
    start, *ops = problem.prompt.split() if problem is not None else ("", )
    value, used = start, 0  # the result a right line starts from, and the prompt operations used so far
    last = None  # (right start, operations used before, wrong?, own start) of the step a check stands for

    def judge(text: str, from_value: str, at: int) -> tuple[bool, int, str | None]:
        """(right?, operations used after it, its result) of one step line."""
        m = _STEP.fullmatch(text.strip())
        if m is None:
            return False, at, None
        line_ops = re.findall(r"[+-]\d+", m.group(2))
        right = int(m.group(1)) + sum(int(o) for o in line_ops) == int(m.group(3))
        if problem is not None:
            right = right and m.group(1) == from_value and line_ops == ops[at : at + len(line_ops)]
        return right, at + len(line_ops), m.group(3)

    for line in completion.strip().split("\n")[:-1]:
        s = line.strip()
        if s.startswith(PLAN_OPEN) and s.endswith(PLAN_CLOSE):
            continue
        if s.startswith(CHECK_OPEN) and s.endswith(CHECK_CLOSE):
            out["checks"] += 1
            body = s[len(CHECK_OPEN) : -len(CHECK_CLOSE)]
            if last is None:  # a check with no step before it, or a second check in a row
                out["unneeded"] += 1
                out["broke"] += 1
                continue
            from_value, at, was_wrong, line_start = last
            right, used_after, result = judge(body, from_value, at)
            m = _STEP.fullmatch(body.strip())
            right = right and m is not None and m.group(1) == line_start
            if was_wrong:
                out["fixed" if right else "not_fixed"] += 1
                out["missed"] -= 1
            else:
                out["unneeded"] += 1
                out["broke"] += not right
            value, used, last = result, used_after, None
            continue
        right, used_after, result = judge(s, value, used)
        m = _STEP.fullmatch(s)
        out["steps"] += 1
        out["wrong"] += not right
        out["missed"] += not right
        last = (value, used, not right, m.group(1) if m else None)
        value, used = result, used_after
    return out


@register_task("chain")
class ChainTask(Task):
    """Start value and k single-digit +/- operations; one step per operation (difficulty = k)."""

    description = "Start value and k single-digit +/- operations; one step per operation (difficulty = k)"
    default_template = "chain"

    def __init__(self, digits: int = 1, trace: str = "equation", slips: float = 0.0, merge: float = 0.0,
                 strict: bool = False, template=False, self_correct: float = 0.0, per_line: int = 0):
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

        `merge` > 0 makes traces of several lengths: each operation joins the line of the one
        before with this probability (`37+5-8=34` does two at once). A merged line is harder
        for a small model, so a shorter trace is a riskier one — a task where a longer
        thinking budget buys accuracy (what TLDR's length levels trade).

        `per_line` = n > 0 is the deterministic form: every line does n operations (the last line
        what is left), so `per_line: 2` turns 4 operations into 2 lines and 3 into 2. One fixed
        rule per trace style gives each style one length per k (TLDR levels need that).

        `template` (true or a template name) opens the trace with a `<plan>` of its steps;
        `self_correct` = p gives a share p of traces a slip caught by a `<check>` line
        (`tasks.templates`).
        """
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
            raise ThinklingError(f"task 'chain': digits must be an int in 1..6, got {digits!r}")
        if trace not in ("rewrite", "equation"):
            raise ThinklingError(f"task 'chain': trace must be 'rewrite' or 'equation', got {trace!r}")
        if isinstance(slips, bool) or not isinstance(slips, (int, float)) or not 0 <= slips < 1:
            raise ThinklingError(f"task 'chain': slips must be a number in [0, 1), got {slips!r}")
        if isinstance(merge, bool) or not isinstance(merge, (int, float)) or not 0 <= merge <= 1:
            raise ThinklingError(f"task 'chain': merge must be a number in [0, 1], got {merge!r}")
        if isinstance(per_line, bool) or not isinstance(per_line, int) or per_line < 0:
            raise ThinklingError(f"task 'chain': per_line must be an int >= 0 (0 = off), got {per_line!r}")
        if per_line and merge:
            raise ThinklingError("task 'chain': per_line and merge both set the operations per line; set one (merge: 0)")
        if (merge or per_line) and trace == "rewrite":
            raise ThinklingError("task 'chain': merge and per_line apply to the equation trace, not trace: rewrite")
        if not isinstance(strict, bool):
            raise ThinklingError(f"task 'chain': strict must be true or false, got {strict!r}")
        if strict and trace == "rewrite":
            raise ThinklingError("task 'chain': strict checks the equation trace, not trace: rewrite")
        if (template or self_correct) and trace == "rewrite":
            raise ThinklingError("task 'chain': template and self_correct apply to the equation trace, not trace: rewrite")
        self.set_scaffold(template, self_correct)
        self.digits = digits
        self.trace = trace
        self.slips = float(slips)
        self.merge = float(merge)
        self.per_line = per_line
        self.strict = strict

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("chain", difficulty, default=3, minimum=1)
        rng = rng_for("chain", seed)
        top = 10 ** (self.digits + 1) - 1
        problems = []
        for i in range(check_count("chain", n)):
            k = rng.choice(levels)
            start = value = rng.randint(0, top)
            ops, steps = [], []
            line_start, line_ops = value, ""
            for j in range(k):
                operand = rng.randint(1, 10**self.digits - 1)
                delta = rng.choice([d for d in (operand, -operand) if 0 <= value + d <= top])
                ops.append(f"{delta:+d}")
                value += delta
                line_ops += f"{delta:+d}"
                if j + 1 < k and self.per_line and (j + 1) % self.per_line:
                    continue  # this line has room for the next operation
                if j + 1 < k and self.merge and rng.random() < self.merge:
                    continue  # the next operation joins this line
                if self.slips and rng.random() < self.slips:
                    value = rng.choice([r for d in range(1, 6) for r in (value - d, value + d) if 0 <= r <= top])
                steps.append(f"{line_start}{line_ops}={value}")
                line_start, line_ops = value, ""
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

    def verify(self, problem: Problem, completion: str) -> Verdict:
        verdict = super().verify(problem, completion)
        if not self.strict or not verdict.correct:
            return verdict
        return Verdict(steps_are_right(problem, completion), verdict.extracted)

    def cannot_succeed(self, problem: Problem, partial: str) -> bool:
        """Strict checking fails a completion at its first wrong step line (`steps_already_wrong`)."""
        return self.strict and steps_already_wrong(problem, partial)


@register_task("chain_verbose")
class VerboseChainTask(Task):
    """`chain` (equation trace) whose expert trace ends with r redundant `check` lines.

    After the k step lines `37+5=42`, ... the trace re-does the last r steps, in order, as
    `check 37+5=42` lines (r uniform in 0..k), then `A:N`. With `checks="repeat"` the r check lines
    all restate the last step instead (each a copy of the line above, so a model can hardly get a
    check wrong). Both modes draw the same problems and the same r.
    The checks carry no information (the answer is already on the last step line; the last
    check line repeats it), so up to ~45 % of the trace is slack: the regime of "small models
    don't know when to stop thinking". `verbose=False` gives the plain chain trace.
    No check line contains the letter 'A', so the end-of-thinking marker `A:` stays unambiguous.
    """

    description = "chain with r redundant 'check' lines at the end of the expert trace"

    def __init__(self, check_prob: float = 1.0, verbose: bool = True, checks: str = "suffix"):
        if checks not in ("suffix", "repeat"):
            raise ThinklingError(f"task 'chain_verbose': checks must be 'suffix' or 'repeat', got {checks!r}")
        self.check_prob = float(check_prob)
        self.verbose = bool(verbose)
        self.checks = checks

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("chain_verbose", difficulty, default=3, minimum=1)
        rng = rng_for("chain_verbose", seed)
        problems = []
        for i in range(check_count("chain_verbose", n)):
            k = rng.choice(levels)
            start = value = rng.randint(0, 99)
            ops, steps = [], []
            for _ in range(k):
                operand = rng.randint(1, 9)
                delta = rng.choice([d for d in (operand, -operand) if 0 <= value + d <= 99])
                ops.append(f"{delta:+d}")
                steps.append(f"{value}{delta:+d}={value + delta}")
                value += delta
            r = rng.randint(0, k) if rng.random() < self.check_prob else 0
            if not self.verbose:
                checks = []
            elif self.checks == "suffix":  # re-do the last r steps, in order
                checks = [f"check {s}" for s in steps[k - r:]]
            else:  # "repeat": restate the last step r times (a copy of the line above: harmless)
                checks = [f"check {steps[-1]}"] * r
            problems.append(Problem(id=f"chainv-{seed}-{i}", prompt=" ".join([str(start), *ops]), answer=str(value),
                                    steps=tuple(steps), difficulty=float(k), tags=("chain", f"k={k}"),
                                    meta={"checks": tuple(checks)}))
        return problems

    def target_spans(self, problem: Problem):
        return render_spans(tuple(problem.steps) + tuple(problem.meta.get("checks", ())), self.answer_line(problem))
