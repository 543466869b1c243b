"""Multi-label network (any 2D backbone, pooled features, one logit per class) and its masked losses."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

LOSSES = ("bce", "focal", "asl")


class MultiLabelNet(nn.Module):
    """``backbone`` (a zoo network built with ``num_classes=0``: forward gives pooled (B, F) features), dropout and
    a linear layer: normalised images (B, 3, H, W) -> logits (B, C).

    The zoo network sits at ``.backbone`` so its tensors are named ``backbone.layer1...``: a segmentation or
    detection model holding the same family at ``.backbone`` loads them by name (transfer learning).
    ``label_freq`` (C,) from the training labels sets the initial bias to their log-odds, so an untrained net
    starts as the label-frequency predictor instead of at p = 0.5 for every class. ``thresholds`` (C,), a buffer
    saved with the weights, are the per-class decision thresholds: 0.5 until a validation pass calibrates them
    (the task's CalibrateThresholds callback), so every checkpoint carries the thresholds of its own epoch.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 drop: float = 0.0, label_freq: Sequence[float] | None = None,
                 pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        num_features = getattr(backbone, "num_features", 0)
        if num_features <= 0:
            raise ValueError(f"{type(backbone).__name__} reports no num_features; build it with num_classes=0")
        self.head = nn.Sequential()
        self.head.add_module("drop", nn.Dropout(drop))
        self.head.add_module("fc", nn.Linear(num_features, num_classes))
        if label_freq is not None:
            p = torch.as_tensor(label_freq, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
            with torch.no_grad():
                self.head.fc.bias.copy_(torch.log(p / (1 - p)))
        # preprocessing and loss constants come from the data state, not from the weights: not saved
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        pw = torch.as_tensor(pos_weight if pos_weight is not None else [1.0] * num_classes, dtype=torch.float32)
        self.register_buffer("pos_weight", pw, persistent=False)
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) (or float in [0, 1]) -> float (B, 3, H, W) normalised with the training mean/std."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> logits (B, C)."""
        feats = self.backbone(x)
        if isinstance(feats, (tuple, list)):  # GoogLeNet returns (main, aux...) in training
            feats = feats[0]
        return self.head(feats)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                    clip: float = 0.05) -> torch.Tensor:
    """Element-wise asymmetric loss (Ridnik et al., ICCV 2021), (B, C) -> (B, C): focusing ``gamma_neg`` on
    negatives, whose probability is also shifted down by ``clip`` so easy negatives count for nothing."""
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    log_1m_p_neg = torch.log((1 - p_neg).clamp(min=1e-8))
    loss_pos = targets * (1 - p).pow(gamma_pos) * log_p
    loss_neg = (1 - targets) * p_neg.pow(gamma_neg) * log_1m_p_neg
    return -(loss_pos + loss_neg)


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, kind: str = "bce",
                    pos_weight: torch.Tensor | None = None, focal_gamma: float = 2.0, focal_alpha: float = 0.25,
                    asl_gamma_neg: float = 4.0, asl_gamma_pos: float = 0.0, asl_clip: float = 0.05) -> torch.Tensor:
    """Mean loss over the counted labels: logits, targets and mask are (B, C); ``mask`` 0 drops a label (VOC's
    difficult-only classes) from both the sum and the count. ``kind``: ``bce`` (with optional per-class
    ``pos_weight`` (C,)), ``focal`` (torchvision's sigmoid focal loss) or ``asl`` (asymmetric loss)."""
    logits, targets = logits.float(), targets.float()
    if kind == "bce":
        per = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    elif kind == "focal":
        per = sigmoid_focal_loss(logits, targets, alpha=focal_alpha, gamma=focal_gamma, reduction="none")
    elif kind == "asl":
        per = asymmetric_loss(logits, targets, asl_gamma_pos, asl_gamma_neg, asl_clip)
    else:
        raise ValueError(f"unknown multi-label loss {kind!r} (choose from {', '.join(LOSSES)})")
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def balanced_pos_weight(targets: torch.Tensor, mask: torch.Tensor, max_weight: float = 10.0) -> list[float]:
    """Per-class negatives/positives among counted training labels (B, C) -> (C,), clipped to [1, max_weight]:
    BCE's ``pos_weight`` that makes a rare class's positives weigh as much as its negatives."""
    pos = (targets * mask).sum(0)
    neg = ((1 - targets) * mask).sum(0)
    w = (neg / pos.clamp_min(1.0)).clamp(1.0, max_weight)
    return [float(v) if math.isfinite(float(v)) else 1.0 for v in w]
