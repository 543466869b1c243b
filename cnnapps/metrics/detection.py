"""COCO-style detection metrics (AP, AP50, AP75, per-class AP; mask AP for instances) computed with pycocotools."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cnnapps.metrics.base import Metric

# COCOeval.stats positions (summarize() order) and the names we report them under.
_STAT_NAMES = {0: "ap", 1: "ap50", 2: "ap75", 3: "aps", 4: "apm", 5: "apl", 8: "ar100"}


@dataclass
class ImageTruth:
    """Ground truth of one image: ``boxes`` (N, 4) continuous x1 y1 x2 y2, ``labels`` (N,) in 1..K, ``ignore``
    (N,) bool (difficult / crowd: neither matched nor missed), ``masks`` N COCO RLEs or None."""

    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    masks: list[dict] | None = None


@dataclass
class ImageDetections:
    """Detections of one image: ``boxes`` (M, 4) x1 y1 x2 y2, ``scores`` (M,), ``labels`` (M,) in 1..K, ``masks``
    M COCO RLEs (binary masks) or None."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: list[dict] | None = None


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _quiet_coco(dataset: dict) -> COCO:
    """A COCO object built in memory (no file), without pycocotools' "creating index..." prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_pair(truths: Sequence[ImageTruth], detections: Sequence[ImageDetections], num_classes: int,
               iou_type: str) -> tuple[COCO, COCO]:
    images = [{"id": i, "height": t.height, "width": t.width} for i, t in enumerate(truths)]
    cats = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    gts, dts = [], []
    for i, t in enumerate(truths):
        for j, (box, label, ign) in enumerate(zip(_xywh(t.boxes), t.labels, t.ignore)):
            ann = {"id": len(gts) + 1, "image_id": i, "category_id": int(label), "bbox": box.tolist(),
                   "iscrowd": int(bool(ign)), "area": float(box[2] * box[3])}
            if iou_type == "segm":
                ann["segmentation"] = t.masks[j]
                ann["area"] = float(mask_utils.area(t.masks[j]))
            gts.append(ann)
    for i, d in enumerate(detections):
        for j, (box, score, label) in enumerate(zip(_xywh(d.boxes), d.scores, d.labels)):
            ann = {"id": len(dts) + 1, "image_id": i, "category_id": int(label), "bbox": box.tolist(),
                   "score": float(score), "iscrowd": 0, "area": float(box[2] * box[3])}
            if iou_type == "segm":
                ann["segmentation"] = d.masks[j]
                ann["area"] = float(mask_utils.area(d.masks[j]))
            dts.append(ann)
    gt = _quiet_coco({"images": images, "categories": cats, "annotations": gts})
    dt = _quiet_coco({"images": images, "categories": cats, "annotations": dts})
    return gt, dt


@dataclass
class CocoResult:
    """``values``: flat metrics (see ``coco_evaluate``); ``precision``: (T=10 IoU thresholds .50:.05:.95,
    R=101 recall points, K classes) interpolated precision at area "all", 100 detections (-1: undefined)."""

    values: dict[str, float]
    precision: np.ndarray = field(repr=False)


def coco_evaluate(truths: Sequence[ImageTruth], detections: Sequence[ImageDetections],
                  class_names: Sequence[str], iou_type: str = "bbox", prefix: str = "") -> CocoResult:
    """COCO evaluation of ``detections`` against ``truths`` (same length, image by image).

    Returns ``{prefix}ap`` (AP averaged over IoU .50:.95, 101-point interpolation), ``ap50``, ``ap75``, ``aps``,
    ``apm``, ``apl`` (areas < 32^2, < 96^2, larger, in stored pixels), ``ar100``, and per class with ground truth
    ``ap_<class>`` and ``ap_50_<class>``. A value COCO leaves undefined (-1: no ground truth in that range) is
    omitted, except ``ap``, ``ap50``, ``ap75``, which read 0.0 then so a monitor always has a number.
    ``iou_type``: "bbox" or "segm" (masks as RLEs in both inputs)."""
    if len(truths) != len(detections):
        raise ValueError(f"{len(truths)} images of ground truth but {len(detections)} of detections")
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    k = len(class_names)
    gt, dt = _coco_pair(truths, detections, k, iou_type)
    ev = COCOeval(gt, dt, iou_type)
    ev.params.imgIds = list(range(len(truths)))
    ev.params.catIds = list(range(1, k + 1))
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    values: dict[str, float] = {}
    for pos, name in _STAT_NAMES.items():
        v = float(ev.stats[pos])
        if v >= 0 or name in ("ap", "ap50", "ap75"):
            values[prefix + name] = max(v, 0.0)
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area "all", maxDets 100
    for c, name in enumerate(class_names):
        p = precision[:, :, c]
        if (p > -1).any():
            values[f"{prefix}ap_{name}"] = float(p[p > -1].mean())
            values[f"{prefix}ap_50_{name}"] = float(p[0][p[0] > -1].mean())
    return CocoResult(values, precision)


def masks_to_rles(masks: torch.Tensor | np.ndarray, threshold: float = 0.5) -> list[dict]:
    """(N, H, W) or (N, 1, H, W) mask probabilities / binary masks -> N COCO RLEs of ``mask > threshold``
    (``mask >= 1`` counts for uint8 0/1 masks)."""
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if m.ndim == 4:
        m = m[:, 0]
    if m.dtype == np.uint8 or m.dtype == bool:
        binary = m.astype(np.uint8)
    else:
        binary = (m > threshold).astype(np.uint8)
    if len(binary) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class DetectionMetrics(Metric):
    """Accumulates detections (torchvision's output: a list of dicts with ``boxes``, ``scores``, ``labels`` and,
    for Mask R-CNN, ``masks`` (M, 1, H, W)) against a batch (a list of sample dicts with ``image`` (3, H, W),
    ``boxes``, ``labels``, ``ignore`` and, with ``masks=True``, ``masks`` (N, H, W)). ``compute`` runs pycocotools
    (see ``coco_evaluate``); with ``masks`` the mask metrics follow as ``mask_ap``, ``mask_ap50``, ...
    It also reports ``images``, ``gt_boxes`` (not ignored) and ``detections``."""

    def __init__(self, class_names: Sequence[str], masks: bool = False, mask_threshold: float = 0.5) -> None:
        self.class_names = list(class_names)
        self.masks = masks
        self.mask_threshold = mask_threshold
        self.reset()

    def reset(self) -> None:
        self.truths: list[ImageTruth] = []
        self.detections: list[ImageDetections] = []
        self._last: dict[str, CocoResult] = {}

    def update(self, output: Sequence[dict[str, Any]], batch: Sequence[dict[str, Any]]) -> None:
        if len(output) != len(batch):
            raise ValueError(f"{len(output)} detection results for a batch of {len(batch)} images")
        for det, sample in zip(output, batch):
            h, w = sample["image"].shape[-2:]
            self.truths.append(ImageTruth(
                int(h), int(w), _np(sample["boxes"]).reshape(-1, 4), _np(sample["labels"]).reshape(-1),
                _np(sample["ignore"]).reshape(-1).astype(bool),
                masks_to_rles(sample["masks"]) if self.masks else None))
            self.detections.append(ImageDetections(
                _np(det["boxes"]).reshape(-1, 4), _np(det["scores"]).reshape(-1), _np(det["labels"]).reshape(-1),
                masks_to_rles(det["masks"], self.mask_threshold) if self.masks else None))

    def compute(self) -> dict[str, float]:
        box = coco_evaluate(self.truths, self.detections, self.class_names, "bbox")
        self._last = {"bbox": box}
        values = dict(box.values)
        if self.masks:
            segm = coco_evaluate(self.truths, self.detections, self.class_names, "segm", prefix="mask_")
            self._last["segm"] = segm
            values.update(segm.values)
        values["images"] = len(self.truths)
        values["gt_boxes"] = int(sum((~t.ignore).sum() for t in self.truths))
        values["detections"] = int(sum(len(d.scores) for d in self.detections))
        return values

    def artifacts(self) -> dict[str, Any]:
        """``precision`` (T, R, K) of the last ``compute`` (box AP), ``mask_precision`` too with masks, and
        ``class_names``."""
        if not self._last:
            self.compute()
        out: dict[str, Any] = {"precision": self._last["bbox"].precision, "class_names": self.class_names}
        if "segm" in self._last:
            out["mask_precision"] = self._last["segm"].precision
        return out
