"""Classification head: global pooling, dropout and a linear layer, one logit vector per input."""
from __future__ import annotations

import torch
from torch import nn

from cnnapps.layers import GLOBAL_POOLS, SelectAdaptivePool, check_dim


class ClassifierHead(nn.Module):
    """Global pool -> flatten -> dropout -> linear: (B, in_chs, *L) -> (B, num_classes).

    ``pool``: ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"`` (the linear layer then sees 2 * in_chs) or
    ``""`` (no pooling: the input must already be (B, in_chs)). ``num_classes=0`` replaces the linear layer by
    an identity, so the output is the pooled (B, in_chs) (or (B, 2 * in_chs) for ``catavgmax``).
    """

    def __init__(self, in_chs: int, num_classes: int, dim: int = 2, pool: str = "avg", drop: float = 0.0) -> None:
        super().__init__()
        if pool not in GLOBAL_POOLS:
            raise ValueError(f"pool must be one of {GLOBAL_POOLS}, got {pool!r}")
        if in_chs <= 0:
            raise ValueError(f"in_chs must be positive, got {in_chs}")
        self.dim = check_dim(dim)
        self.pool = SelectAdaptivePool(pool, dim)
        self.in_chs = in_chs
        self.num_features = in_chs * self.pool.feat_mult()  # what the linear layer sees
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop)
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """Replace the linear layer by a fresh one with ``num_classes`` outputs (0: identity)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, in_chs, *L) -> (B, num_classes), or the pooled (B, num_features) when ``pre_logits``."""
        x = self.drop(self.flatten(self.pool(x)))
        return x if pre_logits else self.fc(x)
