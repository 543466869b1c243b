"""cnnapps: a zoo of faithful CNN backbones, one training engine and task plugins for 1D and 2D signals.

The public face is three functions: ``create_backbone``, ``list_backbones`` and ``list_tasks``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_backbone", "list_backbones", "list_tasks"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import cnnapps.engine` does not build the whole model zoo.
    if name in ("create_backbone", "list_backbones"):
        from cnnapps import backbones

        return getattr(backbones, name)
    if name == "list_tasks":
        from cnnapps.tasks import list_tasks

        return list_tasks
    raise AttributeError(f"module 'cnnapps' has no attribute {name!r}")
