"""Instance segmentation (``mode = "instance"``): torchvision's Mask R-CNN over a zoo backbone with an FPN.

The detect task already builds that model (``model.arch = "maskrcnn"``), reads Penn-Fudan's instance masks and
scores box and mask AP with pycocotools, so this mode translates the segment config into a detect config and hands
every call to ``DetectTask``: one implementation, two doors. What it takes from the segment config:

- ``model.backbone`` and ``model.kwargs``; ``data.dataset`` (``pennfudan``, or ``coco`` with ``[instance.data]``
  naming the JSON), ``data.split_seed`` and ``data.hflip``; all of ``[train]``;
- ``[instance.model]``: any field of the detect task's ``[model]`` (``min_size``, ``fpn_channels``,
  ``out_indices``, ...); ``arch`` is always ``maskrcnn``;
- ``[instance.data]``: any field of the detect task's ``[data]`` (``test_fraction``, ``train_subset``, ...).

The split is the detect task's (seeded fractions: Penn-Fudan 116 train, 20 val, 34 test), not the semantic
mode's counts, so instance results line up with ``results/detect.md``. ``train.monitor`` must name a detection
metric (``mask_ap50`` is the natural one); the segment task says so when it is missing.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnapps.engine.config import ConfigError, from_dict, to_dict
from cnnapps.metrics.base import Metric
from cnnapps.engine.task import DataSplits
from cnnapps.tasks.detect.task import DetectConfig, DetectTask
from cnnapps.tasks.segment.config import SegmentConfig
from cnnapps.tasks.segment.modes import SegmentMode

OPTION_TABLES = ("model", "data")


def detect_config(cfg: SegmentConfig) -> DetectConfig:
    """The detect task's config equivalent to a segment config in instance mode (errors name the segment keys)."""
    unknown = sorted(set(cfg.instance) - set(OPTION_TABLES))
    if unknown:
        raise ConfigError(f"[instance]: unknown table(s) {', '.join(unknown)}; known: {', '.join(OPTION_TABLES)}")
    if cfg.data.dataset not in ("pennfudan", "coco"):
        raise ConfigError(f"data.dataset: instance mode reads 'pennfudan' or 'coco' (instance masks), "
                          f"not {cfg.data.dataset!r}")
    model = {**dict(cfg.instance.get("model", {})), "arch": "maskrcnn", "backbone": cfg.model.backbone,
             "kwargs": dict(cfg.model.kwargs)}
    data = {"split_seed": cfg.data.split_seed, "hflip": cfg.data.hflip,
            **dict(cfg.instance.get("data", {})), "dataset": cfg.data.dataset}
    try:
        return from_dict(DetectConfig, {"data": data, "model": model, "train": to_dict(cfg.train)})
    except ConfigError as exc:
        raise ConfigError(f"[instance]: {exc}") from None


class InstanceMode(SegmentMode):
    name = "instance"
    monitor = "mask_ap50"

    def __init__(self) -> None:
        self.detect = DetectTask()
        self._translated: tuple[SegmentConfig, DetectConfig] | None = None

    def _detect_config(self, cfg: SegmentConfig) -> DetectConfig:
        """``detect_config(cfg)``, translated once per config object rather than on every training step."""
        if self._translated is None or self._translated[0] is not cfg:
            self._translated = (cfg, detect_config(cfg))
        return self._translated[1]

    def build_data(self, cfg: SegmentConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        data = self.detect.build_data(self._detect_config(cfg), data_root, state, split)
        data.state["mode"] = self.name
        return data

    def build_model(self, cfg: SegmentConfig, data: DataSplits) -> nn.Module:
        return self.detect.build_model(self._detect_config(cfg), data)

    def step(self, model: nn.Module, batch: Any, cfg: SegmentConfig) -> dict[str, Any]:
        return self.detect.step(model, batch, self._detect_config(cfg))

    def metrics(self, cfg: SegmentConfig, data: DataSplits) -> Metric:
        return self.detect.metrics(self._detect_config(cfg), data)

    def report(self, run_dir: Path, metric: Metric, data: DataSplits) -> dict[str, str]:
        return self.detect.report(run_dir, metric, data)

    def predict_options(self, parser: Any) -> None:
        self.detect.predict_options(parser)

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: SegmentConfig,
                device: torch.device, out_dir: Path | None = None, score_threshold: float = 0.5,
                **kw: Any) -> Iterator[dict]:
        """Boxes, scores and masks drawn on each image (``<stem>_detections.png``), one JSON line each."""
        return self.detect.predict(model, inputs, state, self._detect_config(cfg), device, out_dir=out_dir,
                                   score_threshold=score_threshold)
