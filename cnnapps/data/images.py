"""What the image tasks (classify, multilabel, segment, detect) share: safe image and mask reading, a
prepared-array cache so an epoch decodes no JPEG, the config fields of their splits, augmentation and backbone,
and the per-image loop of their ``predict``.

The reading API is small on purpose (other tasks import it):

- ``read_image(path) -> np.ndarray`` of shape (H, W, 3), uint8, RGB;
- ``read_mask(path, expected_hw=None) -> np.ndarray`` of shape (H, W), integer label or instance ids;
- both raise ``ImageReadError`` (a ``ValueError``) whose message starts with the file's path; a mask whose size
  differs from its image raises the subclass ``MaskSizeError``.

Pixels are returned as stored: EXIF orientation is not applied, so an image and its mask stay aligned.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnnapps.data.augment import ImageAugment
from cnnapps.engine.config import check_backbone, option

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Everything PIL raises for a file that is missing, truncated, not an image or absurdly large.
_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
               Image.DecompressionBombWarning)


class ImageReadError(ValueError):
    """An image or mask file cannot be used; the message names the file and says why."""


class MaskSizeError(ImageReadError):
    """A mask's (H, W) differs from its image's; the message names the mask and both sizes."""


def _open_fully(path: Path) -> Image.Image:
    """Open and decode ``path`` completely (PIL is lazy: a truncated JPEG only fails at ``load``)."""
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
        return im
    except _PIL_ERRORS as exc:
        raise ImageReadError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as RGB: (H, W, 3) uint8. Grey, palette and RGBA images are converted (alpha is
    dropped). Raises ImageReadError naming the file if it is missing, truncated or not an image."""
    path = Path(path)
    im = _open_fully(path)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except _PIL_ERRORS as exc:
        raise ImageReadError(f"{path}: cannot convert mode {im.mode} to RGB ({exc})") from None
    finally:
        im.close()


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The label mask at ``path``: (H, W), uint8 for 8-bit masks (``L``, ``P``, ``1``), int32 for 16/32-bit ones.

    Values are returned as stored (palette indices for ``P`` images, not colours), e.g. Penn-Fudan's 0 for
    background and k for instance k. An RGB mask is accepted only when its three channels are equal. With
    ``expected_hw`` (the image's (height, width)) a mask of another size is a MaskSizeError naming the file.
    """
    path = Path(path)
    im = _open_fully(path)
    try:
        if im.mode in ("L", "P"):
            mask = np.asarray(im, dtype=np.uint8)
        elif im.mode == "1":
            mask = np.asarray(im, dtype=np.uint8)
        elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
            mask = np.asarray(im).astype(np.int32)
        elif im.mode in ("RGB", "RGBA", "LA"):
            rgb = np.asarray(im.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise ImageReadError(f"{path}: mask has colour (mode {im.mode}); expected one label per pixel "
                                     "(a greyscale or palette PNG)")
            mask = rgb[..., 0].copy()
        else:
            raise ImageReadError(f"{path}: unsupported mask mode {im.mode}")
    finally:
        im.close()
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        raise MaskSizeError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
                             f"{expected_hw[0]}x{expected_hw[1]}")
    return mask


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with ``size`` = side or (h, w); bilinear with antialiasing (PIL)."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) labels -> (h, w) with nearest-neighbour sampling, so no label is invented at a boundary."""
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape[:2] == (h, w):
        return mask
    mode = "L" if mask.dtype == np.uint8 else "I"
    src = mask if mode == "L" else mask.astype(np.int32)
    return np.asarray(Image.fromarray(src, mode=mode).resize((w, h), Image.NEAREST)).astype(mask.dtype)


def channel_stats(images: np.ndarray, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, H, W, C), accumulated in chunks (memmaps
    need not fit in memory as floats)."""
    c = images.shape[-1]
    total, total_sq, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i:i + chunk], dtype=np.float64) / 255.0
        total += x.sum(axis=(0, 1, 2))
        total_sq += (x ** 2).sum(axis=(0, 1, 2))
        n += x.shape[0] * x.shape[1] * x.shape[2]
    if n == 0:
        raise ValueError("channel_stats of an empty image set")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean ** 2, 1e-6))
    return mean.tolist(), std.tolist()


def picture_path(out: str | os.PathLike | None, source: str | os.PathLike, suffix: str, single: bool) -> Path:
    """Where a ``predict`` picture for input ``source`` goes: ``out`` itself when it names a .png and there is one
    input, else ``out/<stem><suffix>.png`` (``out`` defaulting to ./predictions). Creates the folder."""
    out = Path(out) if out is not None else Path("predictions")
    if out.suffix.lower() == ".png" and single:
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{Path(source).stem}{suffix}.png"


# ---------------------------------------------------------------- prepared-array caches


def files_fingerprint(files: Iterable[Path], extra: str = "") -> str:
    """A 16-hex key that changes when any file's path, size or modification time changes, or ``extra`` does.
    Missing files count too (as missing), so a cache notices a file appearing."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        try:
            st = Path(f).stat()
            h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}:missing\n".encode())
    return h.hexdigest()[:16]


def cached_arrays(folder: Path, build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (memory-mapped, read-only) and a JSON index kept in ``folder``; ``build()`` makes them on the first
    call. The folder appears atomically (built beside it, then renamed), so a killed build leaves no half cache.
    ``folder``'s name should carry a fingerprint of the sources (``files_fingerprint``) so a change rebuilds."""
    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        arrays, index = build()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            (tmp / "index.json").write_text(json.dumps({**index, "arrays": sorted(arrays)}, indent=1))
            try:
                tmp.rename(folder)
            except OSError:  # another process finished the same cache first: keep theirs
                if not index_path.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("prepared cache %s", folder)
    index = json.loads(index_path.read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in index.pop("arrays")}
    return arrays, index


# ---------------------------------------------------------------- config fields the image tasks share


def override(cls: type, name: str, default: Any, **changes: Any) -> Any:
    """Field ``name`` of the dataclass ``cls`` with another default and, where given, other option metadata
    (``help``, ``ge``, ...; None removes a bound): how a task's section keeps a shared field's meaning but sets
    its own default, e.g. ``augment: bool = override(ImageData, "augment", True)``."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata={**base.metadata, **changes})


@dataclass
class ImageData:
    """The ``[data]`` fields of an image task's split and training augmentation; the classify, multilabel and
    segment sections extend it with their sources (and ``override`` its defaults)."""

    image_size: int = option(96, help="side in pixels that images are resized (squashed) to", gt=0)
    split_seed: int = option(0, help="seed of the train/val/test split, apart from train.seed so that runs with "
                             "other seeds see the same split (soups, seed studies)")
    train_subset: int = option(0, help="keep only the first N training images of the seeded order (quick runs); "
                               "0: all", ge=0)
    test_subset: int = option(0, help="score only N test images, drawn with split_seed; 0: all", ge=0)
    augment: bool = option(False, help="random geometry and colour per training batch, as the fields below set")
    hflip: bool = option(False, help="augment: mirror left-right with probability 1/2")
    crop_scale: float = option(1.0, help="augment: random-resized crop that keeps at least this fraction of the "
                               "area; 1: no crop", gt=0, le=1)
    translate: float = option(0.0, help="augment: random shift up to this fraction of the image size, per axis",
                              ge=0, lt=1)
    rotation: float = option(0.0, help="augment: random rotation up to this many degrees either way", ge=0, le=180)
    color_jitter: float = option(0.0, help="augment: strength of random brightness, contrast and saturation",
                                 ge=0, lt=1)

    def augmentation(self) -> ImageAugment | None:
        """The per-batch training augmentation these fields ask for; None when ``augment`` is off or sets
        nothing."""
        aug = ImageAugment(crop_scale=self.crop_scale, translate=self.translate, rotation=self.rotation,
                           hflip=self.hflip, color_jitter=self.color_jitter)
        return aug if self.augment and aug.active else None


@dataclass
class ImageBackbone:
    """The ``[model]`` fields that name an image task's zoo network; task sections extend it."""

    backbone: str = option("resnet18", help="the zoo network, a 2D one (`python -m cnnapps list`)")
    kwargs: dict = option(help="extra keyword arguments of the backbone (e.g. width)", default_factory=dict)

    def check(self) -> None:
        """Rules between fields, checked when a config loads (subclasses call it first)."""
        check_backbone(self.backbone, "model.backbone", dim=2)


# ---------------------------------------------------------------- predict


def image_batch(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> a batch of one, (1, 3, H, W) uint8."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def predict_images(inputs: Sequence[str], run: Callable[[torch.Tensor], Any],
                   row: Callable[[str, np.ndarray, Any], dict[str, Any]], device: torch.device,
                   size: int | None = None, prepare: Callable[[np.ndarray], torch.Tensor] | None = None
                   ) -> Iterator[dict[str, Any]]:
    """The per-image loop of the image tasks' ``predict``. Each input is read (RGB); a file that cannot be read
    yields ``{"input": path, "error": message}`` and the loop goes on. The image becomes a batch of one:
    ``prepare(image)`` where a task prepares its own, else resized to ``size`` x ``size`` (kept as it is for
    None) as (1, 3, S, S) uint8. ``run(batch on device)`` runs under inference mode, and the loop yields
    ``{"input": path, **row(path, image, output)}``.

    That is the project's predict schema: ``input`` (the file as given), ``picture`` (the image a task wrote,
    where it wrote one), ``error`` (a failure), and the task's fields beside them."""
    for path in inputs:
        try:
            image = read_image(path)
        except ImageReadError as exc:
            yield {"input": path, "error": str(exc)}
            continue
        if prepare is not None:
            x = prepare(image)
        else:
            x = image_batch(resize_image(image, size) if size else image)
        with torch.inference_mode():
            output = run(x.to(device))
        yield {"input": path, **row(path, image, output)}
