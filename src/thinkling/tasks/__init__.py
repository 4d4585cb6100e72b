"""Tasks: problem generators and benchmark loaders with their verifiers.

Importing this package registers every built-in task with `get_task`.
"""

from thinkling.tasks import benchmarks, chain, copying, countdown, gym, jsonl, mnns, recall  # noqa: F401
from thinkling.tasks.base import Problem, Task, Verdict, get_task, list_tasks, register_task

__all__ = ["Problem", "Task", "Verdict", "get_task", "list_tasks", "register_task"]
