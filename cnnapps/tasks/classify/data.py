"""Classification data: every source becomes uint8 arrays (N, H, W, C) + labels, then one tensor Dataset."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cnnapps.data.cifar10 import prepare_cifar10
from cnnapps.data.images import IMAGE_SUFFIXES, read_image, resize_image
from cnnapps.data.root import DataNotFoundError, require_path

log = logging.getLogger(__name__)


@dataclass
class ArraySplit:
    """Images (N, H, W, C) uint8 and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class RawData:
    train: ArraySplit
    test: ArraySplit
    class_names: list[str]
    skipped: dict[str, int]


# ---------------------------------------------------------------- sources


def load_mnist(root: Path) -> RawData:
    path = require_path(root / "mnist" / "mnist.npz", "MNIST archive (mnist/mnist.npz)")
    with np.load(path) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        tr = ArraySplit(z["x_train"][..., None], z["y_train"].astype(np.int64))
        te = ArraySplit(z["x_test"][..., None], z["y_test"].astype(np.int64))
    return RawData(tr, te, [str(i) for i in range(10)], {})


def load_digits_sklearn(seed: int, test_fraction: float = 0.2) -> RawData:
    """scikit-learn's 8x8 digits (values 0-16) scaled to uint8, split stratified with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    itr, ite = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    return RawData(ArraySplit(images[itr], labels[itr]), ArraySplit(images[ite], labels[ite]),
                   [str(i) for i in range(10)], {})


def load_cifar10(root: Path) -> RawData:
    with np.load(prepare_cifar10(root)) as z:
        return RawData(ArraySplit(z["x_train"], z["y_train"]), ArraySplit(z["x_test"], z["y_test"]),
                       [str(c) for c in z["classes"]], json.loads(str(z["skipped"])))


def _read_image_file(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB (the file's own size for ``size`` 0); ValueError (ImageReadError) naming the file
    when it cannot be read."""
    image = read_image(path)
    return resize_image(image, size) if size else image


def _scan_class_tree(folder: Path, size: int, class_names: list[str] | None,
                     skipped: Counter) -> tuple[ArraySplit, list[str]]:
    names = class_names or sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise DataNotFoundError(f"{folder}: no class sub-folders (expected <class>/<image>)")
    imgs, labels = [], []
    for i, name in enumerate(names):
        for f in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                imgs.append(_read_image_file(f, size))
                labels.append(i)
            except ValueError as exc:
                log.warning("skip %s", exc)
                skipped["unreadable image"] += 1
    if not imgs:
        raise DataNotFoundError(f"{folder}: no readable images under its class folders")
    return ArraySplit(np.stack(imgs), np.array(labels, dtype=np.int64)), names


def load_folder(path: Path, size: int, seed: int, test_fraction: float = 0.2,
                class_names: list[str] | None = None) -> RawData:
    """An ImageFolder-style tree: ``path/train/<class>/*`` and ``path/test/<class>/*``, or ``path/<class>/*``
    split stratified with ``seed``. Images are resized to ``size`` x ``size`` (RGB)."""
    if not path.is_dir():
        raise DataNotFoundError(f"image folder not found: {path}")
    skipped: Counter = Counter()
    if (path / "train").is_dir():
        train, names = _scan_class_tree(path / "train", size, class_names, skipped)
        test = _scan_class_tree(path / "test", size, names, skipped)[0] if (path / "test").is_dir() else None
    else:
        train, names, test = *_scan_class_tree(path, size, class_names, skipped), None
    if test is None:
        from sklearn.model_selection import train_test_split

        counts = np.bincount(train.labels)
        strat = train.labels if counts.min() >= 2 else None
        itr, ite = train_test_split(np.arange(len(train.labels)), test_size=test_fraction, stratify=strat,
                                    random_state=seed)
        train, test = ArraySplit(train.images[itr], train.labels[itr]), ArraySplit(train.images[ite], train.labels[ite])
    return RawData(train, test, names, dict(skipped))


# ---------------------------------------------------------------- the dataset


def to_float_chw(images: np.ndarray | torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, in_chans, H, W) in [0, 1]; grey repeats to RGB, RGB averages to grey."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_chans, -1, -1).contiguous()
    if in_chans == 1:
        return x.mean(1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]} image channels to in_chans={in_chans}")


def fit_to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size): zero-pad a slightly smaller image (MNIST 28 -> LeNet's 32, as in
    the paper), else resize bilinearly."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h <= size and w <= size and size - max(h, w) <= 8:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(x, (left, size - w - left, top, size - h - top))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ImageArrayDataset(Dataset):
    """Preprocessed images, normalised once: yields ``(x (C, S, S), y)``. Augmentation happens per batch on the
    training device (``cnnapps.data.augment``), not here."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.images = (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]
