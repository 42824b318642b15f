"""The built-in tasks by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from implicit_icl.errors import ImplicitICLError
from implicit_icl.tasks.knowledge import KNOWLEDGE_TASKS
from implicit_icl.tasks.language import LANGUAGE_TASKS
from implicit_icl.tasks.procedures import PROCEDURE_TASKS
from implicit_icl.tasks.task import Task

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in (*KNOWLEDGE_TASKS, *LANGUAGE_TASKS, *PROCEDURE_TASKS)})


def task_names() -> list[str]:
    """The built-in tasks' names: knowledge, then language, then procedure tasks."""
    return list(TASKS)


def task(name: str) -> Task:
    """The built-in task called `name`."""
    if name not in TASKS:
        raise ImplicitICLError(f"no task called {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
