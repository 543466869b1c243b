"""Segmentation data: image/mask pairs of Penn-Fudan (or a folder laid out like it), the seeded train/val/test
split of their stems, and the cached class-id masks."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnapps.data.images import (IMAGE_SUFFIXES, ImageReadError, MaskSizeError, cached_arrays, files_fingerprint,
                                 read_image, read_mask, resize_image, resize_mask)
from cnnapps.data.root import DataNotFoundError, cache_dir
from cnnapps.metrics.segmentation import IGNORE_INDEX

log = logging.getLogger(__name__)

CACHE_VERSION = "v1"
NO_MASK = "image without a mask file"
UNREADABLE_IMAGE = "unreadable image"
UNREADABLE_MASK = "unreadable mask"
SIZE_MISMATCH = "mask size differs from its image"
NO_OBJECTS = "image with no objects (kept, all background)"


@dataclass(frozen=True)
class Pair:
    """One example: ``stem``, its image and its mask file (None when no mask was found)."""

    stem: str
    image: Path
    mask: Path | None


def find_mask(image: str | Path) -> Path | None:
    """The mask of ``<folder>/images/<stem>.*``: ``<folder>/masks/<stem>_mask.png`` (Penn-Fudan) or
    ``<stem>.png``, whichever exists; None when neither does."""
    image = Path(image)
    mask_dir = image.parent.parent / "masks"
    return next((c for c in (mask_dir / f"{image.stem}_mask.png", mask_dir / f"{image.stem}.png") if c.is_file()),
                None)


def find_pairs(folder: Path) -> list[Pair]:
    """Images in ``folder/images`` with their masks (``find_mask``), sorted by stem. A missing ``images/`` folder
    is a DataNotFoundError naming it."""
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise DataNotFoundError(f"image folder not found: {image_dir} (expected images/ and masks/ in {folder})")
    pairs = []
    for img in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        pairs.append(Pair(img.stem, img, find_mask(img)))
    if not pairs:
        raise DataNotFoundError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return pairs


def split_stems(stems: Sequence[str], val_count: int, test_count: int, seed: int,
                train_subset: int = 0, test_subset: int = 0) -> dict[str, list[str]]:
    """Seeded split of example stems into ``train``/``val``/``test`` (``test_count`` first, then ``val_count``
    from one permutation of the sorted stems). Every stem is placed before any bad example is dropped, so a
    damaged file never moves the others to another split. ``train_subset`` and ``test_subset`` keep the first N
    training and test stems of that permutation (0: all)."""
    order = [sorted(stems)[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    if val_count + test_count >= len(order):
        raise ValueError(f"val_count {val_count} + test_count {test_count} leave no training examples of "
                         f"{len(order)}")
    test, val, train = order[:test_count], order[test_count:test_count + val_count], order[test_count + val_count:]
    if train_subset:
        train = train[:train_subset]
    if test_subset:
        test = test[:test_subset]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def to_class_ids(mask: np.ndarray, mask_values: str, num_classes: int, source: Path) -> np.ndarray:
    """Stored mask (H, W) -> class ids (H, W) uint8. ``instances`` (Penn-Fudan): 0 background, any k > 0
    (instance k) -> class 1. ``classes``: the value is the class id, ``255`` = ignore; a value outside
    0..num_classes-1 is a ValueError naming ``source`` (never a silently wrong label)."""
    if mask_values == "instances":
        return (mask > 0).astype(np.uint8)
    if mask_values == "classes":
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(f"{source}: mask values {bad[:8].tolist()} are not class ids 0..{num_classes - 1} "
                             f"or {IGNORE_INDEX} (ignore)")
        return mask.astype(np.uint8)
    raise ValueError(f"unknown mask_values {mask_values!r} (instances, classes)")


@dataclass
class SemanticArrays:
    """The readable examples at one size: ``images`` (N, S, S, 3) uint8, ``masks`` (N, S, S) uint8 class ids,
    their ``stems``, the reasons and counts of dropped or notable examples, and the names of empty ones."""

    images: np.ndarray
    masks: np.ndarray
    stems: list[str]
    counts: Counter = field(default_factory=Counter)


def load_semantic(pairs: Sequence[Pair], size: int, mask_values: str, num_classes: int, tag: str) -> SemanticArrays:
    """Decode, check and resize every pair once (image bilinear, mask nearest) and cache the result.

    Dropped and counted (each file named in a warning): an unreadable image, an image without a mask, an
    unreadable mask, a mask whose size differs from its image. Kept and counted: an image with no objects (its
    mask is all background). A mask with values outside the classes is a ValueError naming it.
    """
    files = [p.image for p in pairs] + [p.mask for p in pairs if p.mask is not None]
    key = files_fingerprint(files, f"{CACHE_VERSION}:{size}:{mask_values}:{num_classes}")
    folder = cache_dir("segment") / f"{tag}-semantic-{size}px-{key}"

    def build() -> tuple[dict[str, np.ndarray], dict]:
        images, masks, stems, notes = [], [], [], []
        for p in pairs:
            try:
                img = read_image(p.image)
            except ImageReadError as exc:
                notes.append([str(p.image), UNREADABLE_IMAGE, str(exc).removeprefix(f"{p.image}: ")])
                continue
            if p.mask is None:
                notes.append([str(p.image), NO_MASK, ""])
                continue
            try:
                mask = read_mask(p.mask, expected_hw=img.shape[:2])
            except ImageReadError as exc:
                reason = SIZE_MISMATCH if isinstance(exc, MaskSizeError) else UNREADABLE_MASK
                notes.append([str(p.mask), reason, str(exc).removeprefix(f"{p.mask}: ")])
                continue
            ids = to_class_ids(mask, mask_values, num_classes, p.mask)
            if not ((ids > 0) & (ids != IGNORE_INDEX)).any():
                notes.append([str(p.mask), NO_OBJECTS, ""])
            images.append(resize_image(img, size))
            masks.append(resize_mask(ids, size))
            stems.append(p.stem)
        arrays = {"images": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                  "masks": np.stack(masks) if masks else np.zeros((0, size, size), np.uint8)}
        return arrays, {"stems": stems, "notes": notes}

    arrays, index = cached_arrays(folder, build)
    counts: Counter = Counter()
    for path, reason, detail in index["notes"]:
        if reason == NO_OBJECTS:
            log.info("%s: %s", path, reason)
        else:
            log.warning("skip %s: %s%s", path, reason, f" ({detail})" if detail else "")
        counts[reason] += 1
    if not index["stems"]:
        raise DataNotFoundError(f"none of the {len(pairs)} image/mask pairs could be used (first: {pairs[0].image})")
    return SemanticArrays(arrays["images"], arrays["masks"], list(index["stems"]), counts)


class SemanticImages(Dataset):
    """Yields ``{"x": (3, S, S) uint8, "mask": (S, S) uint8 class ids (255 = ignore)}`` for rows of the cached
    arrays; normalisation and augmentation happen per batch on the device."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, rows: Sequence[int]) -> None:
        self.images, self.masks, self.rows = images, masks, np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows[i]
        return {"x": torch.from_numpy(np.ascontiguousarray(self.images[r].transpose(2, 0, 1))),
                "mask": torch.from_numpy(np.array(self.masks[r]))}
