"""The problem type every task produces, and the registry recipes name tasks by."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from thinkling.errors import ThinklingError
from thinkling.tasks.templates import (
    Span,
    near_miss,
    render_spans,
    self_correct_option,
    slip_for,
    spans_text,
    template_option,
)


@dataclass(frozen=True)
class Problem:
    """One reasoning problem.

    `steps` is the expert solution split into steps (empty when there is none);
    BREAD uses them as anchors and SFT renders them as the target completion.
    `step_ends` is the text after each step when it is not a newline (empty: a newline after
    every step): a task that cuts a line into several steps (`arithmetic`'s `midline`) says so
    here, so anchors and the SFT target join the steps back into the exact trace.
    `images` are PIL images (RGB) shown with the prompt; only a vision-language policy
    takes them (`rollout.prompts.prompt_ids`, `models.images`).
    """

    id: str
    prompt: str
    answer: str
    steps: tuple[str, ...] = ()
    difficulty: float = 0.0
    tags: tuple[str, ...] = ()
    images: tuple = field(default=(), hash=False)  # PIL images are unhashable; equality compares pixels
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    step_ends: tuple[str, ...] = ()

    def step_end(self, j: int) -> str:
        """The text after step j in the trace (`step_ends`, else a newline)."""
        return self.step_ends[j] if self.step_ends else "\n"


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None


# The synthetic tasks share one completion format: one step per line, then a
# final line "A:<answer>". "A:" doubles as the end-of-thinking marker that
# temperature scaling and budget forcing act on.
ANSWER_PREFIX = "A:"
_ANSWER_LINE = re.compile(r"(?:^|\n)A:([^\n]*)\s*$")


def render_completion(steps: tuple[str, ...] | list[str], answer: str) -> str:
    """The target text of a synthetic problem: its steps, then the answer line."""
    return "".join(f"{s}\n" for s in steps) + f"{ANSWER_PREFIX}{answer}"


def extract_final_answer(completion: str) -> str | None:
    """The answer on the final `A:` line, or None when the format is broken."""
    m = _ANSWER_LINE.search(completion.rstrip())
    return m.group(1).strip() if m else None


class Task:
    """A family of problems with a verifier.

    Subclasses implement `problems` (deterministic in `seed`) and may override
    `verify` / `format_ok` when their answers are not plain strings.
    """

    name: str = ""
    description: str = ""
    # Text that ends the thinking part of a completion (TS / budget forcing act on it).
    end_of_thinking: str = ANSWER_PREFIX
    # True when the end-of-thinking marker must start a line (the `A:` answer line above):
    # budget forcing then writes it only at a line start, since a mid-line `A:` fails the format.
    # Set False for a marker that may follow any token (`</think>`, EOS).
    line_based: bool = True
    # Structured solution templates (tasks.templates): the template the expert trace opens its plan
    # with (None: no plan), the share of traces with a corrected slip, and the template `true` names.
    template = None
    self_correct: float = 0.0
    default_template: str | None = None

    def problems(self, n: int | None, seed: int, difficulty=None) -> list[Problem]:
        """`n` problems (all of a fixed benchmark when None), deterministic in `seed`.

        `difficulty` is an int, a list of ints (each problem draws one uniformly),
        or None for the task's default.
        """
        raise NotImplementedError

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = extract_final_answer(completion)
        return Verdict(correct=got is not None and got == problem.answer, extracted=got)

    def format_ok(self, completion: str) -> bool:
        return extract_final_answer(completion) is not None

    def cannot_succeed(self, problem: Problem, partial: str) -> bool:
        """True only when no continuation of the partial completion `partial` (the empty one
        included) can verify as correct, so a sampler may stop it (BREAD's probe early stop).
        Never True for a text that could still succeed; by default nothing is known lost."""
        return False

    def set_scaffold(self, template=False, self_correct=0.0) -> None:
        """The `template` and `self_correct` options (tasks.templates), checked once."""
        if template is True and self.default_template is None:
            raise ThinklingError(f"task '{self.name}': has no template of its own; name one (template: <name>)")
        self.template = template_option(self.name, template, self.default_template)
        self.self_correct = self_correct_option(self.name, self_correct)

    def answer_line(self, problem: Problem) -> str:
        """The last line of the SFT completion, the one the verifier reads."""
        return f"{ANSWER_PREFIX}{problem.answer}"

    def wrong_value(self, right: str, rng) -> str | None:
        """A wrong intermediate result for a self-correct trace (None: this step cannot slip)."""
        return near_miss(right, rng)

    def target_spans(self, problem: Problem) -> tuple[Span, ...]:
        """The SFT completion as typed spans: plan, steps, step boundaries, corrected slip, answer
        (`tasks.templates`); SFT weights the template's spans (`sft.template_weight`)."""
        slip = slip_for(problem.id, problem.steps, self.self_correct, self.wrong_value)
        ends = tuple(problem.step_end(j) for j in range(len(problem.steps)))
        return render_spans(problem.steps, self.answer_line(problem), self.template, slip, ends)

    def target(self, problem: Problem) -> str:
        """The SFT completion for a problem."""
        return spans_text(self.target_spans(problem))


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Class decorator: make a task constructible by name from a recipe."""

    def deco(factory):
        _REGISTRY[name] = factory
        factory.name = name
        return factory

    return deco
