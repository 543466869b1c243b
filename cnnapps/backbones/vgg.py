"""VGG 11/13/16/19 with and without batch norm (Simonyan & Zisserman 2015); parameter names match torchvision's."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._pretrained import IMAGENET_CFG
from cnnapps.backbones._registry import register_backbone

_PAPER = "Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image Recognition. ICLR 2015"

# Table 1 of the paper: conv widths per block ("M" = 2x2 max pool); configurations A, B, D, E.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with torchvision's VGG init N(0, 0.01), bias 0. ``skip_init`` avoids first running the
    default init on 100 M weights (seconds on a CPU) only to overwrite it."""
    device = torch.empty(0).device  # honours a surrounding ``with torch.device(...)`` (e.g. "meta" in summary)
    layer = skip_init(nn.Linear, in_features, out_features, device=device)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


class VGG(Backbone):
    """VGG: blocks of 3x3 convs (+BN) + ReLU, each closed by a 2x2 max pool; adaptive 7x7 average pool (torchvision's,
    an identity at 224x224 input, so smaller inputs work too); FC 4096 - FC 4096 - FC num_classes with dropout.

    (B, in_chans, H, W) -> (B, num_classes). ``feature_info`` has one stage per block, taken after its max pool
    (``features.N`` is the pool; strides 2, 4, 8, 16, 32), so the last stage is what ``forward_features``
    returns. ``num_features`` is 4096: ``pre_logits`` / ``num_classes=0`` give the FC7 activations.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.5,
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim=2)
        layers: list[nn.Module] = []
        stages: list[tuple[list[str], int, int]] = []
        paths: list[str] = []
        chs, reduction = check_in_chans(in_chans), 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                paths.append(f"features.{len(layers) - 1}")
                reduction *= 2
                stages.append((paths, chs, reduction))
                paths = []
                continue
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"VGG config entries must be positive ints or 'M', got {v!r}")
            layers.append(nn.Conv2d(chs, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            paths += [f"features.{i}" for i in range(len(layers) - (3 if batch_norm else 2), len(layers))]
            chs = v
        if paths:
            raise ValueError("a VGG config must end with 'M' (every block closes with a max pool)")
        self.features = nn.Sequential(*layers)
        self._set_stages(stages)
        self._init_conv_weights()
        if features_only:
            self._set_features_only(out_indices)
            return
        self.num_features = 4096
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            _linear(self.feature_info.channels(-1) * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            _linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Identity(),
        )
        self.reset_classifier(check_num_classes(num_classes))

    def _init_conv_weights(self) -> None:
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last FC (``classifier.6``) by Linear(4096, num_classes) (identity for 0)."""
        self._require_head()
        self.num_classes = check_num_classes(num_classes)
        self.classifier[6] = _linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 512, H/32, W/32) -> (B, num_classes), or the FC7 activations (B, 4096) with ``pre_logits``."""
        self._require_head()
        x = torch.flatten(self.avgpool(x), 1)
        x = self.classifier[:6](x)
        return x if pre_logits else self.classifier[6](x)


def _vgg(cfg: str, batch_norm: bool, **kwargs) -> VGG:
    return VGG(VGG_CONFIGS[cfg], batch_norm=batch_norm, **kwargs)


# "params" from torchvision's weight metadata; "gmacs" likewise (its GFLOPS are multiply-adds of conv + linear).
_V = dict(default_input=(3, 224, 224), min_input=(3, 32, 32), paper=_PAPER,
             pretrained_cfg=IMAGENET_CFG)


@register_backbone(**_V, published={"params": 132_863_336, "gmacs": 7.609})
def vgg11(**kwargs) -> VGG:
    """VGG-11 (configuration A)."""
    return _vgg("A", False, **kwargs)


@register_backbone(**_V, published={"params": 132_868_840, "gmacs": 7.609})
def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 (configuration A) with batch norm after every conv."""
    return _vgg("A", True, **kwargs)


@register_backbone(**_V, published={"params": 133_047_848, "gmacs": 11.308})
def vgg13(**kwargs) -> VGG:
    """VGG-13 (configuration B)."""
    return _vgg("B", False, **kwargs)


@register_backbone(**_V, published={"params": 133_053_736, "gmacs": 11.308})
def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 (configuration B) with batch norm after every conv."""
    return _vgg("B", True, **kwargs)


@register_backbone(**_V, published={"params": 138_357_544, "gmacs": 15.47})
def vgg16(**kwargs) -> VGG:
    """VGG-16 (configuration D): 138,357,544 parameters, 15.47 G multiply-adds at 224x224."""
    return _vgg("D", False, **kwargs)


@register_backbone(**_V, published={"params": 138_365_992, "gmacs": 15.47})
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 (configuration D) with batch norm after every conv."""
    return _vgg("D", True, **kwargs)


@register_backbone(**_V, published={"params": 143_667_240, "gmacs": 19.632})
def vgg19(**kwargs) -> VGG:
    """VGG-19 (configuration E)."""
    return _vgg("E", False, **kwargs)


@register_backbone(**_V, published={"params": 143_678_248, "gmacs": 19.632})
def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 (configuration E) with batch norm after every conv."""
    return _vgg("E", True, **kwargs)
