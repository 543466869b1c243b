"""Audio metrics: the shared classification metrics plus one example clip per class kept for the report's plot."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnapps.metrics.classification import ClassificationMetrics

# FSDD names the speaker in the file name ({digit}_{speaker}_{index}.wav); other data: the file's folder.
_FSDD = re.compile(r"^\d_(?P<speaker>[A-Za-z]+)_\d+\.wav$", re.IGNORECASE)


def speaker_of(file: str) -> str:
    """The speaker (FSDD) or the parent folder's name of a clip's file, for choosing varied examples."""
    m = _FSDD.match(Path(file).name)
    return m["speaker"].lower() if m else Path(file).parent.name


class AudioMetrics(ClassificationMetrics):
    """``update(logits (batch, classes), batch)`` with ``batch = {"wave": (batch, samples), "y": (batch,),
    "file": [str]}``.

    ``compute()``: ``accuracy``, ``macro_f1`` and per class ``f1_<c>`` (with precision and recall), from
    scikit-learn. ``artifacts()``: the confusion matrix (rows true, columns predicted), class names, and one
    example clip per true class (up to ``n_examples`` classes), whatever the model predicted for it: the first
    clip of each (class, speaker) is kept, and class i shows the i-th speaker in turn, so the picture shows
    several voices rather than the first speaker's clips."""

    def __init__(self, class_names: Sequence[str], n_examples: int = 10) -> None:
        self.n_examples = n_examples
        super().__init__(class_names)

    def reset(self) -> None:
        super().reset()
        self._kept: dict[tuple[int, str], dict[str, Any]] = {}

    def update(self, output: torch.Tensor, batch: Any) -> None:
        super().update(output, batch)
        if self.n_examples <= 0 or not isinstance(batch, dict) or "wave" not in batch:
            return
        prob = output.float().softmax(1)
        p, pred = prob.max(1)
        target = batch["y"]
        files = batch.get("file")
        for i in range(target.shape[0]):
            t = int(target[i])
            if t >= self.n_examples:
                continue
            key = (t, speaker_of(str(files[i])) if files is not None else "")
            if key not in self._kept:
                self._kept[key] = self._example(batch, i, t, int(pred[i]), float(p[i]))

    def _example(self, batch: dict, i: int, true: int, pred: int, prob: float) -> dict[str, Any]:
        files = batch.get("file")
        return {"wave": batch["wave"][i].detach().float().cpu().numpy(), "true": self.class_names[true],
                "pred": self.class_names[pred], "prob": prob, "file": str(files[i]) if files is not None else ""}

    def artifacts(self) -> dict[str, Any]:
        art = super().artifacts()
        speakers = sorted({s for _, s in self._kept})
        examples = []
        for c in sorted({c for c, _ in self._kept}):
            have = [s for s in speakers if (c, s) in self._kept]
            want = speakers[c % len(speakers)]
            examples.append(self._kept[(c, want if want in have else have[c % len(have)])])
        art["examples"] = examples[: self.n_examples]
        return art
