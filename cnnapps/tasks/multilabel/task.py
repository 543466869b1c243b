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

from cnnapps.data.augment import ImageAugment
from cnnapps.data.images import ImageReadError, channel_stats, picture_path, read_image, resize_image
from cnnapps.engine.callbacks import Callback
from cnnapps.engine.config import ConfigError, TrainConfig
from cnnapps.engine.task import DataSplits, Task, TaskConfig, unwrap
from cnnapps.metrics.multilabel import MultiLabelMetrics
from cnnapps.tasks.multilabel.data import (LabelledImages, MultiLabelImages, decode_images, load_label_csv,
                                           load_voc_mini)
from cnnapps.tasks.multilabel.model import LOSSES, MultiLabelNet, balanced_pos_weight, multilabel_loss

log = logging.getLogger(__name__)


@dataclass
class MultiLabelData:
    dataset: str = "voc_mini"  # voc_mini | folder
    path: str = ""  # folder: the image folder (as given, else under the data root)
    labels_csv: str = "labels.csv"  # folder: the CSV (file,labels[,split]); relative to `path`
    image_size: int = 96  # images are resized (squashed) to image_size x image_size and cached as uint8
    val_fraction: float = 0.15  # carved from trainval (or the CSV's train rows): thresholds are chosen here
    test_fraction: float = 0.2  # folder CSV without a split column: the seeded test part
    split_seed: int = 0  # val/test carving; apart from train.seed so runs with other seeds share one split
    train_subset: int = 0  # keep only the first N training images after shuffling (CI); 0: all
    test_subset: int = 0
    augment: bool = True
    hflip: bool = True
    crop_scale: float = 0.5  # random-resized-crop lower area bound; 1.0: off
    translate: float = 0.0
    rotation: float = 0.0
    color_jitter: float = 0.1


@dataclass
class MultiLabelModel:
    backbone: str = "resnet18"
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the backbone
    drop: float = 0.0  # dropout before the last linear layer
    prior_bias: bool = True  # start the head at the training label frequencies' log-odds
    loss: str = "bce"  # bce | focal | asl
    pos_weight: str = "none"  # bce: none | balanced (negatives/positives per class, clipped)
    pos_weight_max: float = 10.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25  # < 0: no class balancing term
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05


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


def _augmentation(d: MultiLabelData) -> ImageAugment | None:
    aug = ImageAugment(crop_scale=d.crop_scale, translate=d.translate, rotation=d.rotation, hflip=d.hflip,
                       color_jitter=d.color_jitter)
    return aug if d.augment and aug.active else None


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
    monitor_mode = "max"

    def build_data(self, cfg: MultiLabelConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        d = cfg.data
        size = int(state["image_size"]) if state else d.image_size
        if size < 16:
            raise ConfigError(f"data.image_size must be at least 16, got {size}")
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
        if cfg.model.pos_weight not in ("none", "balanced"):
            raise ConfigError(f"model.pos_weight: unknown {cfg.model.pos_weight!r} (none, balanced)")
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
        from cnnapps.backbones import backbone_info, create_backbone

        if backbone_info(cfg.model.backbone).dim != 2:
            raise ConfigError(f"model.backbone: {cfg.model.backbone} is not a 2D backbone")
        if cfg.model.loss not in LOSSES:
            raise ConfigError(f"model.loss: unknown {cfg.model.loss!r} ({', '.join(LOSSES)})")
        s = data.state
        backbone = create_backbone(cfg.model.backbone, num_classes=0, in_chans=3, **cfg.model.kwargs)
        return MultiLabelNet(backbone, len(s["class_names"]), s["mean"], s["std"], drop=cfg.model.drop,
                             label_freq=s.get("label_freq") if cfg.model.prior_bias else None,
                             pos_weight=s.get("pos_weight"))

    def step(self, model: nn.Module, batch: Any, cfg: MultiLabelConfig) -> dict[str, Any]:
        net = unwrap(model)
        x = net.prepare(batch["x"])
        augment = _augmentation(cfg.data) if model.training else None
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
        for path in inputs:
            try:
                img = read_image(path)
            except ImageReadError as exc:
                yield {"input": path, "error": str(exc)}
                continue
            x = torch.from_numpy(np.ascontiguousarray(resize_image(img, size).transpose(2, 0, 1)))[None]
            with torch.inference_mode():
                prob = torch.sigmoid(model(net.prepare(x.to(device))).float())[0].cpu().numpy()
            order = np.argsort(-prob)
            labels = {names[i]: round(float(prob[i]), 4) for i in order if prob[i] >= thresholds[i]}
            row: dict[str, Any] = {"input": path, "labels": labels,
                                   "top": [names[int(order[0])], round(float(prob[order[0]]), 4)]}
            if draw or (out_dir is not None and Path(out_dir).suffix.lower() == ".png"):
                from cnnapps.tasks.multilabel.plots import draw_prediction

                target = picture_path(out_dir, path, "_labels", len(inputs) == 1)
                draw_prediction(img, names, prob, thresholds, target)
                row["picture"] = str(target)
            yield row
