"""Backbone zoo behaviour: every registered model builds, trains a step, exposes honest feature_info, and the
torchvision-named families load torchvision's weights with identical outputs."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from cnnapps.backbones import (
    FeatureInfo,
    backbone_info,
    create_backbone,
    list_backbones,
    register_backbone,
)
from cnnapps.heads import ClassifierHead, SequenceHead
from cnnapps.layers import SqueezeExcite, create_conv

ALL = list_backbones()
TORCHVISION_TWINS = [n for n in ALL if n.startswith(("vgg", "resnet")) and hasattr(torchvision.models, n)]
# torchvision's layouts of the nets whose registry entries follow the papers instead
TORCHVISION_TWINS += ["alexnet_tv", "googlenet_tv"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Two cores shared with other jobs: one thread and no oneDNN primitive set-up per new shape is faster here.
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = mkldnn
    torch.set_num_threads(threads)


def _meta(name: str, **kw) -> nn.Module:
    """Build on the meta device: shapes and parameter counts without allocating or initialising weights."""
    with torch.device("meta"):
        return create_backbone(name, **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ every backbone


def test_zoo_lists_every_family_with_metadata():
    expected = {"lenet5", "alexnet", "zfnet", "nin", "googlenet", "hannun34_1d", "resnet18_1d", "resnet34_1d",
                *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
                *(f"resnet{d}" for d in (18, 34, 50, 101, 152)), "seresnet18", "seresnet34", "seresnet50",
                "alexnet_tv", "googlenet_tv"}
    assert expected <= set(ALL)
    assert set(list_backbones(dim=1)) == {"hannun34_1d", "resnet18_1d", "resnet34_1d"}
    assert list_backbones("vgg16*") == ["vgg16", "vgg16_bn"]
    for name in ALL:
        info = backbone_info(name)
        assert info.name == name and info.paper and len(info.default_input) == info.dim + 1


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_and_reset_classifier(name):
    info = backbone_info(name)
    torch.manual_seed(0)
    model = create_backbone(name)
    assert (model.num_classes, model.dim) == (info.num_classes, info.dim)
    x = torch.randn(2, *info.min_input)
    out = model(x)
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, model.num_features)
        assert torch.equal(pooled, model.forward_head(model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name", ALL)
def test_features_only_matches_feature_info(name):
    info = backbone_info(name)
    model = create_backbone(name, features_only=True, in_chans=5).eval()
    fi = model.feature_info
    assert not hasattr(model, "fc") and model.features_only
    step = max(fi.reduction())
    small = info.min_input[1:]
    large = tuple(s + step for s in small)
    with torch.no_grad():
        outs_small = model(torch.randn(1, 5, *small))
        outs_large = model(torch.randn(1, 5, *large))
    assert len(outs_small) == len(fi) >= 3
    for i, (a, b) in enumerate(zip(outs_small, outs_large)):
        assert a.shape[1] == fi.channels(i), f"stage {i} ({fi.module_name(i)})"
        # Growing the input by `step` grows a stage of stride r by exactly step / r along each axis.
        grown = [(sb - sa) * fi.reduction(i) for sa, sb in zip(a.shape[2:], b.shape[2:])]
        assert grown == [step] * info.dim, f"stage {i} ({fi.module_name(i)}) is not at reduction {fi.reduction(i)}"

    # out_indices picks stages (negative allowed); stages past the last one asked for are not built.
    first = create_backbone(name, features_only=True, out_indices=(0,), in_chans=1)
    assert first.feature_info.get_dicts() == [fi[0]]
    assert _n_params(first) < _n_params(model)
    pair = _meta(name, features_only=True, out_indices=(0, -1))
    assert pair.feature_info.channels() == [fi.channels(0), fi.channels(-1)]
    assert pair.feature_info.reduction() == [fi.reduction(0), fi.reduction(-1)]


@pytest.mark.parametrize("name", ALL)
def test_parameters_follow_stage_order(name):
    # The trainer freezes "the first n stages" by parameter order: a stage's parameters must precede the next's.
    model = _meta(name)
    fi = model.feature_info
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    ends = [order[fi.module_name(i)] for i in range(len(fi))]
    assert ends == sorted(ends)
    param_modules = [n.rsplit(".", 1)[0] for n, _ in model.named_parameters()]
    positions = [order[m] for m in param_modules]
    assert positions == sorted(positions)


# ------------------------------------------------------------------ registry and FeatureInfo


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(lambda **kw: nn.Identity(), name="resnet18")
    with pytest.raises(KeyError, match="resnet18"):
        create_backbone("resnt18")
    with pytest.raises(TypeError, match="not_an_option"):
        create_backbone("lenet5", not_an_option=1)
    with pytest.raises(ValueError, match="features_only"):
        create_backbone("lenet5", out_indices=(0,))
    with pytest.raises(ValueError, match="out of range"):
        create_backbone("lenet5", features_only=True, out_indices=(3,))
    with pytest.raises(ValueError):
        list_backbones(dim=3)


def test_feature_info_validates_itself():
    stages = [{"num_chs": 8, "reduction": 2, "module": "a"}, {"num_chs": 16, "reduction": 4, "module": "b"},
              {"num_chs": 32, "reduction": 8, "module": "c"}]
    fi = FeatureInfo(stages)
    assert len(fi) == 3 and fi.channels() == [8, 16, 32] and fi.reduction(-1) == 8 and fi.module_name(1) == "b"
    assert fi[0] == stages[0]
    sel = fi.select((0, -1))
    assert sel.channels() == [8, 32] and sel.reduction() == [2, 8]
    with pytest.raises(ValueError, match="num_chs"):
        FeatureInfo([{"num_chs": 0, "reduction": 2, "module": "a"}])
    with pytest.raises(ValueError, match="never decrease"):
        FeatureInfo([stages[1], stages[0]])
    with pytest.raises(ValueError, match="do not exist"):
        FeatureInfo(stages, model=nn.Sequential())
    with pytest.raises(ValueError, match="increasing"):
        fi.select((2, 0))
    with pytest.raises(ValueError, match="out of range"):
        fi.select((5,))


# ------------------------------------------------------------------ torchvision twins


def _randomize_(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter and BN statistic with random values of a sensible scale (also after ``to_empty``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.zero_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=gen)
            else:
                fan_in = math.prod(t.shape[1:]) if t.dim() > 1 else 100
                t.normal_(0.0, math.sqrt(1.0 / fan_in), generator=gen)


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_torchvision_state_dict_loads_and_outputs_match(name):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name.removesuffix("_tv"))(
            **({"aux_logits": False, "init_weights": False} if name == "googlenet_tv" else {}))
        ours = create_backbone(name)
    theirs = theirs.to_empty(device="cpu")
    _randomize_(theirs)
    assert _n_params(ours) == _n_params(theirs) == backbone_info(name).published["params"]
    # assign=True: our meta parameters become torchvision's tensors, so strict name/shape matching is checked
    # without copying 140 M numbers.
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    size = 32 if name.startswith("vgg") else 64  # vgg's adaptive 7x7 pool takes 32x32
    x = torch.randn(1, 3, size, size)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the papers' numbers


def test_lenet5_has_61706_parameters():
    assert _n_params(create_backbone("lenet5")) == 61_706


def test_alexnet_conv1_and_two_tower_option():
    model = create_backbone("alexnet", features_only=True, out_indices=(0,)).eval()
    assert _n_params(model.conv1) == 34_944
    with torch.no_grad():
        (conv1,) = model(torch.randn(1, 3, 227, 227))
    assert conv1.shape == (1, 96, 55, 55)
    assert _n_params(_meta("alexnet")) == 62_378_344
    assert _n_params(_meta("alexnet", groups=2)) == 60_965_224  # the paper's "60 million"
    assert not any(type(m).__name__ == "LocalResponseNorm" for m in _meta("alexnet", lrn=False).modules())


def test_zfnet_and_googlenet_map_sizes_follow_the_papers():
    zf = _meta("zfnet", features_only=True)
    assert [o.shape[-1] for o in zf(torch.zeros(1, 3, 224, 224, device="meta"))] == [110, 26, 13, 6]
    assert _n_params(zf.conv1) == 96 * 3 * 7 * 7 + 96
    g = _meta("googlenet", features_only=True)
    outs = g(torch.zeros(1, 3, 224, 224, device="meta"))
    assert [o.shape[-1] for o in outs] == [112, 56, 28, 14, 7]
    assert [o.shape[1] for o in outs] == [64, 192, 480, 832, 1024]


def test_googlenet_aux_heads_only_in_training():
    model = create_backbone("googlenet", aux_logits=True, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    logits, aux1, aux2 = model(x)
    assert logits.shape == aux1.shape == aux2.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    assert _n_params(_meta("googlenet", bn=True)) > _n_params(_meta("googlenet"))


def test_vgg16_parameter_count():
    assert _n_params(_meta("vgg16")) == 138_357_544


def test_resnet_options():
    model = create_backbone("resnet18", zero_init_residual=True)
    assert all(not b.bn2.weight.detach().any() for layer in (model.layer1, model.layer4) for b in layer)
    se = _meta("seresnet50")
    blocks = [b for layer in (se.layer1, se.layer2, se.layer3, se.layer4) for b in layer]
    assert all(isinstance(b.se, SqueezeExcite) for b in blocks) and len(blocks) == 16
    assert abs(_n_params(se) - 28.1e6) / 28.1e6 < 0.005  # Hu et al. table 2
    with pytest.raises(ValueError, match="bottleneck"):
        create_backbone("resnet18", stride_in_1x1=True)


def test_resnet_1d_takes_kernel_sizes():
    model = create_backbone("resnet18_1d", kernel_size=8, stem_kernel_size=16, num_classes=3, in_chans=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, 512)).shape == (2, 3)
        assert model.forward_features(torch.randn(1, 2, 512)).shape == (1, 512, 512 // 32)


def test_hannun_output_length_and_parameter_count():
    model = create_backbone("hannun34_1d", features_only=True, out_indices=(-1,)).eval()
    with torch.no_grad():
        for t in (256, 768):
            (feats,) = model(torch.randn(1, 1, t))
            assert feats.shape == (1, 256, t // 256)
    # 16 blocks of two k=16 convs: 10,465,120 body parameters + 257 per class; the paper: about 10.5 M.
    full = _meta("hannun34_1d")
    assert _n_params(full) == 10_468_204
    assert abs(_n_params(full) - 10.5e6) / 10.5e6 < 0.01
    blocks = [m for m in full.modules() if type(m).__name__ == "PreActBlock"]
    assert len(blocks) == 16 and isinstance(blocks[0].pre, nn.Identity)
    assert sum(isinstance(m, nn.Conv1d) for m in full.modules()) == 33  # + the output layer = 34 layers


def test_hannun_small_variant_gives_per_step_logits():
    model = create_backbone("hannun34_1d", width=8, num_blocks=4, kernel_size=5, dropout=0.0, num_classes=4)
    assert model.feature_info.reduction(-1) == 4  # 2 ** (4 // 2)
    head = SequenceHead(model.feature_info.channels(-1), 4)
    x = torch.randn(2, 1, 64)
    assert head(model.forward_features(x)).shape == (2, 4, 16)
    assert model(x).shape == (2, 4)


# ------------------------------------------------------------------ shared layers and heads


def test_heads_and_layers_serve_1d_and_2d():
    assert ClassifierHead(16, 3, dim=1)(torch.randn(2, 16, 9)).shape == (2, 3)
    assert ClassifierHead(16, 3, dim=2, pool="max", drop=0.5)(torch.randn(2, 16, 4, 4)).shape == (2, 3)
    assert ClassifierHead(16, 0, dim=2)(torch.randn(2, 16, 4, 4)).shape == (2, 16)
    assert SequenceHead(16, 5)(torch.randn(2, 16, 7)).shape == (2, 5, 7)
    for dim, shape in ((1, (1, 4, 32)), (2, (1, 4, 8, 8))):
        assert SqueezeExcite(16, 4, dim=dim)(torch.randn(1, 16, *shape[2:])).shape == (1, 16, *shape[2:])
        # "same" padding with an even kernel and stride 2 halves the length exactly
        conv = create_conv(dim, 4, 6, 16, stride=2)
        assert conv(torch.randn(shape)).shape[2:] == tuple(s // 2 for s in shape[2:])
    with pytest.raises(ValueError, match="dim"):
        ClassifierHead(16, 3, dim=3)
