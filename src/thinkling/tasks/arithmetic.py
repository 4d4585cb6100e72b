"""`arithmetic`: "What is 37 + 45 + 19?" — sums a chat model reads as a question.

Made for small real models (SmolLM2-135M-Instruct answers 2-digit sums right about one
time in five): success is neither 0 nor 1, so RL has something to improve, and more
operands (the difficulty) make it rare, where BREAD's anchors matter. The expert trace does
one addition per line, then `The answer is \\boxed{N}.`; answers are checked like math answers
(`verify_math`), counted only when stated.

Two trace styles (`trace`), both one step per addition, so BREAD's anchors fall at the same
points: `pairs` (default) writes each addition alone, `93 + 88 = 181` then `181 + 99 = 280`;
`rewrite` rewrites the whole sum with its first two operands added, `93 + 88 + 99 = 181 + 99`
then `181 + 99 = 280`. A policy that answers in one line (`93 + 88 + 99 = ...`) reads a
`rewrite` anchor as its own first line with the first addition done, and what is left is a
shorter sum of the same kind; after a `pairs` anchor it must know to come back for the rest.

`midline: true` cuts every line after its ` =` into two steps, `93 + 88 + 99 =` and
` 181 + 99` (then a newline), so a BREAD anchor can stop where the policy's own first line
asks for a result: the continuation is the first partial sum, the tokens an unanchored policy
must write. The trace text (and so the SFT target) is unchanged; there are twice as many steps.
"""

from __future__ import annotations

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, Verdict, register_task
from thinkling.tasks.mathverify import last_boxed, verify_math
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for


@register_task("arithmetic")
class ArithmeticTask(Task):
    """Sums of `difficulty` operands (default 2) of `digits` digits each, asked in words."""

    description = "'What is 37 + 45?': sums of k operands of n digits (difficulty = k), math-verified answers"
    end_of_thinking = None  # free text ending with the answer sentence, then EOS
    line_based = False

    INSTRUCTION = ' Add the numbers step by step, then write the sum as "The answer is ...".'

    TRACES = ("pairs", "rewrite")

    def __init__(self, digits: int = 2, subtract: bool = False, instruct: bool = False, trace: str = "pairs",
                 midline: bool = False):
        """`digits` per operand (1..6); `subtract` also draws `-` (results stay >= 0); `instruct`
        appends how to state the answer to the question (a chat model otherwise rarely says it);
        `trace` is the expert trace's style, `midline` cuts its lines at ` =` (module docstring)."""
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
            raise ThinklingError(f"task 'arithmetic': digits must be an int in 1..6, got {digits!r}")
        if not isinstance(subtract, bool):
            raise ThinklingError(f"task 'arithmetic': subtract must be true or false, got {subtract!r}")
        if not isinstance(instruct, bool):
            raise ThinklingError(f"task 'arithmetic': instruct must be true or false, got {instruct!r}")
        if trace not in self.TRACES:
            raise ThinklingError(f"task 'arithmetic': trace must be one of {', '.join(self.TRACES)}, got {trace!r}")
        if not isinstance(midline, bool):
            raise ThinklingError(f"task 'arithmetic': midline must be true or false, got {midline!r}")
        self.digits, self.subtract, self.instruct, self.trace, self.midline = digits, subtract, instruct, trace, midline

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("arithmetic", difficulty, default=2, minimum=2)
        if max(levels) > 8:
            raise ThinklingError(f"task 'arithmetic': difficulty (number of operands) is at most 8, got {max(levels)}")
        rng = rng_for("arithmetic", seed)
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        problems = []
        for i in range(check_count("arithmetic", n)):
            k = rng.choice(levels)
            value = rng.randint(low, high)
            terms, values = [], [value]  # the operands after the first with their signs; the running sums
            for _ in range(k - 1):
                operand = rng.randint(low, high)
                sign = "-" if self.subtract and operand <= value and rng.random() < 0.5 else "+"
                value = value - operand if sign == "-" else value + operand
                terms.append(f" {sign} {operand}")
                values.append(value)
            expr = f"{values[0]}{''.join(terms)}"
            lines = self._trace(values, terms)
            steps, ends = _cut_at_equals(lines) if self.midline else (tuple(lines), ())
            prompt = f"What is {expr}?" + (self.INSTRUCTION if self.instruct else "")
            problems.append(Problem(id=f"arith-{seed}-{i}", prompt=prompt, answer=str(value), steps=steps,
                                    difficulty=float(k), tags=("arithmetic", f"k={k}"), step_ends=ends))
        return problems

    def _trace(self, values: list[int], terms: list[str]) -> list[str]:
        """The expert steps from the running sums and the signed operands (module docstring)."""
        if self.trace == "pairs":
            return [f"{values[i]}{terms[i]} = {values[i + 1]}" for i in range(len(terms))]
        return [f"{values[i]}{''.join(terms[i:])} = {values[i + 1]}{''.join(terms[i + 1:])}" for i in range(len(terms))]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        """Right only when the answer is stated (`The answer is N` / `\\boxed{N}`): the last-number
        fallback of `verify_math` would reward a stray number at the end of rambling text."""
        verdict = verify_math(problem.answer, completion, numeric=True)
        return verdict if self.format_ok(completion) else Verdict(False, verdict.extracted)

    def format_ok(self, completion: str) -> bool:
        return last_boxed(completion) is not None or "the answer is" in completion.lower()

    def answer_line(self, problem: Problem) -> str:
        return f"The answer is \\boxed{{{problem.answer}}}."


def _cut_at_equals(lines: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Each trace line as two steps, `a + b =` and ` s` (the result keeps its leading space, so the
    anchor ends on the ` =` token a tokenizer makes anyway); returns (steps, step_ends)."""
    steps = []
    for line in lines:
        left, right = line.split(" = ", 1)
        steps += [f"{left} =", f" {right}"]
    return tuple(steps), ("", "\n") * len(lines)
