"""The timm interface where timm has one: forward_intermediates (signature, meaning and results, against timm
itself on ResNets), output_stride by dilation, drop_path_rate, global_pool, set_grad_checkpointing and
prune_intermediate_layers; and the same semantics on the 1D nets, which timm does not have. timm is a test
dependency only (the `test` extra), created here with random weights: nothing is downloaded."""
from __future__ import annotations

import inspect

import pytest
import timm
import torch
from torch import nn

from cnnapps.backbones import Backbone, create_backbone
from cnnapps.layers import DropPath, SelectAdaptivePool


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _twins(name: str, **kw) -> tuple[nn.Module, nn.Module]:
    """timm's model and ours with timm's (random, BN-perturbed) weights loaded strictly, both in eval mode."""
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
    ours = create_backbone(name, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def test_forward_intermediates_has_timms_signature():
    ours = inspect.signature(Backbone.forward_intermediates).parameters
    theirs = inspect.signature(timm.models.ResNet.forward_intermediates).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in theirs if k not in ("self", "x"))
    ours = inspect.signature(Backbone.prune_intermediate_layers).parameters
    theirs = inspect.signature(timm.models.ResNet.prune_intermediate_layers).parameters
    assert list(ours) == list(theirs)


CALLS = [{}, {"indices": 2}, {"indices": [0, -1]}, {"indices": (1, 3), "stop_early": True},
         {"indices": [2], "intermediates_only": True}, {"indices": 1, "intermediates_only": True}]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_forward_intermediates_matches_timm(name):
    ours, theirs = _twins(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for kw in CALLS:
            a, b = ours.forward_intermediates(x, **kw), theirs.forward_intermediates(x, **kw)
            if kw.get("intermediates_only"):
                a, b = (None, a), (None, b)
            else:
                torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5, msg=f"final of {kw}")
            assert len(a[1]) == len(b[1]), kw
            for u, v in zip(a[1], b[1]):
                torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5, msg=f"intermediate of {kw}")
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        final, _ = ours.forward_intermediates(x)
        torch.testing.assert_close(final, ours.forward_features(x))
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[5])
    with pytest.raises(ValueError, match="output_fmt"):
        ours.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_matches_timm_and_torchvision_dilation(output_stride):
    ours, theirs = _twins("resnet50", output_stride=output_stride)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        final, inter = ours.forward_intermediates(x)
    assert final.shape[-1] == 64 // output_stride
    assert ours.feature_info.reduction() == [2, 4, 8, min(16, output_stride), output_stride]
    reductions = timm.create_model("resnet50", features_only=True, output_stride=output_stride).feature_info
    assert ours.feature_info.reduction()[1:] == reductions.reduction()[1:]
    assert [t.shape[-1] for t in inter] == [64 // r for r in ours.feature_info.reduction()]
    # basic blocks dilate too (torchvision's BasicBlock refuses; timm's does not): compare with timm
    ours18, theirs18 = _twins("resnet18", output_stride=output_stride)
    with torch.no_grad():
        torch.testing.assert_close(ours18(x), theirs18(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("resnet18", output_stride=4)


def test_drop_path_rates_match_timm():
    ours = create_backbone("resnet34", drop_path_rate=0.2)
    theirs = timm.create_model("resnet34", drop_path_rate=0.2)

    def rates(model):
        return [float(getattr(b.drop_path, "drop_prob", getattr(b.drop_path, "p", 0.0)) or 0.0)
                for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]

    assert rates(ours) == pytest.approx(rates(theirs))
    assert rates(ours)[0] == 0.0 and rates(ours)[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pool_matches_timm(pool):
    ours, theirs = _twins("resnet18", global_pool=pool)
    # the pooled width the classifier sees; timm calls the map's width num_features, we the pooled one (see README)
    assert ours.fc.in_features == theirs.fc.in_features == ours.num_features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        ours.reset_classifier(0, global_pool="")
        assert ours(x).shape == (2, 512, 2, 2)  # no pooling: the map itself, as timm gives
    with pytest.raises(ValueError, match="global_pool"):
        create_backbone("resnet18", global_pool="median")


def test_prune_intermediate_layers_matches_timm():
    ours, theirs = _twins("resnet18")
    assert ours.prune_intermediate_layers([1, 2]) == theirs.prune_intermediate_layers([1, 2]) == [1, 2]
    assert isinstance(ours.layer4, nn.Identity) and ours.num_classes == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = ours.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        b = theirs.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the same semantics beyond timm's models


@pytest.mark.parametrize("name,kw,shape", [
    ("hannun34_1d", {"width": 8, "num_blocks": 4, "kernel_size": 5}, (2, 1, 64)),
    ("resnet18_1d", {}, (2, 1, 256)),
    ("vgg11", {}, (2, 3, 32, 32)),
    ("googlenet_tv", {}, (2, 3, 32, 32)),
])
def test_forward_intermediates_semantics_on_other_families(name, kw, shape):
    model = create_backbone(name, **kw).eval()
    x = torch.randn(*shape)
    n = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == model.feature_info.channels()
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early, some = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert len(inter) == n and len(last_two) == 2
    torch.testing.assert_close(last_two[-1], inter[-1])
    torch.testing.assert_close(early, inter[0])
    assert len(some) == 1


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet18", {}, (4, 3, 32, 32)),
    ("hannun34_1d", {"width": 8, "num_blocks": 4, "kernel_size": 5, "dropout": 0.0}, (4, 1, 64)),
    ("vgg11_bn", {"features_only": True}, (2, 3, 32, 32)),  # in-place ReLUs between separately listed layers
])
def test_grad_checkpointing_keeps_outputs_and_gradients(name, kw, shape):
    torch.manual_seed(0)
    model = create_backbone(name, **({} if kw.get("features_only") else {"num_classes": 3}), **kw)
    x = torch.randn(*shape)

    def grads():
        model.zero_grad()
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out = out[-1] if isinstance(out, list) else out
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], sum(saved)

    plain_out, plain, plain_saved = grads()
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    ckpt_out, ckpt, ckpt_saved = grads()
    assert ckpt_saved < plain_saved / 2  # activations really are recomputed instead of kept
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def test_drop_path_drops_whole_examples_in_training_only():
    layer = DropPath(0.5)
    x = torch.ones(2000, 3, 4)
    torch.manual_seed(0)
    y = layer(x)
    kept = y.flatten(1).amax(1)
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # an example is dropped whole or scaled by 1 / (1 - p)
    assert (y.flatten(1) == kept[:, None]).all() and 0.4 < (kept > 0).float().mean() < 0.6
    assert torch.equal(layer.eval()(x), x)
    with pytest.raises(ValueError):
        DropPath(1.0)
    # stochastic depth in the 1D nets: different in training, identical to the plain net in eval mode
    kw = {"width": 8, "num_blocks": 4, "kernel_size": 5, "dropout": 0.0}
    torch.manual_seed(0)
    plain = create_backbone("hannun34_1d", **kw)
    torch.manual_seed(0)
    dropped = create_backbone("hannun34_1d", drop_path_rate=0.5, **kw)
    assert [float(b.drop_path.p) for s in dropped.stages for b in s if isinstance(b.drop_path, DropPath)] == \
        pytest.approx([0.5 / 3, 1 / 3, 0.5])
    x = torch.randn(8, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
        dropped.train()
        plain.train()
        assert not torch.allclose(dropped(x), plain(x))
    one_d = create_backbone("resnet18_1d", drop_path_rate=0.1)
    assert isinstance(one_d.layer4[1].drop_path, DropPath)


def test_global_pool_on_1d_and_googlenet():
    hannun = create_backbone("hannun34_1d", width=8, num_blocks=4, kernel_size=5, global_pool="catavgmax",
                             num_classes=0)
    assert hannun.num_features == 2 * hannun.feature_info.channels(-1)
    assert hannun(torch.randn(2, 1, 64)).shape == (2, hannun.num_features)
    g = create_backbone("googlenet", global_pool="max", num_classes=4).eval()
    assert isinstance(g.global_pool, SelectAdaptivePool) and g(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_segmentation_takes_output_stride():
    from cnnapps.engine.config import ConfigError, load_config
    from cnnapps.engine.task import DataSplits
    from cnnapps.tasks.segment.task import SegmentConfig, SegmentTask

    task = SegmentTask()
    state = {"mode": "semantic", "class_names": ["background", "person"], "image_size": 96,
             "mean": [0.5] * 3, "std": [0.25] * 3}
    data = DataSplits(None, None, None, state=state)
    for name, reductions in (("ci", [2, 4, 8, 16, 32]), ("ci_os8", [2, 4, 8, 8, 8])):
        cfg = load_config(SegmentConfig, name, [], search=task.config_dir())
        net = task.build_model(cfg, data).eval()
        assert net.backbone.feature_info.reduction() == reductions
        with torch.no_grad():
            assert net(torch.randn(1, 3, 96, 96)).shape == (1, 2, 96, 96)
    cfg = load_config(SegmentConfig, "ci_os8", ["model.backbone=vgg11"], search=task.config_dir())
    with pytest.raises(ConfigError, match="output_stride"):
        task.build_model(cfg, data)
