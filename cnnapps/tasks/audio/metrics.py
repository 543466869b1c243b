"""Audio metrics: the shared classification metrics plus a few example clips kept for the report's plot."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cnnapps.metrics.classification import ClassificationMetrics


class AudioMetrics(ClassificationMetrics):
    """``update(logits (batch, classes), batch)`` with ``batch = {"wave": (batch, samples), "y": (batch,),
    "file": [str]}``.

    ``compute()``: ``accuracy``, ``macro_f1`` and per class ``f1_<c>`` (with precision and recall), from
    scikit-learn. ``artifacts()``: the confusion matrix (rows true, columns predicted), class names, and up to
    ``n_examples`` example clips for plotting: misclassified ones first (up to half), then one per class."""

    def __init__(self, class_names: Sequence[str], n_examples: int = 8) -> None:
        self.n_examples = n_examples
        super().__init__(class_names)

    def reset(self) -> None:
        super().reset()
        self._wrong: list[dict[str, Any]] = []
        self._per_class: dict[int, dict[str, Any]] = {}

    def update(self, output: torch.Tensor, batch: Any) -> None:
        super().update(output, batch)
        if self.n_examples <= 0 or not isinstance(batch, dict) or "wave" not in batch:
            return
        if len(self._wrong) >= self.n_examples // 2 and len(self._per_class) == len(self.class_names):
            return  # nothing left to collect: skip the copies
        prob = output.float().softmax(1)
        p, pred = prob.max(1)
        target = batch["y"]
        for i in range(target.shape[0]):
            t, k = int(target[i]), int(pred[i])
            if k != t and len(self._wrong) < self.n_examples // 2:
                self._wrong.append(self._example(batch, i, t, k, float(p[i])))
            elif t not in self._per_class:
                self._per_class[t] = self._example(batch, i, t, k, float(p[i]))

    def _example(self, batch: dict, i: int, true: int, pred: int, prob: float) -> dict[str, Any]:
        files = batch.get("file")
        return {"wave": batch["wave"][i].detach().float().cpu().numpy(), "true": self.class_names[true],
                "pred": self.class_names[pred], "prob": prob, "file": str(files[i]) if files is not None else ""}

    def artifacts(self) -> dict[str, Any]:
        art = super().artifacts()
        examples = self._wrong + [self._per_class[c] for c in sorted(self._per_class)]
        art["examples"] = examples[: self.n_examples]
        return art
