"""Metric objects shared by tasks: update(output, batch) per batch, compute() -> {name: float}, reset()."""
from .base import Metric
from .classification import ClassificationMetrics

__all__ = ["Metric", "ClassificationMetrics"]
