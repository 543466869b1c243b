"""The segmentation task plugin: one CLI and config for the semantic and instance modes; every call goes to the
mode that ``mode`` names (see modes.py)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnapps.engine.checkpoint import init_facts
from cnnapps.engine.config import ConfigError
from cnnapps.metrics.base import Metric
from cnnapps.engine.task import DataSplits, Task
from cnnapps.tasks.segment.config import SegmentConfig
from cnnapps.tasks.segment.modes import available_modes, get_mode


class SegmentTask(Task):
    name = "segment"
    Config = SegmentConfig
    monitor = "mIoU"
    monitor_mode = "max"

    def build_data(self, cfg: SegmentConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        mode = get_mode(cfg.mode)
        if mode.monitor and mode.monitor != self.monitor and not cfg.train.monitor:
            raise ConfigError(f"mode {cfg.mode!r} reports no {self.monitor}: set train.monitor (e.g. "
                              f"{mode.monitor!r}) in its config")
        if state is not None and state.get("mode", cfg.mode) != cfg.mode:
            raise ConfigError(f"the checkpoint was trained in mode {state.get('mode')!r}, not {cfg.mode!r}")
        return mode.build_data(cfg, data_root, state, split)

    def build_model(self, cfg: SegmentConfig, data: DataSplits) -> nn.Module:
        return get_mode(cfg.mode).build_model(cfg, data)

    def step(self, model: nn.Module, batch: Any, cfg: SegmentConfig) -> dict[str, Any]:
        return get_mode(cfg.mode).step(model, batch, cfg)

    def metrics(self, cfg: SegmentConfig, data: DataSplits) -> Metric:
        return get_mode(cfg.mode).metrics(cfg, data)

    def report(self, run_dir: Path, metric: Metric, data: DataSplits) -> dict[str, str]:
        return get_mode(str(data.state.get("mode", "semantic"))).report(run_dir, metric, data)

    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the mask overlay (0..1)")
        for mode in available_modes():
            mode.predict_options(parser)

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: SegmentConfig,
                device: torch.device, **kw: Any) -> Iterator[dict]:
        return get_mode(cfg.mode).predict(model, inputs, state, cfg, device, **kw)

    def bench_extra(self, cfg: SegmentConfig, data_root: Path) -> dict[str, Any]:
        """Where transferred weights came from: the init checkpoint's hash, task, backbone and its best
        validation value, so a results file ties a fine-tuned number to the pretraining run."""
        return init_facts(cfg.train.init_checkpoint, cfg.train.freeze_stages)
