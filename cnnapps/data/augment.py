"""Batch augmentation on the training device: per-example random parameters, one vectorised call per batch.

Per-example torchvision transforms on the CPU cost more than LeNet-5's whole training step; an affine grid with a
different matrix per example does crops, zoom, translation, rotation and flips for a batch at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ImageAugment:
    """Random geometry and colour for a batch ``(B, C, H, W)`` of normalised images (zero = the mean colour, which
    also fills the borders a shift or rotation opens)."""

    crop_scale: float = 1.0  # a random crop of this fraction of the area (or more), resized back (zoom in)
    translate: float = 0.0  # fraction of the image size, each axis
    rotation: float = 0.0  # degrees, either way
    hflip: bool = False
    color_jitter: float = 0.0  # brightness, contrast and saturation strength

    @property
    def warps(self) -> bool:
        """Whether ``warp`` changes anything (crop, shift, rotation or flip is on)."""
        return self.crop_scale < 1.0 or bool(self.translate) or bool(self.rotation) or self.hflip

    @property
    def active(self) -> bool:
        return self.warps or bool(self.color_jitter)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``jitter(warp(x))``: same shape as ``x``; draws from torch's global RNG (the engine seeds it per
        epoch)."""
        return self.jitter(self.warp(x))

    def warp(self, x: torch.Tensor) -> torch.Tensor:
        """The random geometry alone, one affine warp per example (any channels: a task may stack masks onto
        the image so both move together); ``x`` itself when no geometry is on."""
        if not self.warps:
            return x
        b, dev = x.shape[0], x.device
        zoom = _uniform(b, dev, self.crop_scale, 1.0).sqrt()  # side of the crop relative to the image
        # a crop of side `zoom` may sit anywhere inside the image: its centre moves by up to 1 - zoom
        tx = _uniform(b, dev, -1, 1) * ((1 - zoom) + 2 * self.translate)
        ty = _uniform(b, dev, -1, 1) * ((1 - zoom) + 2 * self.translate)
        angle = _uniform(b, dev, -self.rotation, self.rotation) * (math.pi / 180)
        flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(b, device=dev)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Random brightness and contrast per example (and saturation for 3 channels); ``x`` itself when off."""
        if not self.color_jitter:
            return x
        b, dev, j = x.shape[0], x.device, self.color_jitter
        shape = (b,) + (1,) * (x.dim() - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _uniform(b, dev, 1 - j, 1 + j).view(shape) + mean + _uniform(b, dev, -j, j).view(shape)
        if x.shape[1] == 3:
            grey = x.mean(1, keepdim=True)
            x = grey + (x - grey) * _uniform(b, dev, 1 - j, 1 + j).view(shape)
        return x


def _uniform(n: int, device: torch.device, lo: float, hi: float) -> torch.Tensor:
    """``n`` draws from U(lo, hi) on ``device`` (torch's global RNG)."""
    return torch.rand(n, device=device) * (hi - lo) + lo
