"""Global pooling chosen by name (timm's ``global_pool`` values), for 1D and 2D maps."""
from __future__ import annotations

import torch
from torch import nn

from cnnapps.layers._nd import check_dim

GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


class SelectAdaptivePool(nn.Module):
    """Global pooling over every spatial axis, flattened: (B, C, *L) -> (B, C) (``catavgmax``: (B, 2C)).

    ``pool_type``: ``avg``, ``max``, ``avgmax`` (mean of the two), ``catavgmax`` (both, concatenated on
    channels) or ``""`` (no pooling and no flattening: the map is returned as it is). Holds no parameters, so
    swapping the type never changes a state dict.
    """

    def __init__(self, pool_type: str = "avg", dim: int = 2) -> None:
        super().__init__()
        if pool_type not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {pool_type!r}")
        self.pool_type, self.dim = pool_type, check_dim(dim)

    def feat_mult(self) -> int:
        """How many times the channels the pooled vector holds (2 for ``catavgmax``)."""
        return 2 if self.pool_type == "catavgmax" else 1

    def is_identity(self) -> bool:
        return self.pool_type == ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pool_type:
            return x
        axes = tuple(range(2, x.dim()))
        if self.pool_type == "avg":
            return x.mean(axes)
        peak = x.amax(axes)
        if self.pool_type == "max":
            return peak
        mean = x.mean(axes)
        if self.pool_type == "avgmax":
            return 0.5 * (mean + peak)
        return torch.cat([mean, peak], dim=1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"
