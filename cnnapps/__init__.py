"""cnnapps: a zoo of faithful CNN backbones, one training engine and task plugins for 1D and 2D signals.

Backbones: ``create_backbone``, ``list_backbones``. Tasks: ``list_tasks``. Training from Python: ``train``,
``evaluate``, ``load_model`` (see ``cnnapps.api``); your own behaviour during a fit: subclass
``cnnapps.Callback``.
"""
from __future__ import annotations

from typing import Any

from cnnapps._version import __version__

__all__ = ["Callback", "create_backbone", "evaluate", "list_backbones", "list_tasks", "load_model", "train"]

# Imported on first use, so that `import cnnapps.engine` does not build the whole model zoo.
_HOMES = {"create_backbone": "cnnapps.backbones", "list_backbones": "cnnapps.backbones",
          "list_tasks": "cnnapps.tasks", "train": "cnnapps.api", "evaluate": "cnnapps.api",
          "load_model": "cnnapps.api", "Callback": "cnnapps.engine.callbacks"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'cnnapps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
