"""Position-information probe (Islam et al. 2020) and translation probe on small CPU configs: a constant image gives
PosENet no position while a zero-padded deep network still has it; circular padding makes stages exactly
equivariant."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cnnapps.backbones import create_backbone
from cnnapps.understand.equivariance import (CircularPadding, WithPadding, format_probe, padding_context,
                                             translation_probe)
from cnnapps.understand.posenet import (PosENet, ProbeConfig, TrainedBackbone, apply_whitening, build_backbone,
                                        constant_images, extract_features, load_voc_images, position_map, spc_mae,
                                        train_readout, whitening)


def test_position_maps():
    h, v, g = position_map("H", 8), position_map("V", 8), position_map("G", 8)
    assert h[3, 0] == 0 and h[3, -1] == 1 and torch.all(h[:, 1:] > h[:, :-1])
    assert torch.equal(v, h.T)
    assert g[3:5, 3:5].min() == g.max() and g[0, 0] < 0.2
    hs = position_map("HS", 16)
    assert torch.equal(hs[0], torch.zeros(16)) and torch.equal(hs[:4, 0], hs[4:8, 0]) and hs[3, 0] == 1
    assert torch.equal(position_map("VS", 16), hs.T)
    with pytest.raises(ValueError, match="unknown position map"):
        position_map("X", 8)


def test_spc_and_mae():
    gt = position_map("H", 8)
    spc, mae, const = spc_mae(torch.stack([gt, 2 * gt]), gt)
    assert spc == pytest.approx(1.0) and const == 0 and mae == pytest.approx(float(gt.abs().mean()) / 2)
    spc, mae, const = spc_mae(torch.full((1, 8, 8), 0.5), gt)  # no ranking: "no position found"
    assert spc == 0.0 and const == 1 and mae == pytest.approx(2 / 7)  # mean |x/7 - 1/2| over x = 0..7
    assert spc_mae(torch.stack([1 - gt]), gt)[0] == pytest.approx(-1.0)


def test_whitened_read_out_is_one_linear_conv():
    torch.manual_seed(0)
    feats = torch.randn(6, 5, 8, 8) @ torch.eye(8) + torch.randn(6, 5, 1, 1)
    w = whitening(feats)
    net = PosENet(5, 3, w).eval()
    torch.nn.init.normal_(net.conv.weight)
    folded = torch.nn.Conv2d(5, 1, 3, padding=1, padding_mode="replicate")
    with torch.no_grad():
        folded.weight.copy_(torch.einsum("oikl,id->odkl", net.conv.weight, w))  # W' = W P
        folded.bias.copy_(net.conv.bias)
        assert torch.allclose(net(feats), folded(feats)[:, 0], atol=1e-4)
        assert torch.allclose(net(apply_whitening(w, feats), whitened=True), net(feats), atol=1e-2)
        # whitening keeps zeros at zero: a black image's raw features stay all zeros
        assert torch.count_nonzero(apply_whitening(w, torch.zeros(1, 5, 4, 4))) == 0


@pytest.fixture(scope="module")
def small_probe(data_root):
    """The acceptance config: 32x32 VOC-mini images, 8x8 maps, VGG-16 at 1/16 width as initialised (zero padding
    and circular padding), 160 training and 40 test images, 3x3 read-outs on the H map."""
    cfg = dataclasses.replace(ProbeConfig.quick(), voc_train=160, voc_test=40, readout_epochs=10, readout_batch=20)
    train = load_voc_images(data_root, "trainval", cfg.image_size, cfg.voc_train)
    tests = {"natural": load_voc_images(data_root, "test", cfg.image_size, cfg.voc_test),
             "black": constant_images(0.0, cfg.image_size), "white": constant_images(1.0, cfg.image_size)}
    gt = position_map("H", cfg.map_size)
    scores = {}
    for model in ("posenet", "vgg16", "vgg16_nopad"):
        trained = None
        if model != "posenet":
            torch.manual_seed(0)
            trained = TrainedBackbone(model, build_backbone(model, cfg).eval(), torch.full((3,), 0.5),
                                      torch.full((3,), 0.25), {})
        f_train, _ = extract_features(trained, train, cfg.map_size)
        for padding in ("replicate", "zeros"):
            net = train_readout(f_train, gt, 3, cfg, padding)
            with torch.no_grad():
                for name, imgs in tests.items():
                    scores[model, padding, name] = spc_mae(net(extract_features(trained, imgs, cfg.map_size)[0]), gt)
    return scores


def test_posenet_finds_no_position_in_a_constant_image_but_a_padded_deep_network_does(small_probe):
    for name in ("black", "white"):
        spc, _, constant = small_probe["posenet", "replicate", name]
        assert spc == 0.0 and constant == 1  # the raw image read-out predicts one value everywhere
        assert small_probe["vgg16", "replicate", name][0] > 0.3  # zero padding seen through 13 convolutions
        # the same network with circular padding has no border: nothing to read on a constant image
        assert small_probe["vgg16_nopad", "replicate", name][0] == 0.0
    assert small_probe["vgg16", "replicate", "black"][0] > 0.8
    assert small_probe["vgg16", "replicate", "natural"][0] > 0.7
    assert abs(small_probe["posenet", "replicate", "natural"][0]) < 0.2
    assert small_probe["vgg16", "replicate", "natural"][1] < small_probe["posenet", "replicate", "natural"][1]


def test_a_zero_padded_read_out_finds_the_border_by_itself(small_probe):
    # why the read-out replicates its edges by default: with zero padding its own border is a position cue
    assert small_probe["posenet", "zeros", "white"][0] > 0.2
    assert small_probe["posenet", "zeros", "natural"][0] > small_probe["posenet", "replicate", "natural"][0] + 0.2


@pytest.mark.parametrize("name,shape,kw", [("resnet18", (3, 64, 64), {}),
                                           ("hannun34_1d", (1, 1024), {"width": 4, "num_blocks": 8,
                                                                       "kernel_size": 8})])
def test_circular_padding_makes_every_stage_exactly_equivariant(name, shape, kw):
    torch.manual_seed(0)
    model = create_backbone(name, features_only=True, **kw)
    x = torch.randn(2, *shape)
    zeros = translation_probe(model, x, shifts=(1, 4, 32), padding="zeros", name=name)
    circular = translation_probe(model, x, shifts=(1, 4, 32), padding="circular", name=name)
    measured = [s for s in circular.stages if s.error is not None]
    assert measured and all(s.error < 1e-5 for s in measured)
    assert all(s.error > 1e-3 for s in zeros.stages if s.error is not None)
    assert all((s.error is None) == (s.shift % s.reduction != 0) for s in zeros.stages)
    # a shift by the total stride moves the last map by one unit: its global pool is then exactly invariant
    assert circular.pooled_change[32] < 1e-5 < zeros.pooled_change[32]
    table = format_probe([zeros, circular])
    assert "| circular | pooled output: relative change |" in table


def test_circular_padding_keeps_shapes_and_channel_padding():
    x = torch.randn(1, 3, 9, 9)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    pool = torch.nn.MaxPool2d(3, 2, 1)
    with CircularPadding():
        y, p = conv(x), pool(x)
        chan = F.pad(x, (0, 0, 0, 0, 0, 2))  # zero channels appended: left alone
    assert y.shape == conv(x).shape and p.shape == pool(x).shape
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight, conv.bias)
    assert torch.allclose(y, ref, atol=1e-6) and torch.equal(chan[:, 3:], torch.zeros(1, 2, 9, 9))
    vgg = build_backbone("vgg16", ProbeConfig.quick())
    wrapped = WithPadding(build_backbone("vgg16", ProbeConfig.quick()), "circular")
    wrapped.inner.load_state_dict(vgg.state_dict())
    with torch.no_grad(), padding_context("circular"):
        expect = vgg(torch.ones(1, 3, 32, 32))
    with torch.no_grad():
        got = wrapped(torch.ones(1, 3, 32, 32))
    assert all(torch.allclose(a, b) for a, b in zip(got, expect))
    with pytest.raises(ValueError, match="padding must be one of"):
        padding_context("reflect")
