"""Registry of synthetic long-context tasks (generated in code from a seed, no downloads).

Every module in this package that does not start with an underscore is imported here, and
registers its tasks at import: a new task is one small file.
"""

import importlib
import pkgutil

from .base import NeedleTask, Sample, Task, answer_text, contains_fraction, exact_match, normalize_answer
from .registry import TASKS, get_task, list_tasks, register_task

_INFRA = {"base", "registry", "kinds", "haystacks"}
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _m.startswith("_") and _m not in _INFRA:
        importlib.import_module(f"{__name__}.{_m}")

__all__ = [
    "TASKS",
    "NeedleTask",
    "Sample",
    "Task",
    "answer_text",
    "contains_fraction",
    "exact_match",
    "get_task",
    "list_tasks",
    "normalize_answer",
    "register_task",
]
