"""Small building blocks shared by the families: conv-norm-activation, squeeze-and-excitation, LRN, LeCun's tanh."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.layers._nd import adaptive_avgpool_cls, batchnorm_cls, check_dim, create_conv


class ConvNormAct(nn.Sequential):
    """Convolution, optional batch norm, optional activation: (B, in_chs, *L) -> (B, out_chs, *L / stride).

    Submodules are named ``conv``, ``bn`` (when ``norm``) and ``act`` (when ``act`` is not None). The conv
    has a bias only without batch norm, because BN's shift makes it redundant. ``bn_eps`` is the norm's epsilon
    (torchvision's Inception nets use 1e-3).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = "same",
        dim: int = 2,
        groups: int = 1,
        norm: bool = False,
        act: Callable[[], nn.Module] | None = nn.ReLU,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = create_conv(dim, in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=not norm)
        if norm:
            self.bn = batchnorm_cls(dim)(out_chs, eps=bn_eps)
        if act is not None:
            self.act = act()


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): rescale channels by a gate computed from their global mean.

    (B, C, *L) -> (B, C, *L). The two fully connected layers are 1x1 convolutions (the same arithmetic on the
    pooled (B, C, 1...) tensor) with C // reduction hidden units, as in the paper (r = 16).
    """

    def __init__(self, channels: int, reduction: int = 16, dim: int = 2) -> None:
        super().__init__()
        if reduction <= 0 or channels // reduction < 1:
            raise ValueError(f"SqueezeExcite needs channels // reduction >= 1, got {channels} // {reduction}")
        hidden = channels // reduction
        self.pool = adaptive_avgpool_cls(check_dim(dim))(1)
        self.fc1 = create_conv(dim, channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = create_conv(dim, hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * scale


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels, Krizhevsky et al. (2012) eq. 2:
    ``b_c = a_c / (k + alpha * sum_{c' in window(n)} a_c'^2) ** beta``; (B, C, *L) -> (B, C, *L).

    ``nn.LocalResponseNorm`` divides ``alpha`` by ``n`` (Caffe's convention); we pass ``alpha * n`` so the
    arguments mean what they mean in the paper (k=2, n=5, alpha=1e-4, beta=0.75).
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"LRN size must be positive, got {size}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, self.size, alpha=self.alpha * self.size, beta=self.beta, k=self.k)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class ScaledTanh(nn.Module):
    """LeCun et al. (1998) squashing ``A * tanh(S * x)``, A = 1.7159, S = 2/3 (so f(1) = 1); same shape out."""

    def __init__(self, amplitude: float = 1.7159, slope: float = 2.0 / 3.0) -> None:
        super().__init__()
        self.amplitude, self.slope = amplitude, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.tanh(self.slope * x)

    def extra_repr(self) -> str:
        return f"amplitude={self.amplitude}, slope={self.slope:.4f}"
