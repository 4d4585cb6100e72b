"""Tasks by name, as recipes name them: every built-in task is imported here, so it is registered."""

from __future__ import annotations

from typing import Callable

from thinkling.errors import ThinklingError
from thinkling.tasks import (  # noqa: F401  (importing a task module registers its tasks)
    arithmetic,
    benchmarks,
    chain,
    copying,
    countdown,
    gym,
    jsonl,
    mnns,
    recall,
    shapes,
)
from thinkling.tasks.base import _REGISTRY, Problem, Task
from thinkling.tasks.templates import inject_templates


def get_task(name: str, **options) -> Task:
    if name not in _REGISTRY:
        raise ThinklingError(f"unknown task '{name}'; known tasks: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise ThinklingError(f"task '{name}': bad options {options}: {e}") from None


def list_tasks() -> dict[str, Callable[..., Task]]:
    return dict(sorted(_REGISTRY.items()))


def problem_set(task_cfg, what: str) -> tuple[Task, list[Problem]]:
    """The task a recipe section names and the problems it asks for (`what` names the section in errors),
    with the retrieved solution template in their prompts when the section asks (`inject_template`)."""
    task = get_task(task_cfg.name, **task_cfg.options)
    problems = task.problems(task_cfg.size, task_cfg.seed, task_cfg.difficulty)
    if not problems:
        raise ThinklingError(f"config section '{what}': task '{task_cfg.name}' produced no problems")
    return task, inject_templates(problems, getattr(task_cfg, "inject_template", "none"), what)
