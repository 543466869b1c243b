"""Batch augmentation: per-example random geometry, identity when off, exact flips."""
from __future__ import annotations

import torch

from cnnapps.data.augment import ImageAugment


def test_inactive_augment_is_identity():
    x = torch.randn(4, 3, 16, 16)
    aug = ImageAugment()
    assert not aug.active
    torch.testing.assert_close(aug(x), x)


def test_flip_only_gives_the_image_or_its_mirror_per_example():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = ImageAugment(hflip=True)(x)
    same = (y - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # about half, decided per example


def test_translation_moves_content_differently_per_example():
    torch.manual_seed(1)
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 14:18, 14:18] = 1.0
    y = ImageAugment(translate=0.2)(x)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx = (y[:, 0] * xs).sum((1, 2)) / y[:, 0].sum((1, 2))
    assert cx.std() > 1.0  # centres of mass spread out: each example got its own shift
    assert (cx - 15.5).abs().max() <= 0.2 * 32 + 1  # and no shift is larger than asked for


def test_call_is_the_warp_then_the_jitter_with_the_same_draws():
    x = torch.randn(8, 3, 16, 16)
    aug = ImageAugment(crop_scale=0.6, rotation=10, hflip=True, color_jitter=0.3)
    torch.manual_seed(3)
    whole = aug(x)
    torch.manual_seed(3)
    torch.testing.assert_close(whole, aug.jitter(aug.warp(x)))
    assert ImageAugment(color_jitter=0.3).warp(x) is x and ImageAugment(hflip=True).jitter(x) is x
