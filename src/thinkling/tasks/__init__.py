"""Tasks: problem generators and benchmark loaders with their verifiers, registered by name."""

from thinkling.tasks.base import Problem, Task, Verdict, register_task
from thinkling.tasks.registry import get_task, list_tasks, problem_set

__all__ = ["Problem", "Task", "Verdict", "get_task", "list_tasks", "problem_set", "register_task"]
