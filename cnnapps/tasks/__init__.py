"""Task plugins: built-in ones and any installed package's entry point in the group ``cnnapps.tasks``."""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnnapps.engine.task import Task

ENTRY_POINT_GROUP = "cnnapps.tasks"


class UnknownTaskError(LookupError):
    """No installed task plugin has that name; the message lists the installed ones."""


def _task_entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_tasks() -> list[str]:
    """Names of every task plugin that is installed (built-in and third-party), sorted."""
    return sorted(_task_entry_points())


def get_task(name: str) -> "Task":
    """Instantiate the task plugin registered as ``name``."""
    eps = _task_entry_points()
    if name not in eps:
        import difflib

        close = difflib.get_close_matches(name, list(eps), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint}; installed tasks: {', '.join(sorted(eps)) or 'none'}")
    cls = eps[name].load()
    return cls()
