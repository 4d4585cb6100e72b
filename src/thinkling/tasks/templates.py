"""Structured solution templates (SST): the procedure of a problem family, made explicit.

A template is an ordered list of named steps, each with a slot that says what the step writes
(`apply: {value}{op}={result}`). With the task option `template: true` the expert trace opens
with a plan that names the steps of this problem, then the steps, then the usual answer line:

    <plan>apply x3 > answer</plan>
    37+5=42
    42-8=34
    34+9=43
    A:43

The trace is built as typed spans (`Span`), so SFT can weight what the template added — the plan
and the step boundaries — without parsing text again (`train.sft`, `sft.template_weight`).

`self_correct: p` (S2R-style traces): with probability p a problem's trace states one wrong
intermediate result, then a `<check>` line that re-does that step right, and goes on from the
right value. The wrong digits are a span of kind `error`, which SFT does not train on (weight
0): the model learns to catch and fix a slip, not to make one. Verifiers read a completion
through `solution_lines`, where a `<check>` line replaces the step before it.

Prompt-time injection (`inject_template` in a task section) retrieves the template of the most
similar family — by task tag, or by bag-of-words similarity to each template's example
prompts — and puts its text in the prompt (`Problem.meta["hint"]`, read by `rollout.prompts`).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, replace

from thinkling.config import INJECT_MODES
from thinkling.errors import ThinklingError

PLAN_OPEN, PLAN_CLOSE = "<plan>", "</plan>"
CHECK_OPEN, CHECK_CLOSE = "<check>", "</check>"

# Span kinds. `plan` and `boundary` are the template's tokens (weighted by sft.template_weight);
# `error` is an injected wrong result (never a target); the rest are plain targets.
WEIGHTED_KINDS = ("plan", "boundary")
KINDS = ("text", "plan", "boundary", "check", "error")


@dataclass(frozen=True)
class Span:
    text: str
    kind: str = "text"


@dataclass(frozen=True)
class TemplateStep:
    """One named step: `slot` says what it writes; `pattern` (a regex) recognises a solution
    step of this kind when a family's steps are not all alike (the rule set for word problems)."""

    name: str
    slot: str
    pattern: str | None = None


@dataclass(frozen=True)
class SolutionTemplate:
    name: str
    family: str  # the task tag of the family it was written for
    steps: tuple[TemplateStep, ...]  # the last step is the answer line
    examples: tuple[str, ...] = ()  # prompts of solved problems, for similarity retrieval

    def label(self, step_text: str) -> str:
        """The name of the first step whose pattern matches `step_text` (else the first step's)."""
        for s in self.steps[:-1]:
            if s.pattern is None or re.search(s.pattern, step_text):
                return s.name
        return self.steps[0].name

    def plan(self, step_texts) -> str:
        """The plan of one problem: its step names in order, runs of one name counted (`apply x3`)."""
        names: list[list] = []
        for text in step_texts:
            name = self.label(text)
            if names and names[-1][0] == name:
                names[-1][1] += 1
            else:
                names.append([name, 1])
        parts = [n if c == 1 else f"{n} x{c}" for n, c in names] + [self.steps[-1].name]
        return PLAN_OPEN + " > ".join(parts) + PLAN_CLOSE

    def hint(self) -> str:
        """The abstract template as prompt text (injection): step names with their slots."""
        return "template: " + " > ".join(f"{s.name}({s.slot})" for s in self.steps)


TEMPLATES: dict[str, SolutionTemplate] = {
    t.name: t
    for t in (
        SolutionTemplate("chain", "chain",
                         (TemplateStep("apply", "{value}{op}={result}"), TemplateStep("answer", "A:{result}")),
                         examples=("37 +5 -8 +9", "12 -3 +7", "80 -9 -4 +2 +6")),
        SolutionTemplate("countdown", "countdown",
                         (TemplateStep("combine", "{a}{op}{b}={c}"), TemplateStep("answer", "A:{target}")),
                         examples=("3 7 2 -> 17", "4 9 5 -> 41", "2 8 6 3 -> 40")),
        SolutionTemplate("mnns", "mnns",
                         (TemplateStep("sign", "{sign}{digit}={partial}"), TemplateStep("answer", "A:{min}")),
                         examples=("3 7 2 5", "9 1 4 6 2", "8 8 3")),
        # GSM8K-style word problems: a small rule set names each solution step.
        SolutionTemplate("gsm8k", "gsm8k",
                         (TemplateStep("compute", "{quantity} = {expression} = {value}",
                                       pattern=r"\d\s*[-+*/x×÷]\s*\$?\d|=\s*\$?\d"),
                          TemplateStep("relate", "{what is known, what is asked}"),
                          TemplateStep("answer", "The answer is {value}")),
                         examples=("Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                   "many clips in May. How many clips did Natalia sell altogether?",
                                   "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes "
                                   "of babysitting. How much did she earn?")),
    )
}


def get_template(name: str) -> SolutionTemplate:
    if name not in TEMPLATES:
        raise ThinklingError(f"unknown solution template '{name}'; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def template_option(task: str, value, default: str) -> SolutionTemplate | None:
    """A task's `template` option: false (none), true (the task's own template) or a template name."""
    if value is False or value is None:
        return None
    if value is True:
        return get_template(default)
    if isinstance(value, str):
        try:
            return get_template(value)
        except ThinklingError as e:  # name the task option, so a recipe's user knows which key to fix
            raise ThinklingError(f"task '{task}' option 'template': {e}") from None
    raise ThinklingError(f"task '{task}': template must be true, false or a template name, got {value!r}")


def self_correct_option(task: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ThinklingError(f"task '{task}': self_correct must be a number in [0, 1], got {value!r}")
    return float(value)


# ------------------------------------------------------------------ rendering


def render_spans(steps, answer_line: str, template: SolutionTemplate | None = None,
                 slip: tuple[int, str, str] | None = None, ends=None) -> tuple[Span, ...]:
    """A trace as spans: the plan (with a template), each step and its closing newline (a step
    boundary when there is a template), then the answer line.

    `ends[j]` replaces step j's newline (`Problem.step_ends`: steps cut mid-line).

    `slip = (j, wrong, right)`: step j first states `wrong` in place of its final `right` result,
    then a `<check>` line re-does the step with `right`.
    """
    boundary = "boundary" if template is not None else "text"
    spans = [Span(template.plan(steps) + "\n", "plan")] if template is not None else []
    for j, step in enumerate(steps):
        if slip is not None and slip[0] == j:
            _, wrong, right = slip
            head = step[: len(step) - len(right)]
            spans += [Span(head), Span(wrong, "error"), Span("\n", boundary),
                      Span(f"{CHECK_OPEN}{step}{CHECK_CLOSE}", "check"), Span("\n", boundary)]
        else:
            spans += [Span(step), Span(ends[j] if ends else "\n", boundary)]
    spans.append(Span(answer_line))
    return tuple(spans)


def slip_for(problem_id: str, steps, rate: float, wrong_value) -> tuple[int, str, str] | None:
    """Whether (and where) a problem's self-correct trace slips: deterministic in the problem id,
    so a task's problem stream is the same with or without `self_correct`. `wrong_value(right, rng)`
    gives a wrong result for the step's right one, or None where none can be made."""
    if not rate or not steps:
        return None
    rng = random.Random(f"{problem_id}:self-correct")
    if rng.random() >= rate:
        return None
    j = rng.randrange(len(steps))
    right = steps[j].rsplit("=", 1)[-1]
    wrong = wrong_value(right, rng)
    return None if wrong is None or wrong == right else (j, wrong, right)


def near_miss(right: str, rng: random.Random) -> str | None:
    """A plausible slip: the right integer off by 1 to 5 (kept non-negative when it was)."""
    if not right.lstrip("-").isdigit():
        return None
    value = int(right)
    return str(rng.choice([v for d in range(1, 6) for v in (value - d, value + d) if v >= 0 or value < 0]))


def spans_text(spans) -> str:
    return "".join(s.text for s in spans)


# ------------------------------------------------------------------ reading completions


def solution_lines(completion: str) -> list[str]:
    """The step lines of a completion, before its answer line: a `<plan>` line is dropped and a
    `<check>` line replaces the step before it (its correction), so a self-corrected trace is
    checked as the solution it ends up with."""
    lines: list[str] = []
    for line in completion.strip().split("\n")[:-1]:
        s = line.strip()
        if s.startswith(PLAN_OPEN) and s.endswith(PLAN_CLOSE):
            continue
        if s.startswith(CHECK_OPEN) and s.endswith(CHECK_CLOSE):
            fixed = s[len(CHECK_OPEN) : -len(CHECK_CLOSE)]
            if lines:
                lines[-1] = fixed
            else:
                lines.append(fixed)
            continue
        lines.append(line)
    return lines


# ------------------------------------------------------------------ prompt-time injection

_WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def bag_of_words(text: str) -> Counter:
    """Which lower-cased words and symbols occur, every number as the token `#` (families differ by
    shape). Presence, not counts: a word problem's many numbers must not make it look like a list
    of digits."""
    return Counter({"#" if w.isdigit() else w.lower(): 1 for w in _WORD.findall(text)})


def cosine(a: Counter, b: Counter) -> float:
    dot = sum(a[k] * b[k] for k in a.keys() & b.keys())
    norm = math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


def retrieve_template(problem, mode: str) -> SolutionTemplate:
    """The template of the most similar solved family: `tag` = a template written for one of the
    problem's tags (bag-of-words when none is), `bow` = the highest cosine similarity between the
    problem's prompt and a template's example prompts (ties: the first by name)."""
    if mode == "tag":
        for tag in problem.tags:
            for t in TEMPLATES.values():
                if t.family == tag:
                    return t
    bag = bag_of_words(problem.prompt)
    scored = [(max(cosine(bag, bag_of_words(e)) for e in t.examples), -i, t)
              for i, t in enumerate(sorted(TEMPLATES.values(), key=lambda t: t.name))]
    return max(scored, key=lambda x: x[:2])[2]


def inject_templates(problems, mode: str, where: str = "eval") -> list:
    """`problems` with the retrieved template's text as their prompt hint (`mode` none: unchanged)."""
    if mode not in INJECT_MODES:
        raise ThinklingError(f"config key '{where}.inject_template': must be {' or '.join(INJECT_MODES)}, got {mode!r}")
    if mode == "none":
        return list(problems)
    return [replace(p, meta={**p.meta, "hint": retrieve_template(p, mode).hint()}) for p in problems]
