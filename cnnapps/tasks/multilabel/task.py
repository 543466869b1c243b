"""The multi-label task plugin: VOC-mini (or a labels CSV), any 2D backbone, masked BCE/focal/ASL, mAP and F1 at
per-class thresholds chosen on the validation split and saved with the checkpoint."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnapps.data.images import ImageBackbone, ImageData, channel_stats, override, picture_path, predict_images
from cnnapps.engine.callbacks import Callback
from cnnapps.engine.config import ConfigError, TrainConfig, option
from cnnapps.engine.task import DataSplits, Task, TaskConfig, unwrap
from cnnapps.metrics.multilabel import MultiLabelMetrics
from cnnapps.tasks.multilabel.data import (LabelledImages, MultiLabelImages, decode_images, load_label_csv,
                                           load_voc_mini)
from cnnapps.tasks.multilabel.model import LOSSES, MultiLabelNet, balanced_pos_weight, multilabel_loss

log = logging.getLogger(__name__)


@dataclass
class MultiLabelData(ImageData):
    """``[data]``: which labelled images, at what size, how they are split and augmented."""

    image_size: int = override(ImageData, "image_size", 96, gt=None, ge=16,
                               help="side in pixels that images are resized (squashed) to and cached at")
    augment: bool = override(ImageData, "augment", True)
    hflip: bool = override(ImageData, "hflip", True)
    crop_scale: float = override(ImageData, "crop_scale", 0.5)
    color_jitter: float = override(ImageData, "color_jitter", 0.1)
    dataset: str = option("voc_mini", help="folder: images with a labels CSV of one's own (path, labels_csv)",
                          choices=("voc_mini", "folder"))
    path: str = option("", help="folder: the image folder, as given or under the data root")
    labels_csv: str = option("labels.csv", help="folder: the CSV (columns file, labels[, split]), relative to path")
    val_fraction: float = option(0.15, help="share of trainval (or of the CSV's train rows) carved out for "
                                 "validation, where the per-class thresholds are chosen; 0: none (thresholds "
                                 "stay 0.5)", ge=0, lt=1)
    test_fraction: float = option(0.2, help="folder CSV without a split column: the seeded share held out for "
                                  "test", gt=0, lt=1)

    def check(self) -> None:
        """The seeded val and test parts of a CSV without splits must leave training images."""
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g}"
                              ": must be < 1 (the rest is the training split)")


@dataclass
class MultiLabelModel(ImageBackbone):
    """``[model]``: the zoo network, its one-logit-per-class head and the loss."""

    drop: float = option(0.0, help="dropout before the last linear layer", ge=0, lt=1)
    prior_bias: bool = option(True, help="start the head at the training label frequencies' log-odds")
    loss: str = option("bce", help="bce: BCE with logits; focal: sigmoid focal loss; asl: asymmetric loss",
                       choices=LOSSES)
    pos_weight: str = option("none", help="bce: balanced weighs each class's positives by its negatives/positives "
                             "(clipped at pos_weight_max)", choices=("none", "balanced"))
    pos_weight_max: float = option(10.0, help="bce with pos_weight = balanced: the largest weight", ge=1)
    focal_gamma: float = option(2.0, help="focal: focusing exponent", ge=0)
    focal_alpha: float = option(0.25, help="focal: weight of positives; < 0: no class balancing term", le=1)
    asl_gamma_neg: float = option(4.0, help="asl: focusing exponent of negatives", ge=0)
    asl_gamma_pos: float = option(0.0, help="asl: focusing exponent of positives", ge=0)
    asl_clip: float = option(0.05, help="asl: probability shift that makes easy negatives count for nothing",
                             ge=0, lt=1)


@dataclass
class MultiLabelConfig(TaskConfig):
    """The defaults are the full VOC-mini run from scratch on a CPU: ResNet-18 at 96x96 px, 12 epochs (about 7
    minutes of one idle core's time). It is also the pretraining run for segmentation transfer:
    ``cnnapps multilabel train --out runs/multilabel/pretrain``, then the segment task's ``transfer`` config
    starts from runs/multilabel/pretrain/checkpoints/best.pt."""

    data: MultiLabelData = field(default_factory=MultiLabelData)
    model: MultiLabelModel = field(default_factory=MultiLabelModel)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=12, batch_size=32, optimizer="adamw", lr=2e-3, weight_decay=5e-4, schedule="cosine",
        warmup_epochs=0.5, threads=2))


def _resolve_folder(path: str, data_root: Path) -> Path:
    p = Path(path) if path else data_root
    return p if p.is_absolute() or p.exists() else data_root / p


def _load_source(cfg: MultiLabelConfig, data_root: Path, class_names: list[str] | None,
                 split: str | None = None) -> LabelledImages:
    d = cfg.data
    if split == "all" and (data_root / d.labels_csv).is_file():  # evaluate --split all on a user's folder
        return load_label_csv(data_root / d.labels_csv, data_root, class_names)
    if d.dataset == "voc_mini":
        return load_voc_mini(data_root, class_names)
    if d.dataset == "folder":
        folder = _resolve_folder(d.path, data_root)
        if not folder.is_dir():
            raise ConfigError(f"data.path: image folder not found: {folder}")
        csv_path = Path(d.labels_csv) if Path(d.labels_csv).is_absolute() else folder / d.labels_csv
        return load_label_csv(csv_path, folder, class_names)
    raise ConfigError(f"data.dataset: unknown {d.dataset!r} (voc_mini, folder)")


def _split_rows(src: LabelledImages, d: MultiLabelData, split: str | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) as rows of ``src``. Images that turn out unreadable are dropped afterwards, so a
    damaged file never moves another image to a different split."""
    names = src.split
    rows = np.arange(len(names))
    if split == "all":
        return rows[:0], rows[:0], rows
    rng = np.random.default_rng(d.split_seed)
    if (names == "test").any():
        test, pool = rows[names == "test"], rows[names != "test"]
    else:  # no test rows named: carve a seeded test part
        pool = rng.permutation(rows[names != "val"])
        n_test = int(round(len(pool) * d.test_fraction))
        test, pool = np.sort(pool[:n_test]), np.concatenate([pool[n_test:], rows[names == "val"]])
    fixed_val = rows[names == "val"]
    pool = rng.permutation(np.setdiff1d(pool, fixed_val))
    if d.train_subset:
        pool = pool[: d.train_subset]
    if len(fixed_val):
        val, train = fixed_val, pool
    else:
        n_val = int(round(len(pool) * d.val_fraction))
        val, train = np.sort(pool[:n_val]), pool[n_val:]
    if d.test_subset:
        test = np.sort(np.random.default_rng(d.split_seed + 1).permutation(test)[: d.test_subset])
    return train, val, test


class CalibrateThresholds(Callback):
    """After each validation pass, the per-class thresholds that maximise F1 on the validation images become the
    model's (its ``thresholds`` buffer), so the checkpoint of every epoch carries the thresholds chosen with
    its own weights, and the test pass, ``evaluate`` and ``predict`` of that checkpoint apply them."""

    def on_validation_end(self, trainer: Any, row: dict[str, Any]) -> None:
        calibrated = trainer.metric.calibrated
        if trainer.is_rank0 and calibrated is not None:
            net = unwrap(trainer.model)
            net.thresholds.copy_(torch.as_tensor(calibrated, dtype=net.thresholds.dtype))


class MultiLabelTask(Task):
    name = "multilabel"
    Config = MultiLabelConfig
    monitor = "mAP"

    def build_data(self, cfg: MultiLabelConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        d = cfg.data
        size = int(state["image_size"]) if state else d.image_size
        src = _load_source(cfg, Path(data_root), list(state["class_names"]) if state else None, split)
        images, kept, skipped = decode_images(src.files, size, d.dataset)
        skipped.update(src.skipped)
        position = np.full(len(src.files), -1)
        position[kept] = np.arange(len(kept))  # source row -> row of the decoded array (-1: dropped)
        train, val, test = (position[r][position[r] >= 0] for r in _split_rows(src, d, split))
        if split != "all" and len(train) == 0:
            raise ConfigError("no training images left after the split (check data.train_subset / fractions)")
        targets, ignore = src.targets[kept], src.ignore[kept]

        def subset(pos: np.ndarray, calib: bool = False) -> MultiLabelImages:
            return MultiLabelImages(images, pos, targets[pos], ignore[pos], calib)

        if state:
            new_state = dict(state)  # mean/std and frequencies as the checkpoint saved them
        else:
            t = torch.as_tensor(targets[train])
            m = 1.0 - torch.as_tensor(ignore[train])
            mean, std = channel_stats(images[np.sort(train)])
            new_state = {"class_names": src.class_names, "image_size": size, "mean": mean, "std": std,
                         "dataset": d.dataset, "label_freq": ((t * m).sum(0) / m.sum(0).clamp_min(1)).tolist(),
                         "pos_weight": balanced_pos_weight(t, m, cfg.model.pos_weight_max)
                         if cfg.model.pos_weight == "balanced" else None,
                         "split_sizes": {"train": len(train), "val": len(val), "test": len(test)}}
        # Validation images choose the thresholds (calib): after each validation pass the CalibrateThresholds
        # callback keeps them in the model, so every checkpoint (best.pt too) holds its own epoch's thresholds
        # and the test pass and predict apply them.
        val_ds = subset(val, calib=True) if len(val) else None
        test_ds = subset(test)
        log.info("multilabel %s: %d train, %d val, %d test images at %dpx", d.dataset, len(train), len(val),
                 len(test), size)
        return DataSplits(train=subset(train) if len(train) else None, val=val_ds, test=test_ds, state=new_state,
                          skipped=dict(skipped))

    def build_model(self, cfg: MultiLabelConfig, data: DataSplits) -> nn.Module:
        from cnnapps.backbones import create_backbone

        s = data.state
        backbone = create_backbone(cfg.model.backbone, num_classes=0, in_chans=3, **cfg.model.kwargs)
        return MultiLabelNet(backbone, len(s["class_names"]), s["mean"], s["std"], drop=cfg.model.drop,
                             label_freq=s.get("label_freq") if cfg.model.prior_bias else None,
                             pos_weight=s.get("pos_weight"))

    def step(self, model: nn.Module, batch: Any, cfg: MultiLabelConfig) -> dict[str, Any]:
        net = unwrap(model)
        x = net.prepare(batch["x"])
        augment = cfg.data.augmentation() if model.training else None
        if augment is not None:
            x = augment(x)
        logits = model(x)
        m = cfg.model
        loss = multilabel_loss(logits, batch["y"], batch["mask"], m.loss,
                               pos_weight=net.pos_weight if m.pos_weight == "balanced" else None,
                               focal_gamma=m.focal_gamma, focal_alpha=m.focal_alpha, asl_gamma_neg=m.asl_gamma_neg,
                               asl_gamma_pos=m.asl_gamma_pos, asl_clip=m.asl_clip)
        # the model's thresholds go with its outputs, so a pass without validation images scores with them
        return {"loss": loss, "output": {"logits": logits, "thresholds": net.thresholds}}

    def metrics(self, cfg: MultiLabelConfig, data: DataSplits) -> MultiLabelMetrics:
        return MultiLabelMetrics(data.state["class_names"])

    def callbacks(self, cfg: MultiLabelConfig) -> list[Callback]:
        return [CalibrateThresholds()]

    def report(self, run_dir: Path, metric: MultiLabelMetrics, data: DataSplits) -> dict[str, str]:
        from cnnapps.tasks.multilabel.plots import plot_ap_per_class

        art = metric.artifacts()
        values = metric.compute()
        names = art["class_names"]
        (run_dir / "thresholds.json").write_text(json.dumps(
            {"thresholds": dict(zip(names, [round(float(t), 4) for t in art["thresholds"]])),
             "from": "the best F1 per class on the validation images, chosen with the evaluated weights"},
            indent=2) + "\n")
        plot_ap_per_class(names, [values.get(f"ap_{n}", float("nan")) for n in names],
                          [values.get(f"f1_{n}", float("nan")) for n in names], values.get("mAP", float("nan")),
                          values.get("constant_predictor_mAP", float("nan")), run_dir / "ap_per_class.png")
        return {"per-class AP": "ap_per_class.png", "thresholds": "thresholds.json"}

    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--draw", action="store_true",
                            help="also draw each image with its labels into --out (default ./predictions)")

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: MultiLabelConfig,
                device: torch.device, out_dir: Path | None = None, draw: bool = False, **kw: Any
                ) -> Iterator[dict]:
        """One dict per image: every label whose probability reaches its saved threshold, highest first."""
        names = list(state["class_names"])
        size = int(state["image_size"])
        net = unwrap(model)
        thresholds = net.thresholds.cpu().numpy().astype(float)
        drawing = draw or (out_dir is not None and Path(out_dir).suffix.lower() == ".png")

        def row(path: str, image: np.ndarray, prob: torch.Tensor) -> dict[str, Any]:
            prob = prob[0].cpu().numpy()
            order = np.argsort(-prob)
            out: dict[str, Any] = {
                "labels": {names[i]: round(float(prob[i]), 4) for i in order if prob[i] >= thresholds[i]},
                "top": [names[int(order[0])], round(float(prob[order[0]]), 4)]}
            if drawing:
                from cnnapps.tasks.multilabel.plots import draw_prediction

                target = picture_path(out_dir, path, "_labels", len(inputs) == 1)
                draw_prediction(image, names, prob, thresholds, target)
                out["picture"] = str(target)
            return out

        return predict_images(inputs, lambda x: torch.sigmoid(model(net.prepare(x)).float()), row, device, size=size)
