"""Heads that turn backbone features into task outputs; they read channel counts from ``feature_info``."""
from cnnapps.heads.classifier import ClassifierHead
from cnnapps.heads.sequence import SequenceHead

__all__ = ["ClassifierHead", "SequenceHead"]
