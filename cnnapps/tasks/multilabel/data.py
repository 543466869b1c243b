"""Multi-label data: VOC-mini or a user's folder with a labels CSV, decoded once into a cached uint8 array."""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnapps.data.images import ImageReadError, cached_arrays, files_fingerprint, read_image, resize_image
from cnnapps.data.root import DataNotFoundError, cache_dir, require_path

log = logging.getLogger(__name__)

CACHE_VERSION = "v1"
MISSING = "annotation names a missing image"
UNREADABLE = "unreadable image"


@dataclass
class LabelledImages:
    """Image files and their labels before decoding.

    ``targets`` (N, C) is 1 for a class present; ``ignore`` (N, C) is 1 where a label must count neither way
    (VOC's difficult-only classes); ``split`` (N,) names the source split of each image (``trainval``/``test``,
    or a CSV's ``train``/``val``/``test``; ``""`` when the source has none)."""

    files: list[Path]
    targets: np.ndarray
    ignore: np.ndarray
    split: np.ndarray
    class_names: list[str]
    skipped: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------- sources


def load_voc_mini(root: Path, class_names: Sequence[str] | None = None) -> LabelledImages:
    """``voc_mini/annotations.json`` with ``splits/trainval.txt`` and ``splits/test.txt`` (see its SOURCE.md).
    A label that is not one of the classes is a ValueError naming the image; an id in a split file without an
    annotation is a counted skip."""
    folder = require_path(root / "voc_mini", "VOC-mini folder (voc_mini/)")
    ann_path = require_path(folder / "annotations.json", "VOC-mini annotations (voc_mini/annotations.json)")
    try:
        ann = json.loads(ann_path.read_text())
        classes = [str(c) for c in ann["classes"]]
        by_id = {str(im["id"]): im for im in ann["images"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{ann_path}: not a VOC-mini annotation file ({type(exc).__name__}: {exc})") from None
    if class_names is not None and list(class_names) != classes:
        raise ValueError(f"{ann_path}: its classes {classes} differ from the checkpoint's {list(class_names)}")
    index = {c: i for i, c in enumerate(classes)}
    files, rows, ignores, splits = [], [], [], []
    skipped: Counter = Counter()
    for split in ("trainval", "test"):
        split_file = require_path(folder / "splits" / f"{split}.txt", f"VOC-mini split list (splits/{split}.txt)")
        for line_no, image_id in enumerate(split_file.read_text().split(), 1):
            im = by_id.get(image_id)
            if im is None:
                log.warning("skip %s:%d: image id %s has no entry in %s", split_file, line_no, image_id, ann_path)
                skipped["split list names an image without annotation"] += 1
                continue
            target, ignore = np.zeros(len(classes), np.float32), np.zeros(len(classes), np.float32)
            for key, arr in (("labels", target), ("difficult_labels", ignore)):
                for label in im.get(key, []):
                    if label not in index:
                        raise ValueError(f"{ann_path}: image {image_id} has unknown label {label!r} in '{key}' "
                                         f"(classes: {', '.join(classes)})")
                    arr[index[label]] = 1.0
            ignore[target > 0] = 0.0  # a class with a clear instance is positive even if another is difficult
            files.append(folder / str(im.get("file", f"JPEGImages/{image_id}.jpg")))
            rows.append(target)
            ignores.append(ignore)
            splits.append(split)
    if not files:
        raise DataNotFoundError(f"{folder}: the split lists name no annotated image")
    return LabelledImages(files, np.stack(rows), np.stack(ignores), np.array(splits), classes, skipped)


def load_label_csv(csv_path: Path, image_dir: Path, class_names: Sequence[str] | None = None) -> LabelledImages:
    """A user's labels CSV: a header with ``file`` and ``labels`` (class names separated by ``;``; empty = no
    class) and optionally ``split`` (``train``, ``val`` or ``test``). ``file`` is relative to ``image_dir``.

    Classes are the sorted union of the labels, or ``class_names`` (a checkpoint's) where given: a label outside
    them is then a ValueError naming the CSV line, never a silently dropped label."""
    csv_path = require_path(csv_path, "labels CSV")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            if "file" not in header or "labels" not in header:
                raise ValueError(f"{csv_path}: header must name the columns 'file' and 'labels' (got {header})")
            raw = [(n, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for n, row in
                   enumerate(reader, 2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{csv_path}: unreadable labels CSV ({exc})") from None
    entries = []
    for line_no, row in raw:
        if not row.get("file"):
            raise ValueError(f"{csv_path}:{line_no}: empty 'file'")
        labels = [s.strip() for s in row["labels"].split(";") if s.strip()]
        split = row.get("split", "").lower()
        if split not in ("", "train", "val", "test"):
            raise ValueError(f"{csv_path}:{line_no}: split {split!r} is not train, val or test")
        entries.append((line_no, row["file"], labels, split))
    if not entries:
        raise DataNotFoundError(f"{csv_path}: no rows")
    classes = list(class_names) if class_names is not None else sorted({lb for _, _, lbs, _ in entries for lb in lbs})
    if not classes:
        raise ValueError(f"{csv_path}: no labels at all; a multi-label task needs at least one class")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(entries), len(classes)), np.float32)
    for r, (line_no, _, labels, _) in enumerate(entries):
        for label in labels:
            if label not in index:
                raise ValueError(f"{csv_path}:{line_no}: unknown label {label!r} (classes: {', '.join(classes)})")
            targets[r, index[label]] = 1.0
    files = [Path(f) if Path(f).is_absolute() else image_dir / f for _, f, _, _ in entries]
    return LabelledImages(files, targets, np.zeros_like(targets), np.array([s for *_, s in entries]), classes)


# ---------------------------------------------------------------- decoding (cached)


def decode_images(files: Sequence[Path], size: int, tag: str) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Decode and resize every file to (size, size) once; later calls read the cache.

    Returns (images (K, size, size, 3) uint8 memmap of the readable files, kept (K,) indices into ``files``,
    skipped reasons -> counts). Each skipped file is logged by name (on every call, not only when decoding).
    """
    key = files_fingerprint(files, f"{CACHE_VERSION}:{size}")
    folder = cache_dir("multilabel") / f"{tag}-{size}px-{key}"

    def build() -> tuple[dict[str, np.ndarray], dict]:
        images, kept, bad = [], [], []
        for i, f in enumerate(files):
            if not Path(f).is_file():
                bad.append([str(f), MISSING, ""])
                continue
            try:
                images.append(resize_image(read_image(f), size))
                kept.append(i)
            except ImageReadError as exc:
                bad.append([str(f), UNREADABLE, str(exc).removeprefix(f"{f}: ")])
        arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        return {"images": arr, "kept": np.asarray(kept, np.int64)}, {"bad": bad, "size": size}

    arrays, index = cached_arrays(folder, build)
    skipped: Counter = Counter()
    for path, reason, detail in index["bad"]:
        log.warning("skip %s: %s%s", path, reason, f" ({detail})" if detail else "")
        skipped[reason] += 1
    if len(arrays["kept"]) == 0:
        raise DataNotFoundError(f"none of the {len(files)} images could be read (first: {files[0]})")
    return arrays["images"], np.asarray(arrays["kept"]), skipped


# ---------------------------------------------------------------- the dataset


class MultiLabelImages(Dataset):
    """Yields ``{"x": (3, S, S) uint8, "y": (C,) float 0/1, "mask": (C,) float (0 = ignored label),
    "calib": bool}``. ``calib`` marks validation images on which the metric chooses thresholds. Normalisation
    and augmentation happen per batch on the device (the model's ``prepare`` and the task's ``step``)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, ignore: np.ndarray,
                 calib: np.ndarray | bool = False) -> None:
        self.images, self.rows = images, np.asarray(rows, np.int64)  # rows index into `images`
        self.targets = torch.as_tensor(np.asarray(targets, np.float32))
        self.mask = 1.0 - torch.as_tensor(np.asarray(ignore, np.float32))
        self.calib = torch.as_tensor(np.broadcast_to(np.asarray(calib, bool), (len(self.rows),)).copy())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img = np.ascontiguousarray(self.images[self.rows[i]].transpose(2, 0, 1))
        return {"x": torch.from_numpy(img), "y": self.targets[i], "mask": self.mask[i], "calib": self.calib[i]}
