"""GoogLeNet / Inception v1 (Szegedy et al. 2015) with the paper's table 1 widths, optional aux heads and BN."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._pretrained import IMAGENET_CFG
from cnnapps.backbones._registry import register_backbone
from cnnapps.layers import ConvNormAct, LocalResponseNorm, SelectAdaptivePool

_PAPER = "Szegedy et al. Going Deeper with Convolutions. CVPR 2015"


@dataclass(frozen=True)
class InceptionSpec:
    """Table 1 columns: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj."""

    c1: int
    c3_reduce: int
    c3: int
    c5_reduce: int
    c5: int
    pool_proj: int

    @property
    def out_chs(self) -> int:
        return self.c1 + self.c3 + self.c5 + self.pool_proj


INCEPTION_SPECS: dict[str, InceptionSpec] = {
    "3a": InceptionSpec(64, 96, 128, 16, 32, 32),
    "3b": InceptionSpec(128, 128, 192, 32, 96, 64),
    "4a": InceptionSpec(192, 96, 208, 16, 48, 64),
    "4b": InceptionSpec(160, 112, 224, 24, 64, 64),
    "4c": InceptionSpec(128, 128, 256, 24, 64, 64),
    "4d": InceptionSpec(112, 144, 288, 32, 64, 64),
    "4e": InceptionSpec(256, 160, 320, 32, 128, 128),
    "5a": InceptionSpec(256, 160, 320, 32, 128, 128),
    "5b": InceptionSpec(384, 192, 384, 48, 128, 128),
}


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3/1 max pool -> 1x1.
    (B, in_chs, H, W) -> (B, spec.out_chs, H, W). The 1x1 "reduce" convs are the bottlenecks that keep the
    3x3 and 5x5 convs cheap."""

    def __init__(self, in_chs: int, spec: InceptionSpec, bn: bool = False, branch3_kernel: int = 5,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        conv = partial(ConvNormAct, norm=bn, bn_eps=bn_eps)
        self.branch1 = conv(in_chs, spec.c1, 1)
        self.branch2 = nn.Sequential(conv(in_chs, spec.c3_reduce, 1), conv(spec.c3_reduce, spec.c3, 3))
        # The paper's 5x5 (torchvision uses 3x3 here, a known deviation from the paper: branch3_kernel=3).
        self.branch3 = nn.Sequential(conv(in_chs, spec.c5_reduce, 1),
                                     conv(spec.c5_reduce, spec.c5, branch3_kernel))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_chs, spec.pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class AuxHead(nn.Module):
    """Auxiliary classifier on a 14x14 map: 5x5/3 average pool (adaptive to 4x4, the same at 224 input), 1x1 conv
    128 + ReLU, FC 1024 + ReLU, dropout 0.7, linear. (B, in_chs, H, W) -> (B, num_classes)."""

    def __init__(self, in_chs: int, num_classes: int, bn: bool = False, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = ConvNormAct(in_chs, 128, 1, norm=bn, bn_eps=bn_eps)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.7)
        self.fc2: nn.Module = nn.Linear(1024, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.drop(self.relu(self.fc1(x))))


class GoogLeNet(Backbone):
    """GoogLeNet: stem (7x7/2 conv, 3x3/2 max pool, LRN, 1x1 conv 64, 3x3 conv 192, LRN, 3x3/2 max pool),
    inception 3a-3b, max pool, 4a-4e, max pool, 5a-5b, global average pool, dropout 0.4, linear.

    (B, in_chans, H, W) -> (B, num_classes). Options: ``global_pool`` (the final pooling, ``SelectAdaptivePool``),
    ``aux_logits`` (the two auxiliary classifiers on 4a and
    4d; in training mode ``forward`` then returns ``(logits, aux1, aux2)``, the paper weights their losses by
    0.3), ``bn`` (batch norm after every conv in place of the LRNs, as in later re-implementations; the paper
    has none). LRN settings are those of the authors' Caffe model (n=5, beta=0.75, k=1, Caffe's alpha=1e-4,
    which divides by n: 2e-5 in Krizhevsky's convention). ``layout="torchvision"`` is torchvision's variant
    (``googlenet_tv``): BN (eps 1e-3) instead of LRN, 3x3 convs in the "5x5" branch, a 2x2 last max pool,
    dropout 0.2, truncated-normal init and ``transform_input`` (map ImageNet-normalised input to the [-1, 1]
    scaling torchvision's weights were trained on); its parameter names are torchvision's. Max pools round up
    (Caffe): 224 -> 112 -> 56 -> 28 -> 14 -> 7. An adaptive average pool replaces the 7x7 one, so smaller
    inputs work (the same at 224).
    Stages (``feature_info``): conv1 (64 ch, /2), conv3 (192, /4), 3b (480, /8), 4e (832, /16),
    5b (1024, /32). ``num_features`` = 1024. 6,998,552 parameters and 1.58 G multiply-adds at 224x224 with
    1000 classes (the paper: about 6.8 M and 1.5 G).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        aux_logits: bool = False,
        bn: bool = False,
        dropout: float = 0.4,
        global_pool: str = "avg",
        layout: str = "paper",
        transform_input: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim=2)
        if layout not in ("paper", "torchvision"):
            raise ValueError(f"layout must be 'paper' or 'torchvision', got {layout!r}")
        tv = layout == "torchvision"
        bn = bn or tv
        bn_eps = 1e-3 if tv else 1e-5
        if transform_input and (not tv or in_chans != 3):
            raise ValueError("transform_input applies to the torchvision layout with 3 input channels")
        self.transform_input = transform_input
        conv = partial(ConvNormAct, norm=bn, bn_eps=bn_eps)

        def lrn() -> nn.Module:
            return nn.Identity() if bn else LocalResponseNorm(5, alpha=2e-5, beta=0.75, k=1.0)

        def pool(kernel: int = 3) -> nn.Module:
            return nn.MaxPool2d(kernel, stride=2, ceil_mode=True)

        self.conv1 = conv(check_in_chans(in_chans), 64, 7, stride=2)
        self.maxpool1, self.norm1 = pool(), lrn()
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3)
        self.norm2, self.maxpool2 = lrn(), pool()
        chs = 192
        for name, spec in INCEPTION_SPECS.items():
            self.add_module(f"inception{name}", Inception(chs, spec, bn, 3 if tv else 5, bn_eps))
            chs = spec.out_chs
            if name in ("3b", "4e"):  # registered in forward order so parameter order follows the stages
                self.add_module(f"maxpool{name[0]}", pool(2 if tv and name == "4e" else 3))
        out = {name: spec.out_chs for name, spec in INCEPTION_SPECS.items()}
        self._set_stages([
            (("conv1",), 64, 2),
            (("maxpool1", "norm1", "conv2", "conv3"), 192, 4),
            (("norm2", "maxpool2", "inception3a", "inception3b"), out["3b"], 8),
            (("maxpool3", *(f"inception4{c}" for c in "abcde")), out["4e"], 16),
            (("maxpool4", "inception5a", "inception5b"), out["5b"], 32),
        ])
        self._init_weights(bn, tv)
        self.aux_logits = aux_logits and not features_only
        if features_only:
            self._set_features_only(out_indices)
            return
        self.global_pool = SelectAdaptivePool(global_pool)
        self.dropout = nn.Dropout(dropout)
        self.fc: nn.Module = nn.Identity()
        self.aux1: AuxHead | None = None
        self.aux2: AuxHead | None = None
        if self.aux_logits:
            self.aux1 = AuxHead(out["4a"], num_classes, bn, bn_eps)
            self.aux2 = AuxHead(out["4d"], num_classes, bn, bn_eps)
            if tv:
                self._init_weights(bn, tv)
        self.reset_classifier(check_num_classes(num_classes))

    def _init_weights(self, bn: bool, tv: bool = False) -> None:
        if tv:  # torchvision's: truncated normal (std 0.01) for convs and linears, BN scale 1 and shift 0
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            return
        # The authors' Caffe model: Xavier weights, conv biases 0.2 (keeps ReLUs alive in a 22-layer net
        # without BN); with BN the convs have no bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.2)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last linear layer (and the aux heads' ones) by ``num_classes`` outputs (identity for 0);
        ``global_pool`` also changes the final pooling (``SelectAdaptivePool``)."""
        self._require_head()
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool(global_pool)
        if num_classes and self.global_pool.is_identity():
            raise ValueError("global_pool='' (no pooling) needs num_classes=0")
        self.num_features = self.feature_info.channels(-1) * self.global_pool.feat_mult()
        self.num_classes = check_num_classes(num_classes)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(1024, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """5b map (B, 1024, H/32, W/32) -> (B, num_classes), or the pooled (B, 1024) with ``pre_logits``."""
        self._require_head()
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def _run_stage(self, x: torch.Tensor, paths: Sequence[str]) -> torch.Tensor:
        if self.transform_input and paths is self._stage_paths[0]:
            x = _imagenet_to_unit_range(x)
        return super()._run_stage(x, paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]:
        """(B, num_classes) logits; ``(logits, aux1, aux2)`` when training with ``aux_logits``; the stage list
        with ``features_only``."""
        if self.features_only or not (self.aux_logits and self.training):
            return super().forward(x)
        aux = []
        if self.transform_input:
            x = _imagenet_to_unit_range(x)
        for paths in self._stage_paths:
            for path in paths:
                x = self.get_submodule(path)(x)
                if path == "inception4a":
                    aux.append(self.aux1(x))
                elif path == "inception4d":
                    aux.append(self.aux2(x))
        return self.forward_head(x), aux[0], aux[1]


def _imagenet_to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised RGB ((x - mean) / std) -> (x - 0.5) / 0.5, as torchvision's GoogLeNet weights expect."""
    mean = x.new_tensor(IMAGENET_CFG["mean"]).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_CFG["std"]).view(1, 3, 1, 1)
    return (x * std + mean - 0.5) / 0.5


@register_backbone(
    default_input=(3, 224, 224), min_input=(3, 32, 32), paper=_PAPER,
    published={"params": 6.8e6, "paper_gmacs": 1.5}, pretrained_cfg=IMAGENET_CFG,
    notes="table 1 sums to ~6.8 M without the final classifier's 1,025,000 and 1.5 G multiply-adds",
)
def googlenet(**kwargs) -> GoogLeNet:
    """GoogLeNet (Inception v1) for 224x224 images; ``aux_logits`` and ``bn`` off by default (the paper's net)."""
    return GoogLeNet(**kwargs)


@register_backbone(
    default_input=(3, 224, 224), min_input=(3, 32, 32), paper=_PAPER + " (torchvision's BN variant)",
    published={"params": 6_624_904, "gmacs": 1.498}, pretrained_cfg=IMAGENET_CFG,
    notes="torchvision's GoogLeNet_Weights.IMAGENET1K_V1 metadata; its files also hold the aux heads "
          "(load them strictly with aux_logits=True) and its weights want transform_input=True",
)
def googlenet_tv(**kwargs) -> GoogLeNet:
    """GoogLeNet with torchvision's layout and parameter names: ``torchvision.models.googlenet`` files load."""
    kwargs.setdefault("dropout", 0.2)
    return GoogLeNet(layout="torchvision", **kwargs)
