"""Classification head: global pooling, dropout and a linear layer, one logit vector per input."""
from __future__ import annotations

import torch
from torch import nn

from cnnapps.layers import adaptive_avgpool_cls, adaptive_maxpool_cls, check_dim

_POOLS = ("avg", "max", "")


class ClassifierHead(nn.Module):
    """Global pool -> flatten -> dropout -> linear: (B, in_chs, *L) -> (B, num_classes).

    ``pool``: ``"avg"``, ``"max"`` or ``""`` (no pooling: the input must already be (B, in_chs)).
    ``num_classes=0`` replaces the linear layer by an identity, so the output is the pooled (B, in_chs).
    """

    def __init__(self, in_chs: int, num_classes: int, dim: int = 2, pool: str = "avg", drop: float = 0.0) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        if in_chs <= 0:
            raise ValueError(f"in_chs must be positive, got {in_chs}")
        self.in_chs, self.dim = in_chs, check_dim(dim)
        if pool == "avg":
            self.pool: nn.Module = adaptive_avgpool_cls(dim)(1)
        elif pool == "max":
            self.pool = adaptive_maxpool_cls(dim)(1)
        else:
            self.pool = nn.Identity()
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop)
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """Replace the linear layer by a fresh one with ``num_classes`` outputs (0: identity)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.in_chs, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, in_chs, *L) -> (B, num_classes), or the pooled (B, in_chs) when ``pre_logits``."""
        x = self.drop(self.flatten(self.pool(x)))
        return x if pre_logits else self.fc(x)
