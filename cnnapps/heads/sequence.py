"""Per-time-step head: a 1x1 convolution giving one logit vector per output position of a 1D backbone."""
from __future__ import annotations

import torch
from torch import nn

from cnnapps.layers import check_dim, create_conv


class SequenceHead(nn.Module):
    """Per-position logits by a 1x1 convolution: (B, in_chs, T') -> (B, num_classes, T') for ``dim=1``
    (or (B, in_chs, H, W) -> (B, num_classes, H, W) for ``dim=2``).

    Hannun et al. (2019) predict one rhythm label per 256 input samples this way (their TimeDistributed
    Dense is a 1x1 convolution over time).
    """

    def __init__(self, in_chs: int, num_classes: int, dim: int = 1, drop: float = 0.0) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"SequenceHead needs num_classes > 0, got {num_classes}")
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop)
        self.conv = create_conv(check_dim(dim), in_chs, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chs, T') -> logits (B, num_classes, T')."""
        return self.conv(self.drop(x))
