"""ResNet (He et al. 2016) for 1D and 2D signals, SE-ResNet (Hu et al. 2018); parameter names match torchvision's."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._pretrained import IMAGENET_CFG
from cnnapps.backbones._registry import register_backbone
from cnnapps.layers import (
    DropPath,
    SelectAdaptivePool,
    SqueezeExcite,
    batchnorm_cls,
    create_conv,
    drop_path_rates,
    maxpool_cls,
)

AttnLayer = Callable[[int], nn.Module]  # channels -> module mapping (B, C, *L) to the same shape

_RESNET_PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016"
_SE_PAPER = "Hu, Shen, Sun. Squeeze-and-Excitation Networks. CVPR 2018"


class BasicBlock(nn.Module):
    """Two k x k convolutions with an identity (or 1x1 projection) shortcut: (B, in_chs, *L) -> (B, planes, *L/stride).

    ``attn_layer(channels)`` (e.g. squeeze-and-excitation) is applied to the residual branch before the sum,
    then ``drop_path`` (stochastic depth: the branch is dropped for a random share of examples in training).
    ``dilation`` dilates the second conv, ``first_dilation`` (default ``dilation``) the first (torchvision's
    and timm's dilated stages: the first block keeps the previous stage's dilation).
    """

    expansion = 1
    checkpoint_unit = True

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dim: int = 2,
        kernel_size: int = 3,
        attn_layer: AttnLayer | None = None,
        dilation: int = 1,
        first_dilation: int | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        norm = batchnorm_cls(dim)
        first_dilation = first_dilation or dilation
        self.conv1 = create_conv(dim, in_chs, planes, kernel_size, stride, dilation=first_dilation, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = create_conv(dim, planes, planes, kernel_size, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.se = attn_layer(planes) if attn_layer is not None else None
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Start the block as an identity: the residual branch's last BN scale is 0 (Goyal et al. 2017)."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, k x k, 1x1 expand to ``planes * 4``: (B, in_chs, *L) -> (B, 4 * planes, *L/stride).

    The stride sits in the k x k conv (torchvision's "v1.5", slightly more accurate); ``stride_in_1x1=True``
    puts it in the first 1x1 conv as in the paper's original blocks (same parameters, fewer MACs).
    ``attn_layer``, ``dilation``, ``first_dilation`` (of the k x k conv) and ``drop_path`` as in ``BasicBlock``."""

    expansion = 4
    checkpoint_unit = True

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dim: int = 2,
        kernel_size: int = 3,
        attn_layer: AttnLayer | None = None,
        stride_in_1x1: bool = False,
        dilation: int = 1,
        first_dilation: int | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        norm = batchnorm_cls(dim)
        out_chs = planes * self.expansion
        stride1, stride2 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = create_conv(dim, in_chs, planes, 1, stride1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = create_conv(dim, planes, planes, kernel_size, stride2, dilation=first_dilation or dilation,
                                 bias=False)
        self.bn2 = norm(planes)
        self.conv3 = create_conv(dim, planes, out_chs, 1, bias=False)
        self.bn3 = norm(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.se = attn_layer(out_chs) if attn_layer is not None else None
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Start the block as an identity: the residual branch's last BN scale is 0."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(self.drop_path(out) + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(Backbone):
    """ResNet: stem (k x k/2 conv, BN, ReLU, 3/2 max pool), four stages of residual blocks, global pool, fc.

    Input (B, in_chans, *L) with ``dim`` spatial axes; ``forward`` gives (B, num_classes). Stages exposed in
    ``feature_info``: ``relu`` (stem, stride 2, 64 ch), ``layer1``..``layer4`` (strides 4, 8, 16, 32; 64..512
    times ``block.expansion`` channels). ``kernel_size`` is the blocks' kernel, ``stem_kernel_size`` the stem's
    (even sizes get TensorFlow-style "same" padding). ``attn_layer(channels)`` adds e.g. SE to every block.
    ``stride_in_1x1`` (bottleneck nets only) gives the paper's original blocks, see ``Bottleneck``.
    ``zero_init_residual`` starts every block as an identity (last BN scale 0).

    timm's options: ``output_stride`` 16 or 8 replaces the stride of the last one or two stages by dilation
    (torchvision's ``replace_stride_with_dilation``; ``feature_info`` then reports reductions 2, 4, 8, 16, 16 or
    2, 4, 8, 8, 8), for dense prediction at a finer map; ``drop_path_rate`` is stochastic depth growing linearly
    to that rate over the blocks; ``global_pool`` picks the head's pooling (see ``SelectAdaptivePool``).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        dim: int = 2,
        kernel_size: int = 3,
        stem_kernel_size: int = 7,
        stem_width: int = 64,
        attn_layer: AttnLayer | None = None,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        output_stride: int = 32,
        global_pool: str = "avg",
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive stage depths, got {tuple(layers)}")
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError("stride_in_1x1 applies to bottleneck blocks only (resnet50 and deeper)")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        self.block, self.kernel_size, self.attn_layer = block, kernel_size, attn_layer
        self.block_kw = {"stride_in_1x1": True} if stride_in_1x1 else {}
        self.output_stride = output_stride
        self.inplanes, self.dilation = stem_width, 1
        self._block_drop = iter(drop_path_rates(drop_path_rate, sum(layers)))
        self.conv1 = create_conv(dim, check_in_chans(in_chans), stem_width, stem_kernel_size, 2, bias=False)
        self.bn1 = batchnorm_cls(dim)(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool_cls(dim)(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=output_stride <= 8)
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=output_stride <= 16)
        del self._block_drop
        widths = [stem_width] + [p * block.expansion for p in (64, 128, 256, 512)]
        paths = [("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",)]
        reductions = [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
        self._set_stages(list(zip(paths, widths, reductions)))
        self._init_weights(zero_init_residual)
        if features_only:
            self._set_features_only(out_indices)
            return
        self.drop_rate = drop_rate
        self.global_pool = SelectAdaptivePool(global_pool, dim)
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(check_num_classes(num_classes))

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        """One stage: ``blocks`` blocks, the first with ``stride`` and a 1x1 projection if the shape changes.
        ``dilate`` keeps the resolution instead (stride 1) and multiplies the dilation by ``stride``."""
        out_chs = planes * self.block.expansion
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != out_chs:
            downsample = nn.Sequential(
                create_conv(self.dim, self.inplanes, out_chs, 1, stride, bias=False), batchnorm_cls(self.dim)(out_chs)
            )
        make = partial(
            self.block, dim=self.dim, kernel_size=self.kernel_size, attn_layer=self.attn_layer,
            dilation=self.dilation, **self.block_kw
        )
        layers = [make(self.inplanes, planes, stride, downsample, first_dilation=previous_dilation,
                       drop_path=next(self._block_drop))]
        self.inplanes = out_chs
        layers += [make(out_chs, planes, drop_path=next(self._block_drop)) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``fc`` by a fresh Linear(num_features, num_classes) (identity for 0); ``global_pool`` also
        changes the pooling (``num_features`` doubles with ``catavgmax``)."""
        self._require_head()
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool(global_pool, self.dim)
        self.num_classes = check_num_classes(num_classes)
        self.num_features = self.feature_info.channels(-1) * self.global_pool.feat_mult()
        if num_classes and self.global_pool.is_identity():
            raise ValueError("global_pool='' (no pooling) needs num_classes=0")
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, num_features, *L/32) -> (B, num_classes), or the pooled (B, num_features) with ``pre_logits``
        (with ``global_pool=''`` the unpooled map)."""
        self._require_head()
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)


def _resnet(block: Block, layers: Sequence[int], **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


# "params" and "gmacs": torchvision's weight metadata (its "GFLOPS" count multiply-adds of conv and linear layers,
# as summary.py does); we measure exactly these. "paper_gmacs": He et al. table 1 ("FLOPs" that are multiply-adds).
# The bottleneck nets measure 4.09 / 7.80 / 11.51 G against the paper's 3.8 / 7.6 / 11.3 because torchvision's
# blocks stride in the 3x3 conv: the first 1x1 conv of each stage's first block then runs at 4x the resolution
# (+0.23 G). With ``stride_in_1x1=True`` (the paper's blocks) we measure 3.86 / 7.57 / 11.28 G, which the paper
# rounds to 3.8 / 7.6 / 11.3. Tests: "gmacs" within 1%, "paper_gmacs" within 8% (v1.5) and 2% (stride_in_1x1).
_R224 = dict(default_input=(3, 224, 224), min_input=(3, 32, 32), paper=_RESNET_PAPER,
             pretrained_cfg=IMAGENET_CFG)


@register_backbone(**_R224, published={"params": 11_689_512, "gmacs": 1.814, "paper_gmacs": 1.8})
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2)."""
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_backbone(**_R224, published={"params": 21_797_672, "gmacs": 3.664, "paper_gmacs": 3.6})
def resnet34(**kwargs) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return _resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_backbone(**_R224, published={"params": 25_557_032, "gmacs": 4.089, "paper_gmacs": 3.8})
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_backbone(**_R224, published={"params": 44_549_160, "gmacs": 7.801, "paper_gmacs": 7.6})
def resnet101(**kwargs) -> ResNet:
    """ResNet-101: bottleneck blocks (3, 4, 23, 3)."""
    return _resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_backbone(**_R224, published={"params": 60_192_808, "gmacs": 11.514, "paper_gmacs": 11.3})
def resnet152(**kwargs) -> ResNet:
    """ResNet-152: bottleneck blocks (3, 8, 36, 3)."""
    return _resnet(Bottleneck, (3, 8, 36, 3), **kwargs)


def _seresnet(block: Block, layers: Sequence[int], se_reduction: int = 16, dim: int = 2, **kwargs) -> ResNet:
    return _resnet(block, layers, dim=dim, attn_layer=partial(SqueezeExcite, reduction=se_reduction, dim=dim), **kwargs)


# Hu et al. table 2: SE-ResNet-50 28.1 M parameters, 3.87 GFLOPs (multiply-adds of the original stride-in-1x1
# blocks; ResNet-50 3.86 there). We measure 28,088,024 parameters and 4.09 G (3.86 G with stride_in_1x1=True).
_SE224 = dict(default_input=(3, 224, 224), min_input=(3, 32, 32), paper=_SE_PAPER,
             pretrained_cfg=IMAGENET_CFG)


@register_backbone(**_SE224)
def seresnet18(**kwargs) -> ResNet:
    """SE-ResNet-18: ResNet-18 with squeeze-and-excitation (r = 16) in every block."""
    return _seresnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_backbone(**_SE224)
def seresnet34(**kwargs) -> ResNet:
    """SE-ResNet-34: ResNet-34 with squeeze-and-excitation (r = 16) in every block."""
    return _seresnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_backbone(**_SE224, published={"params": 28.1e6, "paper_gmacs": 3.87})
def seresnet50(**kwargs) -> ResNet:
    """SE-ResNet-50: ResNet-50 with squeeze-and-excitation (r = 16) in every block (Hu et al. table 2: 28.1 M)."""
    return _seresnet(Bottleneck, (3, 4, 6, 3), **kwargs)


# 1D ResNets for signals such as ECG: the same blocks with dim=1; 12 classes after Hannun et al.'s rhythms.
_R1D = dict(dim=1, default_input=(1, 8192), min_input=(1, 256), num_classes=12, paper=_RESNET_PAPER + " (1D variant)")


@register_backbone(**_R1D)
def resnet18_1d(**kwargs) -> ResNet:
    """ResNet-18 over time: (B, C, T) -> (B, num_classes); stage strides 2..32 along T."""
    return _resnet(BasicBlock, (2, 2, 2, 2), dim=1, **kwargs)


@register_backbone(**_R1D)
def resnet34_1d(**kwargs) -> ResNet:
    """ResNet-34 over time: (B, C, T) -> (B, num_classes); stage strides 2..32 along T."""
    return _resnet(BasicBlock, (3, 4, 6, 3), dim=1, **kwargs)
