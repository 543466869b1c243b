"""A feature pyramid over any 2D ``features_only`` backbone, shaped as torchvision's detection models expect."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

EXTRA_BLOCKS = ("pool", "p6p7", "none")


def _extra_block(kind: str, channels: int) -> ExtraFPNBlock | None:
    if kind == "pool":  # Faster / Mask R-CNN: one more level, a stride-2 max pool of the coarsest map
        return LastLevelMaxPool()
    if kind == "p6p7":  # RetinaNet / FCOS: two stride-2 3x3 convs on the coarsest FPN map
        return LastLevelP6P7(channels, channels)
    if kind == "none":
        return None
    raise ValueError(f"extra_block must be one of {', '.join(EXTRA_BLOCKS)}, got {kind!r}")


class FeaturePyramidBackbone(nn.Module):
    """``body`` (a zoo network built with ``features_only=True``) followed by ``torchvision.ops.FeaturePyramidNetwork``
    over every stage ``body.feature_info`` lists, like torchvision's ``BackboneWithFPN``.

    Input (B, 3, H, W); output an OrderedDict ``{"0": P_a, "1": P_b, ..., extra}`` of maps
    (B, out_channels, H / r, W / r), one per stage of ``body`` (``r = body.feature_info.reduction(i)``), then the
    extra levels (``"pool"`` at 2 r_last, or ``"p6"``, ``"p7"`` at 2 r_last and 4 r_last). ``out_channels`` is the
    attribute torchvision's FasterRCNN / MaskRCNN / FCOS / RetinaNet read.

    The body's submodules are registered directly on this module, not under a ``body.`` prefix: a detector holding
    this as ``.backbone`` then names the zoo network's tensors ``backbone.conv1.weight`` etc., exactly as a task
    model holding a plain zoo network does. So classification checkpoints and torchvision weight files load with
    ``load_matching_weights``, and the trainer's ``freeze_stages`` / ``backbone_lr_mult`` find the stages through
    ``feature_info`` (whose module names are valid here) without knowing about detection.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_block: str = "pool") -> None:
        super().__init__()
        if not getattr(body, "features_only", False) or not hasattr(body, "feature_info"):
            raise ValueError("FeaturePyramidBackbone needs a backbone built with features_only=True")
        if getattr(body, "dim", 2) != 2:
            raise ValueError(f"FeaturePyramidBackbone needs a 2D backbone, got dim={body.dim}")
        if body._parameters or body._buffers:  # noqa: SLF001 - tensors held by the body itself would be lost
            raise ValueError(f"{type(body).__name__} holds tensors outside its submodules; cannot flatten it")
        for name, child in body.named_children():
            if name == "fpn":
                raise ValueError(f"{type(body).__name__} has a submodule named 'fpn', which this adapter needs")
            self.add_module(name, child)
        # The body object itself stays out of the module tree (its children are registered above); its forward,
        # which knows the stage order, runs over those same child objects.
        self._body = (body,)
        self.feature_info = body.feature_info
        in_channels = list(body.feature_info.channels())
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                         extra_blocks=_extra_block(extra_block, out_channels))
        self.out_channels = out_channels
        self.level_names = [str(i) for i in range(len(in_channels))]

    @property
    def body(self) -> nn.Module:
        """The zoo network (features_only) whose submodules this adapter holds."""
        return self._body[0]

    def train(self, mode: bool = True) -> FeaturePyramidBackbone:
        super().train(mode)
        self.body.training = mode  # children already follow; keep the (unregistered) body's own flag in step
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, 3, H, W) -> OrderedDict of (B, out_channels, H / r, W / r) maps, finest first (see the class)."""
        feats = self.body(x)
        return self.fpn(OrderedDict(zip(self.level_names, feats)))

    def reductions(self) -> list[int]:
        """Total strides of every output map, in the order ``forward`` returns them (stages, then extras)."""
        reductions = list(self.feature_info.reduction())
        extra = self.fpn.extra_blocks
        if isinstance(extra, LastLevelMaxPool):
            reductions.append(reductions[-1] * 2)
        elif isinstance(extra, LastLevelP6P7):
            reductions += [reductions[-1] * 2, reductions[-1] * 4]
        return reductions
