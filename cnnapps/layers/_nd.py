"""Pick the 1D or 2D flavour of a torch layer from ``dim`` so one block implementation serves both."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_SUPPORTED_DIMS = (1, 2)


class MaxPool1d(nn.MaxPool1d):
    """``nn.MaxPool1d`` that, while ``torch.export`` traces it, runs as a 2D max pool over (B, C, 1, T): the same
    numbers, but the export keeps the length dynamic, where ``F.max_pool1d`` makes it guard on (specialise to)
    the example's length. Eager calls stay ``F.max_pool1d`` (what tools that follow torch functions expect)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices or not torch.compiler.is_exporting():
            return super().forward(x)
        k, s, p, d = (v if isinstance(v, int) else v[0]
                      for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        return F.max_pool2d(x.unsqueeze(-2), (1, k), (1, s), (0, p), (1, d), self.ceil_mode).squeeze(-2)


_LAYERS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "conv": (nn.Conv1d, nn.Conv2d),
    "batchnorm": (nn.BatchNorm1d, nn.BatchNorm2d),
    "maxpool": (MaxPool1d, nn.MaxPool2d),
    "avgpool": (nn.AvgPool1d, nn.AvgPool2d),
    "adaptive_avgpool": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d),
    "adaptive_maxpool": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
}


def check_dim(dim: int) -> int:
    """Return ``dim`` if it is a supported signal dimension (1 or 2), else raise ValueError."""
    if dim not in _SUPPORTED_DIMS:
        raise ValueError(f"dim must be one of {_SUPPORTED_DIMS} (1: (B, C, T), 2: (B, C, H, W)), got {dim!r}")
    return dim


def layer_cls(kind: str, dim: int) -> type[nn.Module]:
    """The torch class of layer ``kind`` for ``dim`` (e.g. ``layer_cls("conv", 1) is nn.Conv1d``)."""
    if kind not in _LAYERS:
        raise KeyError(f"unknown layer kind {kind!r}; known: {', '.join(sorted(_LAYERS))}")
    return _LAYERS[kind][check_dim(dim) - 1]


def conv_cls(dim: int) -> type[nn.Module]:
    """``nn.Conv1d`` or ``nn.Conv2d``."""
    return layer_cls("conv", dim)


def batchnorm_cls(dim: int) -> type[nn.Module]:
    """``nn.BatchNorm1d`` or ``nn.BatchNorm2d``."""
    return layer_cls("batchnorm", dim)


def maxpool_cls(dim: int) -> type[nn.Module]:
    """``nn.MaxPool1d`` or ``nn.MaxPool2d``."""
    return layer_cls("maxpool", dim)


def avgpool_cls(dim: int) -> type[nn.Module]:
    """``nn.AvgPool1d`` or ``nn.AvgPool2d``."""
    return layer_cls("avgpool", dim)


def adaptive_avgpool_cls(dim: int) -> type[nn.Module]:
    """``nn.AdaptiveAvgPool1d`` or ``nn.AdaptiveAvgPool2d``."""
    return layer_cls("adaptive_avgpool", dim)


def adaptive_maxpool_cls(dim: int) -> type[nn.Module]:
    """``nn.AdaptiveMaxPool1d`` or ``nn.AdaptiveMaxPool2d``."""
    return layer_cls("adaptive_maxpool", dim)


def same_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """(left, right) zero padding that makes a convolution give ``L / stride`` outputs for ``L`` divisible by
    ``stride``.

    Odd (effective) kernels get PyTorch's symmetric ``(k - 1) / 2`` on each side, so torchvision's layers are
    reproduced exactly. Even kernels get TensorFlow's "same": ``k - stride`` in total, the odd sample on the
    right, as in the Keras code the Hannun et al. ECG network was trained with.
    """
    effective = dilation * (kernel_size - 1) + 1
    if effective % 2:
        return (effective - 1) // 2, (effective - 1) // 2
    total = max(effective - stride, 0)
    return total // 2, total - total // 2


class _AsymmetricPadMixin:
    """Pads the input before the convolution; needed when "same" padding is uneven (even kernels)."""

    pad: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.pad), self.weight, self.bias)  # type: ignore[attr-defined]


class Conv1dSame(_AsymmetricPadMixin, nn.Conv1d):
    """A ``Conv1d`` with uneven (left, right) zero padding; parameters are named like ``nn.Conv1d``'s."""


class Conv2dSame(_AsymmetricPadMixin, nn.Conv2d):
    """A ``Conv2d`` with uneven zero padding on each side; parameters are named like ``nn.Conv2d``'s."""


def _to_tuple(value: int | Sequence[int], dim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(value)
    if len(value) != dim:
        raise ValueError(f"expected {dim} values, got {value!r}")
    return value


def create_conv(
    dim: int,
    in_chs: int,
    out_chs: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = "same",
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
) -> nn.Module:
    """A ``dim``-D convolution mapping (B, in_chs, *L) to (B, out_chs, *L').

    ``padding="same"`` gives ``L' = L / stride`` for ``L`` divisible by ``stride``; it returns a plain
    ``nn.ConvNd`` when the padding is symmetric (odd kernels, so torchvision state_dicts load unchanged) and a
    ``ConvNdSame`` that pads unevenly otherwise. An int or tuple ``padding`` is passed to ``nn.ConvNd`` as is.
    """
    check_dim(dim)
    if in_chs <= 0 or out_chs <= 0:
        raise ValueError(f"channel counts must be positive, got in_chs={in_chs}, out_chs={out_chs}")
    kernel = _to_tuple(kernel_size, dim)
    strides = _to_tuple(stride, dim)
    common = dict(stride=strides, dilation=dilation, groups=groups, bias=bias)
    if padding != "same":
        if isinstance(padding, str):
            raise ValueError(f"padding must be 'same', an int or a tuple, got {padding!r}")
        return conv_cls(dim)(in_chs, out_chs, kernel, padding=padding, **common)
    pads = [same_padding(k, s, dilation) for k, s in zip(kernel, strides)]
    if all(left == right for left, right in pads):
        return conv_cls(dim)(in_chs, out_chs, kernel, padding=tuple(p[0] for p in pads), **common)
    conv = (Conv1dSame if dim == 1 else Conv2dSame)(in_chs, out_chs, kernel, padding=0, **common)
    # F.pad lists the last axis first
    conv.pad = tuple(p for pair in reversed(pads) for p in pair)
    return conv
