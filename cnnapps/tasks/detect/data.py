"""Detection data: Penn-Fudan, VOC-mini and COCO-format folders, decoded once into a resized image cache.

Conventions (also in the README section of the detect task):

- Boxes are continuous ``[x1, y1, x2, y2]`` pixel coordinates of the stored (cached) image, as torchvision's
  detectors and pycocotools expect. Penn-Fudan's ``boxes.json`` gives inclusive pixel indices, so its x2 and y2
  gain 1. VOC-mini's ``bbox`` and COCO's ``[x, y, w, h]`` are already continuous.
- Images are shrunk once (never enlarged) with the detector's own rule, ``min(min_size / short, max_size / long)``,
  so the model's internal resize is (almost) an identity and an epoch decodes no JPEG. Metrics are computed at that
  stored scale (COCO's small/medium/large areas therefore refer to it).
- A box partly outside its image is clipped to the image (a logged count); a box with zero area, before or after
  clipping, is skipped and counted. An image without objects is kept as a negative example (torchvision's
  detectors train on empty targets; in evaluation it can only add false positives) and counted in the log.
- An unreadable image, or an annotation whose image file is missing, skips that image and is counted in
  ``DataSplits.skipped`` (each file is named in a warning). A mask whose size differs from its image, a mask file
  whose instance count differs from the boxes, or an annotation file that is not valid JSON of the expected shape
  is an error naming the file (images and masks are read with ``cnnapps.data.images``).
- "Ignored" boxes take no part in training and neither match nor count as misses in evaluation (pycocotools'
  crowd mechanism): COCO ``iscrowd`` objects, and VOC-mini boxes of a class listed in the image's
  ``difficult_labels`` (the export lost the per-box difficult flag, but a class that is present *only* as difficult
  objects marks every box of that class in the image as difficult). Difficult boxes of classes that also have
  ordinary boxes cannot be told apart and count as ordinary boxes.
- Penn-Fudan and COCO folders have no official split: the sorted image list is permuted with ``data.split_seed``,
  the first ``test_fraction`` is the test split; ``val_fraction`` of the rest (same permutation) is validation.
  VOC-mini uses ``splits/trainval.txt`` / ``splits/test.txt``; validation is carved from trainval the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from cnnapps.data import cache_dir
from cnnapps.data.images import ImageReadError, read_image, read_mask, resize_image, resize_mask
from cnnapps.data.root import DataNotFoundError, require_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DATASETS = ("pennfudan", "voc_mini", "coco")


class DetectionDataError(ValueError):
    """An annotation or mask file is malformed or inconsistent with its image; the message names the file."""


class UnreadableImageError(DetectionDataError):
    """An image file exists but cannot be decoded (truncated, not an image); the message names the file."""


# ---------------------------------------------------------------- source descriptions (before decoding)


@dataclass
class SourceImage:
    """One image as the annotation files describe it, in the coordinates of the file on disk.

    ``boxes``: (N, 4) continuous x1, y1, x2, y2; ``labels``: N class indices 1..K (0 is the background);
    ``ignore``: N flags (difficult / crowd); ``mask_file``: Penn-Fudan instance-id PNG (value k = box k-1);
    ``segmentations``: COCO polygons or RLE per box, with ``annotated_size`` (height, width) from the JSON.
    ``split``: the split the source assigns ("train" / "test"), or "" when a seeded split decides."""

    key: str
    path: Path
    boxes: list[list[float]]
    labels: list[int]
    ignore: list[int]
    split: str = ""
    mask_file: Path | None = None
    segmentations: list[Any] | None = None
    annotated_size: tuple[int, int] | None = None


@dataclass
class Source:
    """A whole data set as described by its files: class names (without background) and images, plus the files
    whose size and time decide whether the cache is stale, and counts of annotations skipped while reading."""

    name: str
    class_names: list[str]
    images: list[SourceImage]
    files: list[Path]
    skipped: Counter = field(default_factory=Counter)


def _read_json(path: Path) -> Any:
    require_path(path, "annotation file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DetectionDataError(f"{path}: not valid JSON ({exc})") from None


def _box_list(value: Any, where: str) -> list[list[float]]:
    try:
        boxes = [[float(v) for v in box] for box in value]
    except (TypeError, ValueError):
        raise DetectionDataError(f"{where}: boxes must be lists of 4 numbers, got {value!r}") from None
    if any(len(b) != 4 for b in boxes):
        raise DetectionDataError(f"{where}: boxes must be lists of 4 numbers, got {value!r}")
    return boxes


def read_pennfudan(root: Path, masks: bool) -> Source:
    """Penn-Fudan: ``images/<stem>.jpg``, ``boxes.json`` (inclusive pixel boxes), ``masks/<stem>_mask.png``."""
    folder = require_path(root / "pennfudan", "Penn-Fudan folder (pennfudan/)")
    ann_path = folder / "boxes.json"
    table = _read_json(ann_path)
    if not isinstance(table, dict):
        raise DetectionDataError(f"{ann_path}: expected an object mapping image stems to box lists")
    images, files, skipped = [], [ann_path], Counter()
    for stem in sorted(table):
        boxes = _box_list(table[stem], f"{ann_path} [{stem}]")
        boxes = [[x1, y1, x2 + 1.0, y2 + 1.0] for x1, y1, x2, y2 in boxes]  # inclusive pixel indices -> continuous
        path = folder / "images" / f"{stem}.jpg"
        mask_file = folder / "masks" / f"{stem}_mask.png" if masks else None
        images.append(SourceImage(stem, path, boxes, [1] * len(boxes), [0] * len(boxes), mask_file=mask_file))
        files += [path] + ([mask_file] if mask_file else [])
    return Source("pennfudan", ["person"], images, files, skipped)


def read_voc_mini(root: Path) -> Source:
    """VOC-mini: ``annotations.json`` (stored-image boxes, 20 classes, difficult-only classes per image)."""
    folder = require_path(root / "voc_mini", "VOC-mini folder (voc_mini/)")
    ann_path = folder / "annotations.json"
    doc = _read_json(ann_path)
    try:
        class_names = list(doc["classes"])
        entries = list(doc["images"])
    except (KeyError, TypeError):
        raise DetectionDataError(f"{ann_path}: expected {{'classes': [...], 'images': [...]}}") from None
    index = {name: i + 1 for i, name in enumerate(class_names)}
    images, files, skipped = [], [ann_path], Counter()
    for e in entries:
        try:
            key, file, split = str(e["id"]), e["file"], e["split"]
            difficult = set(e.get("difficult_labels", []))
            objects = e["objects"]
        except (KeyError, TypeError):
            raise DetectionDataError(f"{ann_path}: image entry without id/file/split/objects: {e!r}") from None
        boxes, labels, ignore = [], [], []
        for obj in objects:
            name = obj.get("name")
            if name not in index:
                skipped[f"box of an unknown class (not in {ann_path.name} classes)"] += 1
                continue
            boxes += _box_list([obj.get("bbox")], f"{ann_path} [{key}]")
            labels.append(index[name])
            ignore.append(int(name in difficult))
        path = folder / file
        images.append(SourceImage(key, path, boxes, labels, ignore, split="test" if split == "test" else "train"))
        files.append(path)
    return Source("voc_mini", class_names, images, files, skipped)


def read_coco(image_dir: Path, ann_path: Path, masks: bool) -> Source:
    """A COCO "instances" JSON (``images``, ``annotations`` with ``bbox`` [x, y, w, h], ``categories``) and the
    folder its ``file_name`` entries are relative to. Category ids map to 1..K in increasing id order."""
    doc = _read_json(ann_path)
    try:
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        img_entries = list(doc["images"])
        anns = list(doc.get("annotations", []))
        class_names = [str(c["name"]) for c in cats]
        cat_index = {c["id"]: i + 1 for i, c in enumerate(cats)}
        by_id = {e["id"]: e for e in img_entries}
    except (KeyError, TypeError):
        raise DetectionDataError(f"{ann_path}: not a COCO instances file (needs images, annotations and "
                                 "categories with ids)") from None
    per_image: dict[Any, list[dict]] = {i: [] for i in by_id}
    skipped: Counter = Counter()
    for a in anns:
        if not isinstance(a, dict) or "image_id" not in a or "bbox" not in a:
            raise DetectionDataError(f"{ann_path}: annotation without image_id or bbox: {a!r}")
        if a["image_id"] not in by_id:
            skipped["annotation of an image id not in 'images'"] += 1
            continue
        if a.get("category_id") not in cat_index:
            skipped["annotation of an unknown category id"] += 1
            continue
        per_image[a["image_id"]].append(a)
    images, files = [], [ann_path]
    for img_id in sorted(by_id, key=lambda i: str(by_id[i].get("file_name", i))):
        e = by_id[img_id]
        if "file_name" not in e:
            raise DetectionDataError(f"{ann_path}: image {img_id!r} has no file_name")
        boxes, labels, ignore, segs = [], [], [], []
        for a in per_image[img_id]:
            (x, y, w, h), = _box_list([a["bbox"]], f"{ann_path} [annotation {a.get('id')}]")
            boxes.append([x, y, x + w, y + h])
            labels.append(cat_index[a["category_id"]])
            ignore.append(int(bool(a.get("iscrowd", 0))))
            segs.append(a.get("segmentation"))
        size = (int(e["height"]), int(e["width"])) if "height" in e and "width" in e else None
        path = image_dir / e["file_name"]
        images.append(SourceImage(str(img_id), path, boxes, labels, ignore, segmentations=segs if masks else None,
                                  annotated_size=size))
        files.append(path)
    return Source("coco", class_names, images, files, skipped)


def read_source(dataset: str, root: Path, path: str = "", annotations: str = "", masks: bool = False) -> Source:
    """The annotation files of ``dataset`` under the data root ``root``; DataNotFoundError / DetectionDataError
    naming the file when something is missing or malformed."""
    if dataset == "pennfudan":
        return read_pennfudan(root, masks)
    if dataset == "voc_mini":
        if masks:
            raise DetectionDataError("voc_mini has boxes only; instance masks (model.arch = 'maskrcnn') need "
                                     "pennfudan or a COCO folder with segmentations")
        return read_voc_mini(root)
    if dataset == "coco":
        if not annotations:
            raise DetectionDataError("data.dataset = 'coco' needs data.annotations (the instances JSON)")

        def resolve(p: str) -> Path:
            q = Path(p).expanduser()
            return q if q.is_absolute() or q.exists() else root / q

        ann = resolve(annotations)
        image_dir = resolve(path) if path else ann.parent
        if not image_dir.is_dir():
            raise DataNotFoundError(f"image folder not found: {image_dir}")
        return read_coco(image_dir, ann, masks)
    raise DetectionDataError(f"data.dataset: unknown {dataset!r} ({', '.join(DATASETS)})")


# ---------------------------------------------------------------- decoding into the cache


def stored_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor torchvision's GeneralizedRCNNTransform would resize by, capped at 1 (the cache never enlarges)."""
    return min(1.0, min_size / min(height, width), max_size / max(height, width))


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path``, fully decoded: (H, W, 3) uint8 RGB. DataNotFoundError if absent (an annotation whose
    image is missing), UnreadableImageError naming the file if it cannot be decoded."""
    if not path.is_file():
        raise DataNotFoundError(f"image file not found: {path}")
    try:
        return read_image(path)
    except ImageReadError as exc:
        raise UnreadableImageError(str(exc)) from None


def _instance_masks(img: SourceImage, height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 binary masks of ``img``'s N boxes at the file's resolution."""
    n = len(img.boxes)
    if img.mask_file is not None:
        if not img.mask_file.is_file():
            raise DataNotFoundError(f"mask file not found: {img.mask_file} (for {img.path})")
        ids = read_mask(img.mask_file, expected_hw=(height, width))  # MaskSizeError naming the mask file
        present = int(ids.max()) if ids.size else 0
        if present != n:
            raise DetectionDataError(f"{img.mask_file}: {present} instances but {n} boxes for {img.path.name}")
        return np.stack([(ids == k + 1) for k in range(n)]).astype(np.uint8) if n else \
            np.zeros((0, height, width), np.uint8)
    if img.segmentations is not None:
        if img.annotated_size is not None and img.annotated_size != (height, width):
            h, w = img.annotated_size
            raise DetectionDataError(f"{img.path}: annotated size {w}x{h} (whose segmentations give its masks) "
                                     f"differs from the image's {width}x{height}")
        out = np.zeros((n, height, width), np.uint8)
        for k, seg in enumerate(img.segmentations):
            if seg is None or seg == []:
                x1, y1, x2, y2 = (int(round(v)) for v in img.boxes[k])
                out[k, max(y1, 0):y2, max(x1, 0):x2] = 1  # no outline given: the box is the best mask we have
                continue
            try:
                rles = mask_utils.frPyObjects(seg, height, width)
                rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
                out[k] = mask_utils.decode(rle)
            except (TypeError, ValueError, KeyError, IndexError) as exc:
                raise DetectionDataError(f"{img.path}: segmentation {k} cannot be decoded ({exc})") from None
        return out
    raise DetectionDataError(f"{img.path}: no mask source")


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) binary uint8 -> N COCO RLEs with ``counts`` as str (JSON-ready)."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in rles]


def decode_masks(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """N RLEs (as ``encode_masks`` writes them) -> (N, H, W) uint8."""
    if not rles:
        return np.zeros((0, height, width), np.uint8)
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return np.ascontiguousarray(mask_utils.decode(coded).transpose(2, 0, 1))


@dataclass
class CacheRecord:
    """One decoded image in the cache: (3, height, width) uint8 bytes at ``offset`` of ``images.u8``; boxes etc.
    in stored coordinates; ``masks``: RLEs or None."""

    key: str
    file: str
    split: str
    height: int
    width: int
    offset: int
    boxes: list[list[float]]
    labels: list[int]
    ignore: list[int]
    masks: list[dict] | None = None


def _fingerprint(source: Source, min_size: int, max_size: int, masks: bool) -> str:
    """Hash of what the cache depends on: settings, and every source file's path, size and mtime."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, source.name, min_size, max_size, masks]).encode())
    for f in source.files:
        try:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:20]


def _prepare_one(img: SourceImage, min_size: int, max_size: int, masks: bool,
                 counts: Counter) -> tuple[np.ndarray, dict]:
    """Decode and shrink one image; check and rescale its boxes (and masks). Returns (CHW uint8, record fields)."""
    image = read_rgb(img.path)
    height, width = image.shape[:2]
    inst = _instance_masks(img, height, width) if masks else None
    scale = stored_scale(height, width, min_size, max_size)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = resize_image(image, (new_h, new_w))
    sx, sy = new_w / width, new_h / height
    boxes, labels, ignore, keep = [], [], [], []
    for k, ((x1, y1, x2, y2), label, ign) in enumerate(zip(img.boxes, img.labels, img.ignore)):
        if x2 <= x1 or y2 <= y1:
            counts["box of zero area"] += 1
            log.warning("%s: box %d %s has zero area; skipped", img.path, k, [x1, y1, x2, y2])
            continue
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if cx2 <= cx1 or cy2 <= cy1:
            counts["box outside its image"] += 1
            log.warning("%s: box %d %s lies outside the %dx%d image; skipped", img.path, k, [x1, y1, x2, y2],
                        width, height)
            continue
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            counts["clipped"] += 1
        boxes.append([cx1 * sx, cy1 * sy, cx2 * sx, cy2 * sy])
        labels.append(label)
        ignore.append(ign)
        keep.append(k)
    rles = None
    if inst is not None:
        inst = inst[keep]
        if len(inst) and (new_w, new_h) != (width, height):
            inst = np.stack([resize_mask(m, (new_h, new_w)) for m in inst])
        rles = encode_masks(inst.reshape(len(keep), new_h, new_w))
    if all(ignore):  # also true for no boxes at all
        counts["images without objects"] += 1
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    return chw, {"height": new_h, "width": new_w, "boxes": boxes, "labels": labels, "ignore": ignore,
                 "masks": rles}


@dataclass
class ImageCache:
    """Decoded images of one source at one size: a flat uint8 memmap plus records (see ``build_cache``)."""

    folder: Path
    class_names: list[str]
    records: list[CacheRecord]
    skipped: dict[str, int]
    notes: dict[str, int]
    _images: np.ndarray | None = None

    def image(self, i: int) -> np.ndarray:
        """(3, H, W) uint8 of record ``i`` (a view of the memmap)."""
        if self._images is None:
            self._images = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r")
        r = self.records[i]
        return self._images[r.offset:r.offset + 3 * r.height * r.width].reshape(3, r.height, r.width)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmap themselves
        return {**self.__dict__, "_images": None}


def build_cache(source: Source, min_size: int, max_size: int, masks: bool,
                root: Path | None = None) -> ImageCache:
    """Decode every image of ``source`` once, shrunk with ``stored_scale``, into ``<cache>/detect/<name>-<hash>/``
    (``images.u8`` and ``index.json``, written to a temporary folder and renamed, so a killed build leaves no
    half cache). A later call with unchanged files and settings reads the index only."""
    key = _fingerprint(source, min_size, max_size, masks)
    base = root or cache_dir("detect")
    folder = base / f"{source.name}-{key}"
    index_path = folder / "index.json"
    if index_path.is_file():
        doc = json.loads(index_path.read_text())
        return ImageCache(folder, doc["class_names"], [CacheRecord(**r) for r in doc["records"]], doc["skipped"],
                          doc["notes"])
    counts: Counter = Counter(source.skipped)
    records: list[CacheRecord] = []
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=base))
    try:
        offset = 0
        with open(tmp / "images.u8", "wb") as fh:
            for img in source.images:
                try:
                    chw, fields = _prepare_one(img, min_size, max_size, masks, counts)
                except DataNotFoundError as exc:
                    if img.path.is_file():  # a missing mask file is an error, not a skip
                        raise
                    counts["image file missing"] += 1  # an annotation whose image is missing
                    log.warning("skip: %s", exc)
                    continue
                except UnreadableImageError as exc:
                    counts["unreadable image"] += 1
                    log.warning("skip: %s", exc)
                    continue
                fh.write(chw.tobytes())
                records.append(CacheRecord(key=img.key, file=str(img.path), split=img.split, offset=offset, **fields))
                offset += chw.size
            fh.flush()
            os.fsync(fh.fileno())
        if not records:
            raise DetectionDataError(f"{source.name}: not one readable image among {len(source.images)} annotated")
        skip_reasons = {k: v for k, v in counts.items() if k not in ("clipped", "images without objects")}
        notes = {"boxes clipped to their image": counts["clipped"],
                 "images without objects (kept as negatives)": counts["images without objects"]}
        doc = {"version": CACHE_VERSION, "key": key, "class_names": source.class_names, "skipped": skip_reasons,
               "notes": notes, "records": [r.__dict__ for r in records]}
        (tmp / "index.json").write_text(json.dumps(doc))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return build_cache(source, min_size, max_size, masks, root)


# ---------------------------------------------------------------- splits and the torch dataset


def split_indices(cache: ImageCache, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Record indices of train / val / test (see the module docstring). The seeded permutation runs over the
    sorted keys of every source image that made it into the cache."""
    order = sorted(range(len(cache.records)), key=lambda i: cache.records[i].key)
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    if any(cache.records[i].split for i in order):
        test = [i for i in order if cache.records[i].split == "test"]
        rest = [i for i in order if cache.records[i].split != "test"]
    else:
        n_test = int(round(len(order) * test_fraction))
        test, rest = order[:n_test], order[n_test:]
    n_val = int(round(len(rest) * val_fraction))
    return {"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": sorted(test)}


class DetectionDataset(Dataset):
    """Images and targets of some cache records. Item ``i``: a dict with ``image`` (3, H, W) uint8, ``boxes``
    (N, 4) float32 x1 y1 x2 y2, ``labels`` (N,) int64 in 1..K, ``ignore`` (N,) bool, ``masks`` (N, H, W) uint8 when
    the cache has them, and ``image_id`` (int). ``drop_ignored`` (training) leaves ignored boxes out."""

    def __init__(self, cache: ImageCache, indices: Sequence[int], drop_ignored: bool = False) -> None:
        self.cache, self.indices, self.drop_ignored = cache, list(indices), drop_ignored

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        r = self.cache.records[j]
        boxes = torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(r.labels, dtype=torch.int64)
        ignore = torch.tensor(r.ignore, dtype=torch.bool)
        item = {"image": torch.from_numpy(np.array(self.cache.image(j))), "boxes": boxes, "labels": labels,
                "ignore": ignore, "image_id": j}
        if r.masks is not None:
            item["masks"] = torch.from_numpy(decode_masks(r.masks, r.height, r.width))
        if self.drop_ignored and bool(ignore.any()):
            keep = ~ignore
            for k in ("boxes", "labels", "ignore", "masks"):
                if k in item:
                    item[k] = item[k][keep]
        return item


def collate_detection(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch is the list of its samples: images differ in size, and the engine's ``to_device`` and
    ``batch_size_of`` handle a list of dicts (the batch size is the list's length)."""
    return list(samples)


def hflip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample mirrored left-right: image and masks flipped along W, boxes x -> W - x (x1 and x2 swap)."""
    width = sample["image"].shape[-1]
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    boxes = sample["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - sample["boxes"][:, 2], width - sample["boxes"][:, 0]
    out["boxes"] = boxes
    if "masks" in sample:
        out["masks"] = sample["masks"].flip(-1)
    return out
