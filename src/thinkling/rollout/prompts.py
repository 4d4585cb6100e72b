"""How a problem becomes prompt ids: one place, so SFT, RL and eval agree."""

from __future__ import annotations

from thinkling.rewards.length import tag_prompt
from thinkling.tasks.base import Problem


def prompt_text(problem: Problem, level: str | None = None) -> str:
    """The prompt string; a TLDR length level is prefixed as a control tag.

    The trailing newline separates the question from the first step for
    character-level models; chat templates ignore it.
    """
    text = problem.prompt if level is None else tag_prompt(problem.prompt, level)
    return text + "\n"


def prompt_ids(policy, problem: Problem, level: str | None = None) -> list[int]:
    return policy.encode_prompt(prompt_text(problem, level))


def anchor_text(problem: Problem, k: int) -> str:
    """The first k expert steps as a continuation of the prompt (BREAD anchors)."""
    return "".join(f"{s}\n" for s in problem.steps[:k])
