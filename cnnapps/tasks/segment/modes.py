"""Segmentation modes: ``semantic`` (this package's semantic.py) and ``instance`` (instance.py); the segment
task hands every call to the mode its config names.

A mode is a class with the Task methods below. It lives in ``cnnapps/tasks/segment/<module>.py`` and is found
through ``MODES`` by name, imported only when a config asks for it. A mode reads its own options from the
config's free-form ``[instance]`` (or its own) table, e.g. ``from_dict(InstanceOptions, cfg.instance)``, so it
never needs fields added to the shared config. ``monitor`` is the mode's default metric: a mode whose monitor is
not the task's (``mIoU``) needs ``train.monitor`` set in its TOML (``build_data`` says so when it is missing).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnapps.engine.config import ConfigError
from cnnapps.metrics.base import Metric
from cnnapps.engine.task import DataSplits, TaskConfig

MODES = {"semantic": "cnnapps.tasks.segment.semantic:SemanticMode",
         "instance": "cnnapps.tasks.segment.instance:InstanceMode"}


class SegmentMode:
    """The Task methods of one segmentation mode (see ``cnnapps.engine.task.Task`` for each contract)."""

    name: str = ""
    monitor: str = ""
    monitor_mode: str = "max"

    def build_data(self, cfg: TaskConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        """Datasets; ``state["mode"]`` must be this mode's name (``report`` dispatches on it)."""
        raise NotImplementedError

    def build_model(self, cfg: TaskConfig, data: DataSplits) -> nn.Module:
        """The model; hold the zoo network at ``.backbone`` so transfer and stage freezing find it."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Any, cfg: TaskConfig) -> dict[str, Any]:
        raise NotImplementedError

    def metrics(self, cfg: TaskConfig, data: DataSplits) -> Metric:
        raise NotImplementedError

    def report(self, run_dir: Path, metric: Metric, data: DataSplits) -> dict[str, str]:
        return {}

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: TaskConfig, device: torch.device,
                **kw: Any) -> Iterator[dict]:
        raise NotImplementedError(f"segment mode {self.name!r} has no predict")

    def predict_options(self, parser: Any) -> None:
        """Flags this mode adds to ``predict`` beyond the shared ones (``--alpha``)."""


@functools.cache
def get_mode(name: str) -> SegmentMode:
    """The mode called ``name`` (one shared instance per name: the task asks on every call, every training step
    included); ConfigError naming the known modes, or the missing module of a known one."""
    if name not in MODES:
        raise ConfigError(f"mode: unknown segmentation mode {name!r} (choose from {', '.join(MODES)})")
    module, _, cls = MODES[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise ConfigError(f"mode: {name!r} is not available in this installation ({module} is missing)") from None
    return getattr(mod, cls)()


def available_modes() -> list[SegmentMode]:
    """Every mode whose module is installed."""
    out = []
    for name in MODES:
        try:
            out.append(get_mode(name))
        except ConfigError:
            continue
    return out
