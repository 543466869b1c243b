"""CIFAR-10 as arrays: the JPEG subset ``cifar10/cifar10-jpeg.tar.gz`` decoded once into a cached ``.npz``. The
classification task reads it, and so do the understanding probes, which train their own backbones on it."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnapps.data.images import IMAGE_SUFFIXES
from cnnapps.data.root import cache_dir, require_path

log = logging.getLogger(__name__)


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{name}: unreadable image ({exc})") from None


def prepare_cifar10(root: Path) -> Path:
    """Decode ``cifar10/cifar10-jpeg.tar.gz`` once into a cached ``.npz``; returns its path (rebuilt when the
    archive changes). Unreadable members are skipped and counted in the cache. The file holds ``x_train``
    (N, 32, 32, 3) uint8, ``y_train`` (N,) int64, ``x_test``, ``y_test``, ``classes`` (names, sorted; labels
    index them) and ``skipped`` (a JSON {reason: count})."""
    archive = require_path(root / "cifar10" / "cifar10-jpeg.tar.gz", "CIFAR-10 archive (cifar10/cifar10-jpeg.tar.gz)")
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v1".encode()).hexdigest()[:16]
    out = cache_dir("cifar10") / f"cifar10-{key}.npz"
    if out.is_file():
        return out
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    classes: set[str] = set()
    skipped: Counter = Counter()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3 or Path(m.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                split, cls = parts[-3], parts[-2]
                if split not in splits:
                    continue
                fh = tar.extractfile(m)
                try:
                    img = _decode(fh.read() if fh else b"", f"{archive}:{m.name}")
                except ValueError as exc:
                    log.warning("skip %s", exc)
                    skipped["unreadable image"] += 1
                    continue
                if img.shape != (32, 32, 3):
                    log.warning("skip %s:%s: shape %s is not 32x32x3", archive, m.name, img.shape)
                    skipped["wrong image size"] += 1
                    continue
                classes.add(cls)
                splits[split][0].append(img)
                splits[split][1].append(cls)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{archive}: unreadable archive ({exc})") from None
    names = sorted(classes)
    index = {c: i for i, c in enumerate(names)}
    arrays = {}
    for split, (imgs, labels) in splits.items():
        if not imgs:
            raise ValueError(f"{archive}: no '{split}/<class>/*.jpg' images found")
        arrays[f"x_{split}"] = np.stack(imgs)
        arrays[f"y_{split}"] = np.array([index[c] for c in labels], dtype=np.int64)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, classes=np.array(names), skipped=json.dumps(dict(skipped)), **arrays)
    tmp.replace(out)
    return out
