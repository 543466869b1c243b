"""The metric protocol every task's metrics follow."""
from __future__ import annotations

from typing import Any


class Metric:
    """Accumulates over batches. ``compute()`` returns a flat ``{name: float}`` dict (JSON-ready).

    Subclasses may also implement ``artifacts() -> dict`` (arrays such as a confusion matrix) that a task's
    ``report`` turns into plots, and ``state()`` / ``merge(state)`` so distributed evaluation can gather.
    """

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, output: Any, batch: Any) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def artifacts(self) -> dict[str, Any]:
        return {}


PER_CLASS_PREFIXES = ("precision_", "recall_", "f1_", "se_", "ppv_", "ap_", "iou_")


def headline(values: dict[str, float], limit: int = 16) -> dict[str, float]:
    """The values worth printing: all of them when few, else those that are not per-class."""
    if len(values) <= limit:
        return values
    return {k: v for k, v in values.items() if not k.split("val_", 1)[-1].startswith(PER_CLASS_PREFIXES)}
