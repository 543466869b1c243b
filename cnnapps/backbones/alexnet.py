"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) and the conv-stack + FC-4096 net it shares with ZFNet."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._pretrained import IMAGENET_CFG
from cnnapps.backbones._registry import register_backbone
from cnnapps.layers import LocalResponseNorm

_PAPER = "Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep Convolutional Neural Networks. NeurIPS 2012"


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of the stack: ``out_chs`` filters of ``kernel`` x ``kernel``; ``grouped`` convs use the
    net's ``groups`` (AlexNet's two-GPU connectivity)."""

    out_chs: int
    kernel: int
    stride: int = 1
    padding: int = 0
    grouped: bool = False


# The paper's section 3.5 / figure 2, single tower as in the CS231n tables (227x227 input: 55, 27, 13, 13, 13, 6).
ALEXNET_CONVS = (
    ConvSpec(96, 11, stride=4),
    ConvSpec(256, 5, padding=2, grouped=True),
    ConvSpec(384, 3, padding=1),
    ConvSpec(384, 3, padding=1, grouped=True),
    ConvSpec(256, 3, padding=1, grouped=True),
)


class AlexNet(Backbone):
    """Five convolutions with ReLU, normalisation + 3x3/2 max pooling after conv1 and conv2, max pooling after
    conv5, then FC 4096 - FC 4096 - FC num_classes with dropout after each hidden FC.

    (B, in_chans, H, W) -> (B, num_classes). The flattened map is 256 x 6 x 6; an adaptive 6x6 average pool
    (an identity at the paper's input size) lets smaller inputs through. Options: ``lrn`` (local response
    normalisation, k=2, n=5, alpha=1e-4, beta=0.75), ``groups=2`` (conv2, conv4, conv5 see only their own
    tower's maps: 60,965,224 parameters instead of 62,378,344), ``dropout`` (0.5), ``paper_init`` (weights
    N(0, 0.01), biases 1 in conv2, conv4, conv5 and the hidden FCs, else 0; off by default because it trains
    only with the paper's schedule), ``norm_before_pool`` (AlexNet: True; ZFNet pools first) and ``ceil_mode``.

    Stages (``feature_info``), each the last map at a resolution: conv1 (96 ch), conv2, conv5 (256), pool5 (256).
    """

    def __init__(
        self,
        convs: Sequence[ConvSpec] = ALEXNET_CONVS,
        num_classes: int = 1000,
        in_chans: int = 3,
        lrn: bool = True,
        groups: int = 1,
        dropout: float = 0.5,
        paper_init: bool = False,
        norm_before_pool: bool = True,
        ceil_mode: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim=2)
        if len(convs) != 5:
            raise ValueError(f"expected 5 conv specs, got {len(convs)}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        chs = check_in_chans(in_chans)
        # Registered in forward order so parameter order follows the stages.
        for i, spec in enumerate(convs, start=1):
            g = groups if spec.grouped else 1
            if chs % g or spec.out_chs % g:
                raise ValueError(f"conv{i}: {chs} -> {spec.out_chs} channels cannot be split into {g} groups")
            self.add_module(f"conv{i}", nn.Conv2d(chs, spec.out_chs, spec.kernel, spec.stride, spec.padding, groups=g))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            chs = spec.out_chs
            if i in (1, 2, 5):
                pool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=ceil_mode)
                norm = LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0) if lrn else nn.Identity()
                order = [] if i == 5 else [(f"norm{i}", norm)]
                order.insert(len(order) if norm_before_pool else 0, (f"pool{i}", pool))
                for name, module in order:
                    self.add_module(name, module)

        # Stride bookkeeping for feature_info: each stage ends before the next max pool.
        r1 = convs[0].stride
        r2 = r1 * 2 * convs[1].stride
        r3 = r2 * 2 * convs[2].stride * convs[3].stride * convs[4].stride
        down1 = ("norm1", "pool1") if norm_before_pool else ("pool1", "norm1")
        down2 = ("norm2", "pool2") if norm_before_pool else ("pool2", "norm2")
        self._set_stages([
            (("conv1", "relu1"), convs[0].out_chs, r1),
            ((*down1, "conv2", "relu2"), convs[1].out_chs, r2),
            ((*down2, "conv3", "relu3", "conv4", "relu4", "conv5", "relu5"), convs[4].out_chs, r3),
            (("pool5",), convs[4].out_chs, r3 * 2),
        ])
        if paper_init:
            self._init_paper(convs)
        if features_only:
            self._set_features_only(out_indices)
            return
        self.num_features = 4096
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc6 = nn.Linear(self.feature_info.channels(-1) * 6 * 6, 4096)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(4096, 4096)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.fc8: nn.Module = nn.Identity()
        if paper_init:
            for fc in (self.fc6, self.fc7):
                nn.init.normal_(fc.weight, 0.0, 0.01)
                nn.init.ones_(fc.bias)
        self._paper_init = paper_init
        self.reset_classifier(check_num_classes(num_classes))

    def _init_paper(self, convs: Sequence[ConvSpec]) -> None:
        # Section 5: biases of 1 in conv2, conv4, conv5 ("provides the ReLUs with positive inputs").
        for i in range(1, len(convs) + 1):
            conv = getattr(self, f"conv{i}")
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.constant_(conv.bias, 1.0 if i in (2, 4, 5) else 0.0)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc8`` by Linear(4096, num_classes) (identity for 0)."""
        self._require_head()
        self.num_classes = check_num_classes(num_classes)
        self.fc8 = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes and self._paper_init:
            nn.init.normal_(self.fc8.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc8.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 map (B, 256, 6, 6) -> (B, num_classes), or the FC7 activations (B, 4096) with ``pre_logits``."""
        self._require_head()
        x = torch.flatten(self.avgpool(x), 1)
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return x if pre_logits else self.fc8(x)


@register_backbone(
    default_input=(3, 227, 227), min_input=(3, 67, 67), paper=_PAPER,
    published={"params": 60e6, "conv1_params": 34_944}, pretrained_cfg=IMAGENET_CFG,
    notes="the paper's 60 M is the two-tower net (groups=2: 60,965,224); single tower: 62,378,344",
)
def alexnet(**kwargs) -> AlexNet:
    """AlexNet, single tower by default (``groups=2`` for the paper's two-GPU connectivity); 227x227 input."""
    return AlexNet(ALEXNET_CONVS, **kwargs)


class AlexNetTV(Backbone):
    """AlexNet in torchvision's layout ("One weird trick", Krizhevsky 2014, as torchvision builds it): convs of
    64, 192, 384, 256, 256 filters, no LRN, dropout before FC6 and FC7; parameter names ``features.N`` /
    ``classifier.N`` are torchvision's, so its ``alexnet`` state dict loads strictly and gives its outputs.

    (B, in_chans, H, W) -> (B, num_classes), H, W >= 63. Stages (``feature_info``): conv1 (64 ch, /4), conv2
    (192, /8), conv5 (256, /16), pool5 (256, /32). ``num_features`` = 4096 (FC7 after its ReLU).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.5,
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim=2)
        self.features = nn.Sequential(
            nn.Conv2d(check_in_chans(in_chans), 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        f = [f"features.{i}" for i in range(13)]
        self._set_stages([(f[0:2], 64, 4), (f[2:5], 192, 8), (f[5:12], 256, 16), (f[12:13], 256, 32)])
        if features_only:
            self._set_features_only(out_indices)
            return
        self.num_features = 4096
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Identity(),
        )
        self.reset_classifier(check_num_classes(num_classes))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``classifier.6`` by Linear(4096, num_classes) (identity for 0)."""
        self._require_head()
        self.num_classes = check_num_classes(num_classes)
        self.classifier[6] = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 map (B, 256, h, w) -> (B, num_classes), or the FC7 activations (B, 4096) with ``pre_logits``."""
        self._require_head()
        x = self.classifier[:6](torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.classifier[6](x)


@register_backbone(
    default_input=(3, 224, 224), min_input=(3, 64, 64), paper=_PAPER + " (torchvision's single-tower layout)",
    published={"params": 61_100_840, "gmacs": 0.714},
    notes="torchvision's AlexNet_Weights.IMAGENET1K_V1 metadata (parameters and GFLOPS as multiply-adds)",
    pretrained_cfg=IMAGENET_CFG,
)
def alexnet_tv(**kwargs) -> AlexNetTV:
    """AlexNet with torchvision's parameter names and widths: ``torchvision.models.alexnet`` files load strictly."""
    return AlexNetTV(**kwargs)
