"""Semantic-segmentation metrics from a pixel confusion matrix: per-class IoU and Dice, mIoU, pixel accuracy."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cnnapps.metrics.base import Metric

IGNORE_INDEX = 255


def confusion_from_labels(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted, over pixels whose target is not
    ``ignore_index``. ``pred`` and ``target`` are integer tensors of one shape, e.g. (B, H, W)."""
    target = target.long().reshape(-1)
    pred = pred.long().reshape(-1)
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and int(target.max()) >= num_classes:
        raise ValueError(f"target label {int(target.max())} outside 0..{num_classes - 1} (and not {ignore_index})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-class IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN) (NaN for a class absent from both
    truth and prediction), and pixel accuracy, from a (K, K) confusion (rows true, columns predicted)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = conf.sum()
    return {"iou": iou, "dice": dice, "pixel_accuracy": float(tp.sum() / total) if total else float("nan")}


class SegmentationMetrics(Metric):
    """``update(logits (B, K, H, W), batch)`` with ``batch["mask"]`` (B, H, W) class ids (``ignore_index``:
    not scored). Pixels of the whole split add into one confusion matrix, so IoU is the data set's, not a mean
    of per-image IoUs.

    ``compute()``: ``iou_<class>``, ``dice_<class>``, ``mIoU`` and ``mDice`` (means over classes present in
    truth or prediction), ``pixel_accuracy``, ``images`` and ``images_without_objects`` (images whose mask is all
    background). ``artifacts()``: the confusion matrix and the first ``keep_examples`` images with their truth
    and prediction, for a report picture.
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX, keep_examples: int = 4) -> None:
        self.class_names = [str(c) for c in class_names]
        self.ignore_index = ignore_index
        self.keep_examples = keep_examples
        self.reset()

    def reset(self) -> None:
        k = len(self.class_names)
        self._conf = torch.zeros(k, k, dtype=torch.int64)
        self._images = 0
        self._empty = 0
        self._examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, output: torch.Tensor, batch: Any) -> None:
        logits = output["logits"] if isinstance(output, dict) else output
        target = batch["mask"].long()
        pred = logits.argmax(1)
        self._conf += confusion_from_labels(pred, target, len(self.class_names), self.ignore_index).cpu()
        fg = ((target > 0) & (target != self.ignore_index)).flatten(1).any(1)
        self._images += int(target.shape[0])
        self._empty += int((~fg).sum())
        images = batch.get("x")
        for i in range(min(target.shape[0], self.keep_examples - len(self._examples))):
            img = images[i].permute(1, 2, 0).cpu().numpy() if images is not None else None
            self._examples.append((img, target[i].cpu().numpy(), pred[i].cpu().numpy()))

    def compute(self) -> dict[str, float]:
        s = scores_from_confusion(self._conf.numpy())
        iou, dice = s["iou"], s["dice"]
        out = {"mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
               "mDice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
               "pixel_accuracy": s["pixel_accuracy"], "images": self._images,
               "images_without_objects": self._empty}
        for name, i, d in zip(self.class_names, iou, dice):
            out[f"iou_{name}"] = float(i)
            out[f"dice_{name}"] = float(d)
        return out

    def artifacts(self) -> dict[str, Any]:
        return {"confusion": self._conf.numpy().copy(), "class_names": self.class_names,
                "examples": list(self._examples)}
