"""Semantic-segmentation decoders (FCN and U-Net style) over the ``features_only`` stage maps of any 2D backbone;
channel counts and strides come from the backbone's ``feature_info``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.layers import ConvNormAct, create_conv

DECODERS = ("fcn", "unet")


def _stage_channels(feature_info: Any) -> list[int]:
    """Channels of every stage a features_only backbone returns (shallow to deep); ValueError if there are none."""
    chans = list(feature_info.channels())
    if not chans:
        raise ValueError("the backbone exposes no feature stages")
    return chans


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                      align_corners=False)


class FCNHead(nn.Module):
    """FCN decoder (Long, Shelhamer and Darrell, CVPR 2015), in torchvision's form for the deepest stage.

    Scores of the deepest stage come from 3x3 conv-BN-ReLU (``channels`` wide), dropout and a 1x1 conv; with
    ``skips=k`` the ``k`` stages before it add their own 1x1 scores after the deeper scores are upsampled to
    their size (k = 1: FCN-16s, k = 2: FCN-8s on a stride-32 net). The sum is upsampled bilinearly to the input.
    Input: the list of stage maps ``(B, feature_info.channels(i), H / r_i, W / r_i)``; output (B, K, H, W).
    """

    def __init__(self, feature_info: Any, num_classes: int, channels: int = 128, skips: int = 2,
                 drop: float = 0.1) -> None:
        super().__init__()
        chans = _stage_channels(feature_info)
        if not 0 <= skips < len(chans):
            raise ValueError(f"fcn skips={skips} needs 0..{len(chans) - 1} stages before the deepest")
        self.num_classes, self.skips = num_classes, skips
        self.block = ConvNormAct(chans[-1], channels, 3, norm=True)
        self.drop = nn.Dropout(drop)
        self.score = nn.Conv2d(channels, num_classes, 1)
        # zero-initialised skip scores: training starts from the plain deepest-stage FCN, as the paper's staged
        # FCN-32s -> 16s -> 8s training does
        self.skip_scores = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in chans[len(chans) - 1 - skips:-1])
        for conv in self.skip_scores:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Stage maps (shallow to deep) -> logits (B, num_classes, *out_size)."""
        scores = self.score(self.drop(self.block(features[-1])))
        skip_maps = features[len(features) - 1 - self.skips:-1]
        for feat, conv in zip(reversed(skip_maps), reversed(self.skip_scores)):
            scores = _upsample(scores, feat.shape[-2:]) + conv(feat)
        return _upsample(scores, out_size)


class UNetDecoder(nn.Module):
    """U-Net style decoder (Ronneberger, Fischer and Brox, MICCAI 2015) on a backbone's stages.

    From the deepest stage up: upsample to the next shallower stage's size, concatenate that stage's map, two 3x3
    conv-BN-ReLU. The block fused at the second-deepest stage is ``channels`` wide and each shallower block half
    as wide (at least ``min_channels``), which keeps the high-resolution blocks cheap. A 1x1 conv scores the
    shallowest block; the scores are upsampled bilinearly to the input. Input: the stage maps
    ``(B, feature_info.channels(i), H / r_i, W / r_i)``; output (B, K, H, W).
    """

    def __init__(self, feature_info: Any, num_classes: int, channels: int = 128, min_channels: int = 16,
                 drop: float = 0.0) -> None:
        super().__init__()
        chans = _stage_channels(feature_info)
        self.num_classes = num_classes
        n = len(chans)
        widths = [max(min_channels, channels >> (n - 2 - i)) for i in range(n - 1)]  # block i fuses stage i
        blocks = []
        below = chans[-1]
        for i in reversed(range(n - 1)):
            blocks.append(nn.Sequential(ConvNormAct(below + chans[i], widths[i], 3, norm=True),
                                        ConvNormAct(widths[i], widths[i], 3, norm=True)))
            below = widths[i]
        self.blocks = nn.ModuleList(blocks)  # deepest fusion first
        self.drop = nn.Dropout(drop)
        self.score = create_conv(2, below, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Stage maps (shallow to deep) -> logits (B, num_classes, *out_size)."""
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(torch.cat([_upsample(x, skip.shape[-2:]), skip], dim=1))
        return _upsample(self.score(self.drop(x)), out_size)


def create_decoder(name: str, feature_info: Any, num_classes: int, **kwargs: Any) -> nn.Module:
    """``fcn`` -> FCNHead, ``unet`` -> UNetDecoder over stages described by ``feature_info``; ValueError for an
    unknown name. Extra keyword arguments go to the decoder."""
    if name == "fcn":
        return FCNHead(feature_info, num_classes, **kwargs)
    if name == "unet":
        return UNetDecoder(feature_info, num_classes, **kwargs)
    raise ValueError(f"unknown segmentation decoder {name!r} (choose from {', '.join(DECODERS)})")


class SegmentationNet(nn.Module):
    """A ``features_only`` 2D backbone (held at ``.backbone``, so a classifier's ``backbone.layer1...`` tensors
    load by name) and a decoder: normalised images (B, 3, H, W) -> logits (B, K, H, W).

    ``prepare`` turns uint8 images into the normalised input with the training-set ``mean``/``std`` (buffers
    that are not saved: they belong to the data state)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25)) -> None:
        super().__init__()
        if not getattr(backbone, "features_only", False):
            raise ValueError("SegmentationNet needs a backbone built with features_only=True")
        self.backbone = backbone
        self.decoder = decoder
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) (or float in [0, 1]) -> normalised float (B, 3, H, W)."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> logits (B, K, H, W)."""
        return self.decoder(self.backbone(x), x.shape[-2:])
