"""Attribution methods on models whose answer is known: what a model never reads gets nothing, Grad-CAM has its
stage's size, occluding an ignored region changes nothing, integrated gradients are complete."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnapps.backbones import create_backbone
from cnnapps.understand.attribution import (grad_cam, guided_backprop, integrated_gradients, occlusion, saliency,
                                            stage_module, target_scores, to_map, upsample_to)


class OnePosition(nn.Module):
    """Logits (B, 3) from the channels at one input position only (2D: (row, col); 1D: (t,))."""

    def __init__(self, chans: int, pos: tuple[int, ...]) -> None:
        super().__init__()
        self.pos = pos
        self.mlp = nn.Sequential(nn.Linear(chans, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x[(slice(None), slice(None), *self.pos)])


class LeftHalf(nn.Module):
    """A small CNN that only looks at the left half (columns < 16) of a 32-wide input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[..., :16])


@pytest.mark.parametrize("shape,pos", [((2, 3, 12, 10), (5, 7)), ((2, 2, 40), (13,))], ids=["2d", "1d"])
@pytest.mark.parametrize("method", ["saliency", "guided-backprop", "integrated-gradients"])
def test_a_model_reading_one_position_gets_zero_attribution_elsewhere(shape, pos, method):
    torch.manual_seed(0)
    model = OnePosition(shape[1], pos).eval()
    x = torch.randn(*shape)
    fn = {"saliency": saliency, "guided-backprop": guided_backprop, "integrated-gradients": integrated_gradients}
    attr = fn[method](model, x, target=1)
    assert attr.shape == x.shape
    mask = torch.zeros(shape[2:], dtype=torch.bool)
    mask[pos] = True
    assert torch.count_nonzero(attr[:, :, ~mask]) == 0
    if method != "guided-backprop":  # guided backprop may clamp everything at one position to 0; the others not
        assert torch.count_nonzero(attr[:, :, mask]) > 0
    m = to_map(method, attr)
    assert m.shape == (shape[0], *shape[2:]) and torch.count_nonzero(m[:, ~mask]) == 0


def test_occlusion_of_what_the_model_ignores_leaves_the_score_unchanged():
    torch.manual_seed(0)
    model = LeftHalf().eval()
    x = torch.randn(2, 3, 32, 32)
    heat = occlusion(model, x, target=2, window=8, stride=4)
    assert heat.shape == (2, 32, 32)
    # every window covering columns >= 20 lies in the ignored right half (windows start at multiples of 4)
    assert torch.count_nonzero(heat[..., 20:]) == 0
    assert torch.count_nonzero(heat[..., :12]) > 0
    # the model's score itself: occluding the right half by hand changes nothing, the left half does
    occluded = x.clone()
    occluded[..., 16:] = 0
    with torch.no_grad():
        assert torch.equal(target_scores(model(x), 2), target_scores(model(occluded), 2))
        occluded[..., :16] = 0
        assert not torch.equal(target_scores(model(x), 2), target_scores(model(occluded), 2))


def test_occlusion_in_1d_covers_every_sample():
    model = nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    heat = occlusion(model, torch.randn(1, 1, 101), target=0, window=10, stride=7)
    assert heat.shape == (1, 101) and torch.isfinite(heat).all()


@pytest.mark.parametrize("name,shape,kw", [("resnet18", (3, 64, 64), {}), ("nin", (3, 32, 32), {"width": 0.25}),
                                           ("resnet18_1d", (1, 256), {})])
def test_grad_cam_on_every_stage_has_that_stages_spatial_size(name, shape, kw):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=4, **kw).eval()
    x = torch.randn(2, *shape)
    for stage in range(len(model.feature_info)):
        cam = grad_cam(model, x, target=1, stage=stage)
        r = model.feature_info.reduction(stage)
        assert cam.shape == (2, *(n // r for n in shape[1:])), (name, stage)
        assert (cam >= 0).all()
    assert upsample_to(cam, shape[1:]).shape == (2, *shape[1:])


def test_grad_cam_finds_the_backbone_stage_inside_a_task_model():
    from cnnapps.tasks.base import DataSplits
    from cnnapps.tasks.ecg.task import ECGConfig, ECGTask, _settings

    cfg = ECGConfig()
    cfg.model.width, cfg.model.num_blocks, cfg.model.kernel_size = 2, 8, 8
    model = ECGTask().build_model(cfg, DataSplits(None, None, None, state=_settings(cfg, None))).eval()
    name, _ = stage_module(model, 3)
    assert name == "backbone.stages.3"
    x = torch.randn(1, 1, 2048)
    out = model(x)  # (B, classes, T / 256)
    assert out.shape[-1] == 8
    cam = grad_cam(model, x, target=lambda o: o[:, 0, 2:5].sum(-1), stage=3)
    assert cam.shape == (1, 2048 // model.backbone.feature_info.reduction(3))


def test_integrated_gradients_are_complete():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(3, 1, 8, 8)
    attr, delta = integrated_gradients(model, x, target=[0, 1, 2], steps=64, return_delta=True)
    with torch.no_grad():
        gap = target_scores(model(x), torch.tensor([0, 1, 2])) - target_scores(model(torch.zeros_like(x)),
                                                                               torch.tensor([0, 1, 2]))
    assert torch.allclose(attr.flatten(1).sum(1), gap, atol=1e-3)
    assert delta.abs().max() < 1e-3


def test_guided_backprop_keeps_only_positive_signals_through_relus():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 5), nn.Linear(5, 1)
    model = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(inplace=True), lin2).eval()
    x = torch.randn(1, 1, 6)
    h = lin1(x.flatten(1))
    expected = ((lin2.weight.clamp(min=0) * (h > 0)) @ lin1.weight).view_as(x)  # clamp the signal at the ReLU
    plain = ((lin2.weight * (h > 0)) @ lin1.weight).view_as(x)
    assert torch.allclose(guided_backprop(model, x, target=0), expected, atol=1e-6)
    assert torch.allclose(saliency(model, x, target=0), plain, atol=1e-6)
    from cnnapps.understand.attribution import _GuidedReLUs

    with torch.no_grad(), _GuidedReLUs():
        guided_out = model(x)
    with torch.no_grad():
        assert torch.equal(guided_out, model(x))  # the forward pass, hence the explained score, is unchanged


def test_targets_are_checked():
    model = OnePosition(3, (1, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        saliency(model, x, target=7)
    with pytest.raises(ValueError, match="2 targets|targets for a batch"):
        saliency(model, x, target=[0, 1, 2])
    with pytest.raises(ValueError, match="stage 9 out of range"):
        grad_cam(create_backbone("resnet18", num_classes=2).eval(), torch.randn(1, 3, 32, 32), stage=9)
