"""The task registry: name -> Task instance."""

from __future__ import annotations

from .base import Task

TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Register `task` under `task.name` (an error on a duplicate name unless `replace`)."""
    if not isinstance(task, Task) or not task.name:
        raise ValueError(f"register_task needs a Task instance with a name, got {task!r}")
    if task.name in TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered (pass replace=True to override)")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name`; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(TASKS)
