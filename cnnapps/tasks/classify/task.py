"""The image-classification task plugin: config, data, model, step, metrics, report, predict."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.data.augment import ImageAugment
from cnnapps.engine.config import ConfigError, TrainConfig
from cnnapps.engine.plots import plot_confusion
from cnnapps.metrics.classification import ClassificationMetrics
from cnnapps.engine.task import DataSplits, Task, TaskConfig
from cnnapps.tasks.classify.explain import ClassifyExplain
from cnnapps.tasks.classify.data import (ArraySplit, ImageArrayDataset, RawData, _read_image_file, fit_to_size, load_cifar10,
                                         load_digits_sklearn, load_folder, load_mnist, to_float_chw)

log = logging.getLogger(__name__)


@dataclass
class ClassifyData:
    dataset: str = "mnist"  # mnist | cifar10 | digits | folder
    path: str = ""  # folder: the image tree (train/ and test/ sub-folders, or <class>/ folders)
    image_size: int = 0  # 0: the backbone's default input size
    val_fraction: float = 0.1  # carved from the training split at random (seeded by split_seed)
    split_seed: int = 0  # the split does not follow train.seed: runs with other seeds see the same split (soups)
    train_subset: int = 0  # use only the first N training examples after shuffling (CI); 0: all
    test_subset: int = 0
    augment: bool = False
    crop_scale: float = 1.0  # RandomResizedCrop lower scale bound; 1.0: off
    hflip: bool = False
    translate: float = 0.0  # RandomAffine fraction of the image size
    rotation: float = 0.0  # degrees
    color_jitter: float = 0.0


@dataclass
class ClassifyModel:
    backbone: str = "lenet5"
    in_chans: int = 0  # 0: the data's channel count
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the backbone


@dataclass
class ClassifyConfig(TaskConfig):
    data: ClassifyData = field(default_factory=ClassifyData)
    model: ClassifyModel = field(default_factory=ClassifyModel)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=15, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="cosine", warmup_epochs=0.5, threads=2))


def _image_size(cfg: ClassifyConfig) -> int:
    if cfg.data.image_size:
        return cfg.data.image_size
    from cnnapps.backbones import backbone_info

    return backbone_info(cfg.model.backbone).default_input[-1]


def _load_raw(cfg: ClassifyConfig, root: Path, size: int, class_names: list[str] | None) -> RawData:
    name = cfg.data.dataset
    if name == "mnist":
        return load_mnist(root)
    if name == "cifar10":
        return load_cifar10(root)
    if name == "digits":
        return load_digits_sklearn(cfg.data.split_seed)
    if name == "folder":
        path = Path(cfg.data.path) if cfg.data.path else root
        return load_folder(path if path.is_absolute() or path.exists() else root / path, size, cfg.data.split_seed,
                           class_names=class_names)
    raise ConfigError(f"data.dataset: unknown {name!r} (mnist, cifar10, digits, folder)")


def _augmentation(d: ClassifyData) -> ImageAugment | None:
    aug = ImageAugment(crop_scale=d.crop_scale, translate=d.translate, rotation=d.rotation, hflip=d.hflip,
                       color_jitter=d.color_jitter)
    return aug if d.augment and aug.active else None


class ClassifyTask(ClassifyExplain, Task):  # explain hooks: tasks/classify/explain.py
    name = "classify"
    Config = ClassifyConfig
    engine_bench_config = "ci"  # MNIST LeNet-5: a small, fast step, where a loop's overhead shows most
    monitor = "accuracy"

    def build_data(self, cfg: ClassifyConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        size = int(state["image_size"]) if state else _image_size(cfg)
        class_names = list(state["class_names"]) if state else None
        if split == "all":  # every image of a user's tree (data_root), with the checkpoint's preprocessing
            raw = load_folder(data_root, size, cfg.data.split_seed, class_names=class_names)
            raw.test = ArraySplit(np.concatenate([raw.train.images, raw.test.images]),
                                  np.concatenate([raw.train.labels, raw.test.labels]))
        else:
            raw = _load_raw(cfg, data_root, size, class_names)
        in_chans = cfg.model.in_chans or (int(state["in_chans"]) if state else raw.train.images.shape[-1])
        rng = np.random.default_rng(cfg.data.split_seed)
        order = rng.permutation(len(raw.train.labels))
        if cfg.data.train_subset:
            order = order[: cfg.data.train_subset]
        n_val = int(round(len(order) * cfg.data.val_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        test = raw.test
        if cfg.data.test_subset and split != "all":
            rng_test = np.random.default_rng(cfg.data.split_seed + 1)
            keep = rng_test.permutation(len(test.labels))[: cfg.data.test_subset]
            test = ArraySplit(test.images[keep], test.labels[keep])

        def prep(images: np.ndarray) -> torch.Tensor:
            return fit_to_size(to_float_chw(images, in_chans), size)

        x_train = prep(raw.train.images[train_idx])
        if state:
            mean, std = torch.as_tensor(state["mean"]), torch.as_tensor(state["std"])
        else:
            mean = x_train.mean(dim=(0, 2, 3))
            std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-3)
        train = ImageArrayDataset(x_train, raw.train.labels[train_idx], mean, std)
        val = ImageArrayDataset(prep(raw.train.images[val_idx]), raw.train.labels[val_idx], mean, std) \
            if n_val else None
        test_ds = ImageArrayDataset(prep(test.images), test.labels, mean, std)
        new_state = {"class_names": list(raw.class_names), "image_size": size, "in_chans": in_chans,
                     "mean": mean.tolist(), "std": std.tolist(), "dataset": cfg.data.dataset}
        return DataSplits(train=train, val=val, test=test_ds, state=new_state, skipped=raw.skipped)

    def build_model(self, cfg: ClassifyConfig, data: DataSplits) -> nn.Module:
        from cnnapps.backbones import create_backbone

        return create_backbone(cfg.model.backbone, num_classes=len(data.state["class_names"]),
                               in_chans=int(data.state["in_chans"]), **cfg.model.kwargs)

    def step(self, model: nn.Module, batch: Any, cfg: ClassifyConfig) -> dict[str, Any]:
        x, y = batch
        augment = _augmentation(cfg.data) if model.training else None
        if augment is not None:
            x = augment(x)
        out = model(x)
        if isinstance(out, tuple):  # GoogLeNet aux heads in training: the paper weights them 0.3
            logits, *aux = out
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
            loss = loss + 0.3 * sum(F.cross_entropy(a, y, label_smoothing=cfg.train.label_smoothing) for a in aux)
            return {"loss": loss, "output": logits}
        return {"loss": F.cross_entropy(out, y, label_smoothing=cfg.train.label_smoothing), "output": out}

    def metrics(self, cfg: ClassifyConfig, data: DataSplits) -> ClassificationMetrics:
        return ClassificationMetrics(data.state["class_names"])

    def report(self, run_dir: Path, metric: ClassificationMetrics, data: DataSplits) -> dict[str, str]:
        art = metric.artifacts()
        plot_confusion(art["confusion"], art["class_names"], run_dir / "confusion.png", "test confusion matrix")
        return {"confusion matrix": "confusion.png"}

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: ClassifyConfig,
                device: torch.device, **kw: Any) -> Iterator[dict]:
        size, in_chans = int(state["image_size"]), int(state["in_chans"])
        mean = torch.as_tensor(state["mean"]).view(1, -1, 1, 1)
        std = torch.as_tensor(state["std"]).view(1, -1, 1, 1)
        names = list(state["class_names"])
        for path in inputs:
            try:
                img = _read_image_file(Path(path), 0)
            except ValueError as exc:
                yield {"input": path, "error": str(exc)}
                continue
            x = (fit_to_size(to_float_chw(img[None], in_chans), size) - mean) / std
            with torch.inference_mode():
                prob = torch.softmax(model(x.to(device)).float(), 1)[0].cpu()
            top = prob.topk(min(5, len(names)))
            yield {"input": path, "label": names[int(top.indices[0])], "probability": round(float(top.values[0]), 4),
                   "top": [[names[int(i)], round(float(p), 4)] for p, i in zip(top.values, top.indices)]}
