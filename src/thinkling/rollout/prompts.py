"""How a problem becomes prompt ids: one place, so SFT, RL and eval agree.

TLDR's length levels live here too: a level is a control tag in the prompt
(`[short] 3+4=?`), and RL draws one per training prompt.
"""

from __future__ import annotations

import random

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem

LENGTH_LEVELS = ("short", "medium", "long")


def check_level(level: str) -> str:
    if level not in LENGTH_LEVELS:
        raise ThinklingError(f"unknown length level '{level}'; known: {', '.join(LENGTH_LEVELS)}")
    return level


def tag_prompt(prompt: str, level: str) -> str:
    """The prompt with its length level as a control tag, e.g. "[short] 3+4=?"."""
    return f"[{check_level(level)}] {prompt}"


def sample_levels(n: int, seed: int, levels: tuple[str, ...] = LENGTH_LEVELS) -> list[str]:
    """`n` levels drawn uniformly from `levels`, deterministic in `seed` (one per training prompt)."""
    for level in levels:
        check_level(level)
    rng = random.Random(seed)
    return [rng.choice(levels) for _ in range(n)]


def prompt_text(problem: Problem, level: str | None = None) -> str:
    """The prompt string; a TLDR length level is prefixed as a control tag, and an injected
    solution template (`meta["hint"]`, `tasks.templates.inject_templates`) goes on a line before it.

    The trailing newline separates the question from the first step for
    character-level models; chat templates ignore it.
    """
    text = problem.prompt if level is None else tag_prompt(problem.prompt, level)
    hint = problem.meta.get("hint")
    return (f"{hint}\n" if hint else "") + text + "\n"


def prompt_ids(policy, problem: Problem, level: str | None = None) -> list[int]:
    """The prompt's ids; a problem's images go to a vision-language policy's `encode_prompt`
    (`models.images` says how they ride in the ids). A text-only problem calls every policy
    exactly as before."""
    if not problem.images:
        return policy.encode_prompt(prompt_text(problem, level))
    if not getattr(policy, "accepts_images", False):
        raise ThinklingError(f"problem {problem.id} has {len(problem.images)} image(s), but the model "
                             f"({type(policy).__name__}) takes text only; use a vision-language model "
                             "(model.backend: tiny_vlm or hf_vlm)")
    return policy.encode_prompt(prompt_text(problem, level), images=problem.images)


def anchor_text(problem: Problem, k: int) -> str:
    """The first k expert steps as a continuation of the prompt (BREAD anchors), each followed by
    its end (a newline, or what `Problem.step_ends` says: an anchor may stop mid-line)."""
    return "".join(s + problem.step_end(j) for j, s in enumerate(problem.steps[:k]))


def check_fits(policy, problems: list[Problem], room: int, what: str) -> None:
    """Every prompt plus `room` new tokens fits the model's context, or one error naming the
    first problem that does not: found before any work, not as an allocation failure later."""
    limit = getattr(policy, "context_length", None)
    if limit is None:
        return
    for p in problems:
        n = len(prompt_ids(policy, p))
        if n + room > limit:
            raise ThinklingError(f"{what} problem {p.id}: its prompt has {n} tokens; with {room} new tokens that "
                                 f"exceeds the model's context of {limit} (shorten it or lower max_new_tokens)")
