"""Hannun et al. (2019) 34-layer 1D ResNet for ECG rhythm labelling: one prediction per 256 input samples."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._registry import register_backbone
from cnnapps.heads import ClassifierHead
from cnnapps.layers import DropPath, batchnorm_cls, create_conv, drop_path_rates, maxpool_cls

_PAPER = (
    "Hannun, Rajpurkar, Haghpanahi, Tison, Bourn, Turakhia, Ng. Cardiologist-level arrhythmia detection and "
    "classification in ambulatory electrocardiograms using a deep neural network. Nature Medicine 2019"
)


class BNReLU(nn.Sequential):
    """Batch norm, ReLU, optional dropout: (B, C, *L) -> (B, C, *L)."""

    def __init__(self, chs: int, dropout: float = 0.0, dim: int = 1) -> None:
        super().__init__()
        self.bn = batchnorm_cls(dim)(chs)
        self.relu = nn.ReLU(inplace=True)
        if dropout > 0:
            self.drop = nn.Dropout(dropout)


class PreActBlock(nn.Module):
    """Pre-activation residual block: [BN-ReLU] - conv(k, stride) - BN-ReLU-dropout - conv(k), plus a shortcut
    that max-pools by ``stride`` and zero-pads new channels. (B, in_chs, L) -> (B, out_chs, L / stride).

    ``preact=False`` drops the first BN-ReLU (the net's first block, whose input is the stem's BN-ReLU output).
    Dropout sits only between the two convolutions, as in the authors' code. ``drop_path`` (stochastic depth)
    drops the residual branch for a random share of examples in training.
    """

    checkpoint_unit = True

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        kernel_size: int = 16,
        dropout: float = 0.2,
        preact: bool = True,
        dim: int = 1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"the zero-padded shortcut cannot shrink channels ({in_chs} -> {out_chs})")
        self.out_chs = out_chs
        self.pre = BNReLU(in_chs, dim=dim) if preact else nn.Identity()
        self.conv1 = create_conv(dim, in_chs, out_chs, kernel_size, stride)
        self.mid = BNReLU(out_chs, dropout, dim=dim)
        self.conv2 = create_conv(dim, out_chs, out_chs, kernel_size)
        self.shortcut = maxpool_cls(dim)(stride) if stride > 1 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        if shortcut.shape[1] < self.out_chs:
            # Channel growth without parameters: the new channels of the identity path are zeros.
            shortcut = F.pad(shortcut, (0, 0) * (x.dim() - 2) + (0, self.out_chs - shortcut.shape[1]))
        return self.drop_path(self.conv2(self.mid(self.conv1(self.pre(x))))) + shortcut


class HannunNet(Backbone):
    """The ECG network of Hannun et al.: conv(k=16, 32) - BN - ReLU, 16 pre-activation residual blocks of two
    k=16 convs, final BN - ReLU. (B, in_chans, T) -> logits (B, num_classes) by average pooling over time; the
    paper's per-time-step output is ``SequenceHead(feature_info.channels(-1), classes)`` on ``forward_features``,
    (B, 256, T / 256).

    Block ``i`` has ``width * 2 ** (i // increase_every)`` filters and subsamples by 2 when
    ``(i + 1) % subsample_every == 0`` (blocks 1, 3, ..., 15), so the total stride is
    ``2 ** (num_blocks // subsample_every)`` (256 by default); "same" padding (TensorFlow's, as in the authors'
    Keras code) makes a length-T input give exactly T / 256 steps when T is a multiple of 256.

    Parameters with 1 input channel: 10,465,120 in the body + 257 per class in the head (10,468,204 with the
    paper's 12 rhythm classes); the paper says "about 10.5 million". It equals the Keras model's trainable count
    (convs keep their biases as Keras' Conv1D does); Keras additionally lists BN moving statistics (7,744
    values) as non-trainable parameters, which PyTorch keeps as buffers. Batch norm uses PyTorch's defaults
    (eps 1e-5, momentum 0.1) rather than Keras' (1e-3, 0.99).

    Stages (``feature_info``): one per group of blocks at a new stride (strides 1, 2, 4, ..., 256 by default);
    the last includes the final BN-ReLU (module ``norm_act``). ``drop_path_rate``: stochastic depth growing
    linearly to that rate over the blocks (off in the paper); ``global_pool``: the pooling of the clip-level
    head (``SelectAdaptivePool``).
    """

    def __init__(
        self,
        num_classes: int = 12,
        in_chans: int = 1,
        width: int = 32,
        num_blocks: int = 16,
        kernel_size: int = 16,
        dropout: float = 0.2,
        subsample_every: int = 2,
        increase_every: int = 4,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim=1)
        dim = self.dim
        for arg, value in (("width", width), ("num_blocks", num_blocks), ("kernel_size", kernel_size),
                           ("subsample_every", subsample_every), ("increase_every", increase_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.stem = nn.Sequential()
        self.stem.add_module("conv", create_conv(dim, check_in_chans(in_chans), width, kernel_size))
        self.stem.add_module("bn", batchnorm_cls(dim)(width))
        self.stem.add_module("relu", nn.ReLU(inplace=True))

        groups: list[list[nn.Module]] = []
        group_meta: list[tuple[int, int]] = []  # (channels, reduction) at the end of each group
        chs, reduction = width, 1
        block_drop = drop_path_rates(drop_path_rate, num_blocks)
        for i in range(num_blocks):
            out_chs = width * 2 ** (i // increase_every)
            stride = 2 if (i + 1) % subsample_every == 0 else 1
            block = PreActBlock(chs, out_chs, stride, kernel_size, dropout, preact=i > 0, dim=dim,
                                drop_path=block_drop[i])
            reduction *= stride
            if i == 0 or stride > 1:
                groups.append([])
                group_meta.append((out_chs, reduction))
            groups[-1].append(block)
            group_meta[-1] = (out_chs, reduction)
            chs = out_chs
        self.stages = nn.Sequential(*(nn.Sequential(*g) for g in groups))
        self.norm_act = BNReLU(chs, dim=dim)
        paths: list[tuple[str, ...]] = [(f"stages.{i}",) for i in range(len(groups))]
        paths[0] = ("stem", *paths[0])
        paths[-1] = (*paths[-1], "norm_act")
        self._set_stages([(p, c, r) for p, (c, r) in zip(paths, group_meta)])
        self._init_weights()
        if features_only:
            self._set_features_only(out_indices)
            return
        self.head = ClassifierHead(self.feature_info.channels(-1), check_num_classes(num_classes), dim=dim,
                                   pool=global_pool)
        self.num_features = self.head.num_features
        self.num_classes = num_classes

    def _init_weights(self) -> None:
        # Keras "he_normal" kernels and zero biases, as the authors trained with.
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the linear layer after time pooling by one with ``num_classes`` outputs (identity for 0);
        ``global_pool`` also changes the pooling."""
        self._require_head()
        if global_pool is not None:
            self.head = ClassifierHead(self.feature_info.channels(-1), 0, dim=self.dim, pool=global_pool,
                                       drop=self.head.drop.p)
            self.num_features = self.head.num_features
        self.head.reset(check_num_classes(num_classes))
        self.num_classes = num_classes

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, num_features, T / 256) -> time-averaged logits (B, num_classes); (B, num_features) with ``pre_logits``."""
        self._require_head()
        return self.head(x, pre_logits=pre_logits)


@register_backbone(
    dim=1, default_input=(1, 8192), min_input=(1, 256), num_classes=12, paper=_PAPER,
    published={"params": 10.5e6},
    notes="10,468,204 parameters with 12 classes; the paper: about 10.5 M",
)
def hannun34_1d(**kwargs) -> HannunNet:
    """The 34-layer ECG network (33 convs + output layer), 1 lead at 200 Hz, 12 rhythm classes by default."""
    return HannunNet(**kwargs)
