"""The task registry: name (or alias) → :class:`~fastmemit.downstream.base.Task`.

Built-in tasks are discovered lazily — the first lookup imports every module of
``fastmemit.downstream.tasks`` and registers its ``TASK`` — so importing fastmemit does no work
and adding a task is adding one file. Users register their own with :func:`register_task`.
"""

from __future__ import annotations

import importlib
import pkgutil

from fastmemit.downstream.base import DownstreamError, Task

_TASKS: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` (and its aliases) to the registry; returns it."""
    _discover()
    _register(task, overwrite=overwrite)
    return task


def _register(task: Task, *, overwrite: bool) -> None:
    names = (task.name, *task.aliases)
    if not overwrite:
        for n in names:
            owner = _TASKS[n].name if n in _TASKS else _ALIASES.get(n)
            if owner is not None and owner != task.name:
                raise DownstreamError(f"task name {n!r} is already used by task {owner!r}")
            if n == task.name and n in _TASKS and _TASKS[n] is not task:
                raise DownstreamError(f"task {n!r} is already registered (pass overwrite=True to replace it)")
    _TASKS[task.name] = task
    for a in task.aliases:
        _ALIASES[a] = task.name


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    from fastmemit.downstream import tasks as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        task = getattr(mod, "TASK", None)
        if not isinstance(task, Task):
            raise DownstreamError(f"task module {mod.__name__} must define TASK = Task(...)")
        _register(task, overwrite=False)


def resolve_task_name(name: str) -> str:
    """Canonical task name for ``name`` or an alias (case-insensitive); clear error when unknown."""
    _discover()
    key = name.strip().lower()
    if key in _TASKS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise DownstreamError(
        f"unknown downstream task {name!r}; known tasks: {', '.join(available_tasks())}"
        + (f" (aliases: {', '.join(f'{a}={t}' for a, t in sorted(_ALIASES.items()))})" if _ALIASES else "")
    )


def get_task(name: str) -> Task:
    return _TASKS[resolve_task_name(name)]


def available_tasks() -> list[str]:
    """Names of the registered tasks, built-ins first in the research code's order."""
    _discover()
    order = ["sst2", "mrpc", "cola", "rte", "mmlu", "sentiment_analysis", "nli", "dialogue"]
    return [n for n in order if n in _TASKS] + sorted(n for n in _TASKS if n not in order)
