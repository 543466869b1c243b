"""Single-label classification metrics: accuracy, top-k, per-class precision/recall/F1, confusion matrix."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from cnnapps.metrics.base import Metric


class ClassificationMetrics(Metric):
    """``update(logits (batch, classes), batch)`` where the batch is ``(inputs, targets)`` or has ``"y"``.

    ``compute()`` gives ``accuracy``, ``top5`` (when there are more than 5 classes), ``macro_f1`` and
    ``precision_<c>``, ``recall_<c>``, ``f1_<c>`` per class name; ``artifacts()`` the confusion matrix.
    """

    def __init__(self, class_names: Sequence[str], topk: int = 5) -> None:
        self.class_names = [str(c) for c in class_names]
        self.topk = topk if len(self.class_names) > topk else 0
        self.reset()

    def reset(self) -> None:
        self._pred: list[np.ndarray] = []
        self._true: list[np.ndarray] = []
        self._topk_hits = 0

    @staticmethod
    def targets_of(batch: Any) -> torch.Tensor:
        return batch["y"] if isinstance(batch, dict) else batch[1]

    def update(self, output: torch.Tensor, batch: Any) -> None:
        target = self.targets_of(batch)
        self._pred.append(output.argmax(1).cpu().numpy())
        self._true.append(target.cpu().numpy())
        if self.topk:
            top = output.topk(self.topk, dim=1).indices
            self._topk_hits += int((top == target[:, None]).any(1).sum())

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._true:
            return np.zeros(0, int), np.zeros(0, int)
        return np.concatenate(self._true), np.concatenate(self._pred)

    def compute(self) -> dict[str, float]:
        y, p = self._arrays()
        if len(y) == 0:
            return {"accuracy": float("nan")}
        labels = list(range(len(self.class_names)))
        prec, rec, f1, _ = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
        out = {"accuracy": float((y == p).mean()), "macro_f1": float(f1.mean()), "examples": len(y)}
        if self.topk:
            out[f"top{self.topk}"] = self._topk_hits / len(y)
        for name, pr, rc, f in zip(self.class_names, prec, rec, f1):
            out.update({f"precision_{name}": float(pr), f"recall_{name}": float(rc), f"f1_{name}": float(f)})
        return out

    def artifacts(self) -> dict[str, Any]:
        y, p = self._arrays()
        labels = list(range(len(self.class_names)))
        return {"confusion": confusion_matrix(y, p, labels=labels), "class_names": self.class_names}
