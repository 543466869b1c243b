"""The detection task plugin (Faster R-CNN, FCOS, Mask R-CNN): config, data, step, COCO metrics, report, predict."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnapps.data.images import picture_path, predict_images
from cnnapps.engine.checkpoint import init_facts
from cnnapps.engine.config import ConfigError, TrainConfig, option
from cnnapps.engine.plots import save_figure
from cnnapps.metrics.detection import DetectionMetrics
from cnnapps.engine.task import DataSplits, Task, TaskConfig
from cnnapps.tasks.detect.data import (DATASETS, DetectionDataset, ImageCache, build_cache, collate_detection,
                                       hflip_sample, read_source, split_indices)
from cnnapps.tasks.detect.model import DetectModel, build_detector

log = logging.getLogger(__name__)

ARCH_NAMES = {"fasterrcnn": "Faster R-CNN", "fcos": "FCOS", "maskrcnn": "Mask R-CNN"}


@dataclass
class DetectData:
    """``[data]``: which annotated images, and how they are split (conventions: cnnapps/tasks/detect/data.py)."""

    dataset: str = option("pennfudan", help="coco: a COCO instances JSON of one's own (annotations, path)",
                          choices=DATASETS)
    path: str = option("", help="coco: the folder the JSON's file_name entries are relative to; \"\": the JSON's "
                       "folder")
    annotations: str = option("", help="coco: the instances JSON (absolute, or relative to the data root)")
    split_seed: int = option(0, help="seed of the Penn-Fudan / COCO split and of validation out of the training "
                             "images, apart from train.seed")
    test_fraction: float = option(0.2, help="Penn-Fudan / COCO: share of the images held out for test (VOC-mini: "
                                  "splits/test.txt)", gt=0, lt=1)
    val_fraction: float = option(0.15, help="share of the remaining training images used for validation; 0: none",
                                 ge=0, lt=1)
    train_subset: int = option(0, help="keep only the first N training images of the seeded order (quick runs); "
                               "0: all", ge=0)
    val_subset: int = option(0, help="validate on N of the validation images; 0: all", ge=0)
    test_subset: int = option(0, help="score only N test images; 0: all", ge=0)
    hflip: bool = option(True, help="training: mirror image, boxes and masks with probability 1/2")


@dataclass
class DetectConfig(TaskConfig):
    data: DetectData = field(default_factory=DetectData)
    model: DetectModel = field(default_factory=DetectModel)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=12, batch_size=4, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, schedule="cosine",
        warmup_epochs=1.0, grad_clip=10.0, threads=2))


def _subset(indices: list[int], n: int, seed: int) -> list[int]:
    if not n or n >= len(indices):
        return indices
    order = np.random.default_rng(seed).permutation(len(indices))[:n]
    return sorted(indices[i] for i in order)


def _to_float(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> float in [0, 1] (the detector normalises with its own mean and std)."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


class DetectTask(Task):
    name = "detect"
    Config = DetectConfig
    monitor = "ap50"

    # ---- data
    def _cache(self, cfg: DetectConfig, data_root: Path) -> ImageCache:
        d, m = cfg.data, cfg.model
        if d.dataset not in DATASETS:
            raise ConfigError(f"data.dataset: unknown {d.dataset!r} ({', '.join(DATASETS)})")
        source = read_source(d.dataset, data_root, d.path, d.annotations, masks=m.arch == "maskrcnn")
        return build_cache(source, m.min_size, m.max_size, masks=m.arch == "maskrcnn")

    def build_data(self, cfg: DetectConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        d = cfg.data
        cache = self._cache(cfg, data_root)
        class_names = list(cache.class_names)
        if state and list(state["class_names"]) != class_names:
            raise ConfigError(f"the data's classes {class_names} differ from the checkpoint's "
                              f"{list(state['class_names'])}")
        for what, count in cache.notes.items():
            if count:
                log.info("%s: %d %s", d.dataset, count, what)
        if split == "all":
            parts = {"train": [], "val": [], "test": list(range(len(cache.records)))}
        else:
            parts = split_indices(cache, d.split_seed, d.val_fraction, d.test_fraction)
            parts = {"train": _subset(parts["train"], d.train_subset, d.split_seed),
                     "val": _subset(parts["val"], d.val_subset, d.split_seed + 1),
                     "test": _subset(parts["test"], d.test_subset, d.split_seed + 2)}
        train = DetectionDataset(cache, parts["train"], drop_ignored=True) if parts["train"] else None
        val = DetectionDataset(cache, parts["val"]) if parts["val"] else None
        test = DetectionDataset(cache, parts["test"]) if parts["test"] else None
        new_state = {"class_names": class_names, "dataset": d.dataset,
                     "split_sizes": {k: len(v) for k, v in parts.items()}}
        return DataSplits(train=train, val=val, test=test, state=new_state, collate_fn=collate_detection,
                          skipped=dict(cache.skipped))

    # ---- model
    def build_model(self, cfg: DetectConfig, data: DataSplits) -> nn.Module:
        return build_detector(cfg.model, len(data.state["class_names"]))

    def step(self, model: nn.Module, batch: list[dict[str, Any]], cfg: DetectConfig) -> dict[str, Any]:
        """Training: the sum of the detector's losses (the dict of parts as ``output``). Evaluation: the detections
        as ``output`` and no loss (None, so none is reported or plotted): torchvision's detectors compute losses
        only in training mode, and a second pass per batch to get them would double the cost of every
        validation."""
        if model.training:
            if cfg.data.hflip:
                flips = torch.rand(len(batch)) < 0.5  # the engine seeds torch's RNG per epoch
                batch = [hflip_sample(s) if f else s for s, f in zip(batch, flips)]
            images = [_to_float(s["image"]) for s in batch]
            keys = ("boxes", "labels", "masks") if cfg.model.arch == "maskrcnn" else ("boxes", "labels")
            targets = [{k: s[k] for k in keys} for s in batch]
            losses = model(images, targets)
            return {"loss": sum(losses.values()), "output": {k: v.detach() for k, v in losses.items()}}
        detections = model([_to_float(s["image"]) for s in batch])
        return {"loss": None, "output": detections}

    def metrics(self, cfg: DetectConfig, data: DataSplits) -> DetectionMetrics:
        return DetectionMetrics(data.state["class_names"], masks=cfg.model.arch == "maskrcnn")

    # ---- optional
    def bench_extra(self, cfg: DetectConfig, data_root: Path) -> dict[str, Any]:
        """Split sizes and the counts of skipped / repaired annotations of the benchmark's data."""
        data = self.build_data(cfg, data_root)
        cache = self._cache(cfg, data_root)
        extra: dict[str, Any] = init_facts(cfg.train.init_checkpoint, cfg.train.freeze_stages)
        extra.update({f"{k} images": v for k, v in data.state["split_sizes"].items()})
        extra.update({f"skipped: {k}": v for k, v in data.skipped.items()})
        extra.update({k: v for k, v in cache.notes.items()})
        return extra

    def report(self, run_dir: Path, metric: DetectionMetrics, data: DataSplits) -> dict[str, str]:
        """Precision-recall curves at IoU 0.5 per class (``pr_curves.png``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        art = metric.artifacts()
        prec, names = art["precision"], art["class_names"]
        recall = np.linspace(0, 1, prec.shape[1])
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for k, name in enumerate(names):
            p = prec[0, :, k]
            if (p > -1).any():
                ax.plot(recall, np.clip(p, 0, None), label=f"{name} (AP50 {p[p > -1].mean():.2f})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
               title="test precision-recall, IoU 0.5 (COCO 101-point)")
        if len(names) <= 20:
            ax.legend(fontsize=7, loc="lower left")
        save_figure(fig, run_dir / "pr_curves.png")
        return {"precision-recall curves": "pr_curves.png"}

    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--score-threshold", type=float, default=0.5,
                            help="detections below this score are neither drawn nor listed (default 0.5)")

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: DetectConfig,
                device: torch.device, out_dir: Path | None = None, score_threshold: float = 0.5,
                **kw: Any) -> Iterator[dict]:
        """One row per input: ``detections`` (label, score, box x1 y1 x2 y2 in the file's pixels) at or above
        ``score_threshold``, highest score first, and, with ``out_dir``, ``picture``:
        ``<out_dir>/<stem>_detections.png`` (or ``out_dir`` itself when it names a .png and there is one input)
        with them drawn, one colour per detection, and a caption saying what is shown."""
        from cnnapps.tasks.detect.plots import save_detections

        names = list(state["class_names"])
        model.eval()
        m = cfg.model
        rule = (f"with score \u2265 {score_threshold:g}, after non-maximum suppression at IoU {m.nms_thresh:g} per "
                f"class" + ("; masks at probability 0.5" if m.arch == "maskrcnn" else ""))

        def row(path: str, image: np.ndarray, det: dict[str, torch.Tensor]) -> dict[str, Any]:
            keep = torch.nonzero(det["scores"] >= score_threshold).flatten()
            keep = keep[torch.argsort(det["scores"][keep], descending=True)]
            det = {k: v[keep].cpu() for k, v in det.items()}
            out: dict[str, Any] = {"detections": [
                {"label": names[int(k) - 1], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
                for k, s, b in zip(det["labels"], det["scores"], det["boxes"])]}
            if out_dir is not None:
                picture = picture_path(out_dir, path, "_detections", single=len(inputs) == 1)
                n = len(out["detections"])
                save_detections(image, det, names, picture, f"{ARCH_NAMES.get(m.arch, m.arch)} over {m.backbone}: "
                                f"{n} detection{'s' if n != 1 else ''} {rule}")
                out["picture"] = str(picture)
            return out

        return predict_images(inputs, lambda x: model([_to_float(x[0])])[0], row, device)
