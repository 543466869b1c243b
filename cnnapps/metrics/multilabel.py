"""Multi-label metrics: per-class average precision and mAP (scikit-learn), F1 at per-class thresholds chosen on
validation examples to maximise each class's F1."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve

from cnnapps.metrics.base import Metric

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


def best_f1_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                       default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per-class probability thresholds maximising F1 on the given examples.

    ``probs``, ``targets`` (0/1) and ``mask`` (1 = counts, 0 = ignored, e.g. a difficult-only label) are
    (N, C); returns (C,). A class without a positive (or without any counted example) keeps ``default``.
    Predicting "positive" means ``prob >= threshold``.
    """
    n_classes = probs.shape[1]
    out = np.full(n_classes, default, dtype=np.float64)
    for c in range(n_classes):
        keep = mask[:, c] > 0
        y, p = targets[keep, c], probs[keep, c]
        if y.sum() == 0:
            continue
        precision, recall, thresholds = precision_recall_curve(y, p)
        # the last (precision, recall) pair has no threshold (it is recall 0 by convention)
        f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
        out[c] = float(thresholds[int(np.argmax(f1))])
    return out


def masked_average_precision(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-class AP (scikit-learn ``average_precision_score``) over the counted examples: (C,); NaN for a class
    with no positive among them (AP is undefined there)."""
    ap = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        keep = mask[:, c] > 0
        if targets[keep, c].sum() > 0:
            ap[c] = average_precision_score(targets[keep, c], probs[keep, c])
    return ap


def f1_at_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                     thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(micro F1, macro F1, per-class F1 (C,)) of ``probs >= thresholds`` over counted entries. Macro averages
    the classes that have a positive among the counted examples."""
    pred = (probs >= thresholds[None, :]).astype(np.int64)
    keep = mask > 0
    micro = f1_score(targets[keep].astype(np.int64), pred[keep], zero_division=0)
    per_class = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        k = keep[:, c]
        if targets[k, c].sum() > 0:
            per_class[c] = f1_score(targets[k, c].astype(np.int64), pred[k, c], zero_division=0)
    macro = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return float(micro), macro, per_class


class MultiLabelMetrics(Metric):
    """mAP, per-class AP, micro/macro F1 at per-class thresholds.

    ``update(logits (B, C), batch)`` with ``batch`` a dict holding ``"y"`` (B, C) 0/1 targets, optionally
    ``"mask"`` (B, C) (0 = ignore this label: VOC's difficult-only labels) and ``"calib"`` (B,) bool.

    Thresholds: rows flagged ``calib`` (validation images) are where thresholds are chosen. When a pass has
    calibration rows, ``compute`` picks the F1-maximising threshold per class on them (``calibrated`` holds them
    afterwards, for the model to keep) and scores the other rows with them, or the calibration rows themselves
    when the pass has no other rows (a validation pass: its F1 is optimistic by construction). A pass without
    calibration rows uses the thresholds that came with the outputs (``output["thresholds"]``, the model's own),
    else 0.5.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = [str(c) for c in class_names]
        self.calibrated: np.ndarray | None = None
        self.reset()

    def reset(self) -> None:
        self._probs: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._calib: list[np.ndarray] = []
        self._given: np.ndarray | None = None

    def update(self, output: torch.Tensor | dict[str, torch.Tensor], batch: Any) -> None:
        logits = output["logits"] if isinstance(output, dict) else output
        if isinstance(output, dict) and output.get("thresholds") is not None:
            self._given = output["thresholds"].cpu().numpy().astype(np.float64)
        y = batch["y"]
        self._probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        self._y.append(y.cpu().numpy().astype(np.float64))
        mask = batch.get("mask")
        self._mask.append(np.ones_like(self._y[-1]) if mask is None else mask.cpu().numpy())
        calib = batch.get("calib")
        self._calib.append(np.zeros(len(y), bool) if calib is None else calib.cpu().numpy().astype(bool))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        if not self._probs:
            c = len(self.class_names)
            return np.zeros((0, c)), np.zeros((0, c)), np.zeros((0, c)), np.zeros(0, bool)
        return (np.concatenate(self._probs), np.concatenate(self._y), np.concatenate(self._mask),
                np.concatenate(self._calib))

    def thresholds(self) -> np.ndarray:
        """The thresholds this pass scores with (C,): calibrated on its calibration rows, else the model's."""
        if self._has_calib():
            return self.calibrated
        if self._given is not None:
            return self._given
        return np.full(len(self.class_names), DEFAULT_THRESHOLD)

    def _has_calib(self) -> bool:
        return any(c.any() for c in self._calib)

    def _evaluated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Choose thresholds if this pass has calibration rows; return the (probs, targets, mask) to score."""
        probs, y, mask, calib = self._arrays()
        if calib.any():
            self.calibrated = best_f1_thresholds(probs[calib], y[calib], mask[calib])
            if (~calib).any():
                return probs[~calib], y[~calib], mask[~calib]
        return probs, y, mask

    def compute(self) -> dict[str, float]:
        probs, y, mask = self._evaluated()
        if len(y) == 0:
            return {"mAP": float("nan")}
        ap = masked_average_precision(probs, y, mask)
        th = self.thresholds()
        micro, macro, f1 = f1_at_thresholds(probs, y, mask, th)
        counted = np.where(mask > 0, y, 0)
        present = counted.sum(0) > 0
        out = {"mAP": float(np.nanmean(ap)) if present.any() else float("nan"),
               "micro_f1": micro, "macro_f1": macro,
               # any constant score per class (e.g. its training frequency) has AP = the class's prevalence
               "constant_predictor_mAP": float(np.mean((counted.sum(0) / np.maximum((mask > 0).sum(0), 1))[present]))
               if present.any() else float("nan"),
               "examples": len(y), "classes_scored": int(present.sum())}
        # thresholds stay out of the values (they live in state and in the report's thresholds.json)
        for name, a, f in zip(self.class_names, ap, f1):
            out[f"ap_{name}"] = float(a)
            out[f"f1_{name}"] = float(f)
        return out

    def artifacts(self) -> dict[str, Any]:
        probs, y, mask = self._evaluated()
        return {"probs": probs, "targets": y, "mask": mask, "thresholds": self.thresholds(),
                "class_names": self.class_names}
