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

    def __init__(self, digits: int = 2, subtract: bool = False, instruct: bool = False, trace: str = "pairs"):
        """`digits` per operand (1..6); `subtract` also draws `-` (results stay >= 0); `instruct`
        appends how to state the answer to the question (a chat model otherwise rarely says it);
        `trace` is the expert trace's style (module docstring)."""
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
            raise ThinklingError(f"task 'arithmetic': digits must be an int in 1..6, got {digits!r}")
        if not isinstance(subtract, bool):
            raise ThinklingError(f"task 'arithmetic': subtract must be true or false, got {subtract!r}")
        if not isinstance(instruct, bool):
            raise ThinklingError(f"task 'arithmetic': instruct must be true or false, got {instruct!r}")
        if trace not in self.TRACES:
            raise ThinklingError(f"task 'arithmetic': trace must be one of {', '.join(self.TRACES)}, got {trace!r}")
        self.digits, self.subtract, self.instruct, self.trace = digits, subtract, instruct, trace

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
            steps = self._trace(values, terms)
            prompt = f"What is {expr}?" + (self.INSTRUCTION if self.instruct else "")
            problems.append(Problem(id=f"arith-{seed}-{i}", prompt=prompt, answer=str(value),
                                    steps=tuple(steps), difficulty=float(k), tags=("arithmetic", f"k={k}")))
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
