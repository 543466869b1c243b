"""Stochastic depth (Huang et al. 2016): drop a residual branch for whole examples while training."""
from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero ``x`` for a random fraction ``p`` of the examples in the batch (axis 0) and scale the others by
    ``1 / (1 - p)``, so the expectation is unchanged; ``x`` itself when not training or ``p == 0``. Same shape."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """``drop_path`` as a module (an identity in eval mode): (B, ...) -> (B, ...). ``p`` in [0, 1)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Per-block rates growing linearly from 0 (first block) to ``rate`` (last), as Huang et al. and timm do."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    if num_blocks <= 1:
        return [rate] * num_blocks
    return [rate * i / (num_blocks - 1) for i in range(num_blocks)]
