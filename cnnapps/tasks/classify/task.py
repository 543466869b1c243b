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

from cnnapps.data.images import ImageBackbone, ImageData, override, predict_images
from cnnapps.engine.config import ConfigError, TrainConfig, option
from cnnapps.engine.plots import plot_confusion
from cnnapps.metrics.classification import ClassificationMetrics
from cnnapps.engine.task import DataSplits, Task, TaskConfig
from cnnapps.tasks.classify.explain import ClassifyExplain
from cnnapps.tasks.classify.data import (ArraySplit, ImageArrayDataset, RawData, fit_to_size, load_cifar10,
                                         load_digits_sklearn, load_folder, load_mnist, to_float_chw)

log = logging.getLogger(__name__)


@dataclass
class ClassifyData(ImageData):
    """``[data]``: which images, at what size, how they are split and augmented."""

    image_size: int = override(ImageData, "image_size", 0, gt=None, ge=0,
                               help="side in pixels that images are brought to (MNIST's 28 is zero-padded to 32, "
                               "other sizes resized); 0: the backbone's default input size")
    dataset: str = option("mnist", help="the data set: digits is scikit-learn's 8x8 digits, folder an image tree of "
                          "one's own (path)", choices=("mnist", "cifar10", "digits", "folder"))
    path: str = option("", help="folder: the image tree (train/ and test/ sub-folders, or <class>/ folders), as "
                       "given or under the data root")
    val_fraction: float = option(0.1, help="share of the training split carved out at random (seeded by "
                                 "split_seed) for validation; 0: none", ge=0, lt=1)


@dataclass
class ClassifyModel(ImageBackbone):
    """``[model]``: the zoo network and its input channels."""

    backbone: str = override(ImageBackbone, "backbone", "lenet5")
    in_chans: int = option(0, help="input channels of the network; 0: the data's (1 for MNIST, 3 for colour)",
                           ge=0)


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
        augment = cfg.data.augmentation() if model.training else None
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
        """One row per image: the top ``label`` with its ``probability`` and the ``top`` five [label, p]."""
        size, in_chans = int(state["image_size"]), int(state["in_chans"])
        mean = torch.as_tensor(state["mean"]).view(1, -1, 1, 1)
        std = torch.as_tensor(state["std"]).view(1, -1, 1, 1)
        names = list(state["class_names"])

        def prepare(image: np.ndarray) -> torch.Tensor:  # as build_data prepares the training images
            return (fit_to_size(to_float_chw(image[None], in_chans), size) - mean) / std

        def row(path: str, image: np.ndarray, prob: torch.Tensor) -> dict[str, Any]:
            top = prob[0].cpu().topk(min(5, len(names)))
            return {"label": names[int(top.indices[0])], "probability": round(float(top.values[0]), 4),
                    "top": [[names[int(i)], round(float(p), 4)] for p, i in zip(top.values, top.indices)]}

        return predict_images(inputs, lambda x: torch.softmax(model(x).float(), 1), row, device, prepare=prepare)
