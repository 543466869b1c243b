"""Network in Network (Lin, Chen, Yan 2014): mlpconv blocks and global average pooling instead of FC layers."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._registry import register_backbone
from cnnapps.layers import adaptive_avgpool_cls, avgpool_cls, create_conv, maxpool_cls

_PAPER = "Lin, Chen, Yan. Network In Network. ICLR 2014"

# The authors' CIFAR-10 model (their Caffe definition): per mlpconv block (k x k conv, 1x1, 1x1) widths. The last
# block's second 1x1 conv maps to the classes and is the head here.
NIN_CIFAR_BLOCKS: tuple[tuple[int, tuple[int, ...]], ...] = (
    (5, (192, 160, 96)),
    (5, (192, 192, 192)),
    (3, (192, 192)),
)


class MlpConv(nn.Sequential):
    """An mlpconv layer: a k x k conv then 1x1 convs (a small MLP shared over positions), ReLU after each:
    (B, in_chs, *L) -> (B, widths[-1], *L)."""

    def __init__(self, in_chs: int, widths: Sequence[int], kernel_size: int, dim: int = 2) -> None:
        super().__init__()
        for i, w in enumerate(widths):
            self.add_module(f"conv{i}", create_conv(dim, in_chs, w, kernel_size if i == 0 else 1))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            in_chs = w


class NiN(Backbone):
    """NIN for 32x32 images: mlpconv - 3x3/2 max pool - dropout - mlpconv - 3x3/2 avg pool - dropout - mlpconv
    whose last 1x1 conv gives one map per class - global average pooling. (B, in_chans, H, W) -> (B, num_classes).

    ``width`` scales every block's width relative to the paper's 192. Pools round up as Caffe's do
    (32 -> 16 -> 8). ``logit_relu`` keeps the ReLU the authors' model applies to the class maps before pooling.
    Stages (``feature_info``): block1 (after its pool, stride 2), block2 (stride 4), block3 (stride 4,
    ``width`` channels: the maps the class conv reads). ``num_features`` = ``width``. 966,986 parameters at
    width 192 with 10 classes.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 192,
        dropout: float = 0.5,
        logit_relu: bool = True,
        dim: int = 2,
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim)
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        chs = check_in_chans(in_chans)
        widths = []
        # Registered in forward order (block1, pool1, drop1, block2, ...) so parameter order follows the stages.
        pools = {1: maxpool_cls(dim)(kernel_size=3, stride=2, ceil_mode=True),
                 2: avgpool_cls(dim)(kernel_size=3, stride=2, ceil_mode=True)}
        for i, (kernel, ws) in enumerate(NIN_CIFAR_BLOCKS, start=1):
            scaled = [max(1, round(w * width / 192)) for w in ws]
            self.add_module(f"block{i}", MlpConv(chs, scaled, kernel, dim))
            if i in pools:
                self.add_module(f"pool{i}", pools[i])
                self.add_module(f"drop{i}", nn.Dropout(dropout))
            chs = scaled[-1]
            widths.append(chs)
        self._set_stages([
            (("block1", "pool1"), widths[0], 2),
            (("drop1", "block2", "pool2"), widths[1], 4),
            (("drop2", "block3"), widths[2], 4),
        ])
        if features_only:
            self._set_features_only(out_indices)
            return
        self.num_features = self.feature_info.channels(-1)
        self.logit_relu = logit_relu
        self.global_pool = adaptive_avgpool_cls(dim)(1)
        self.classifier: nn.Module = nn.Identity()
        self.logit_act: nn.Module = nn.Identity()
        self.reset_classifier(check_num_classes(num_classes))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the class-map 1x1 conv by one with ``num_classes`` maps (0: none; pooled features out)."""
        self._require_head()
        self.num_classes = check_num_classes(num_classes)
        if num_classes:
            self.classifier = create_conv(self.dim, self.num_features, num_classes, 1)
            self.logit_act = nn.ReLU(inplace=True) if self.logit_relu else nn.Identity()
        else:
            self.classifier, self.logit_act = nn.Identity(), nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """block3 map (B, width, *L/4) -> class scores (B, num_classes); the pooled (B, width) with ``pre_logits``."""
        self._require_head()
        if not pre_logits:
            x = self.logit_act(self.classifier(x))
        return torch.flatten(self.global_pool(x), 1)


@register_backbone(default_input=(3, 32, 32), min_input=(3, 16, 16), num_classes=10, paper=_PAPER)
def nin(**kwargs) -> NiN:
    """NIN, the paper's CIFAR-10 configuration (192-wide mlpconv blocks); ``width`` to shrink or grow it."""
    return NiN(**kwargs)
