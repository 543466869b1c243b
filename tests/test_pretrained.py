"""Weights files as pretrained backbones: torchvision state dicts (ResNet, and the alexnet_tv / googlenet_tv
layouts) load strictly and give torchvision's outputs; cnnapps checkpoints give their backbone tensors and their
preprocessing facts; what does not fit is reported, and unusable files are one clear error. Torchvision models
here are randomly initialised: nothing is downloaded."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cnnapps.backbones import PretrainedError, backbone_info, create_backbone
from cnnapps.engine.checkpoint import save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine values, so eval-mode outputs depend on every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    return model.eval()


def _same_outputs(ours: nn.Module, theirs: nn.Module, size: int = 64) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)


def test_resnet18_from_a_torchvision_state_dict_file(tmp_path):
    torch.manual_seed(0)
    theirs = _randomize_bn_(torchvision.models.resnet18())
    path = tmp_path / "resnet18.pth"
    torch.save(theirs.state_dict(), path)
    ours = create_backbone("resnet18", pretrained=path, pretrained_strict=True)
    _same_outputs(ours, theirs)
    cfg = ours.pretrained_cfg
    assert cfg["source"] == str(path) and cfg["file"] == "state dict" and len(cfg["sha256"]) == 16
    assert cfg["load"]["loaded"] == len(theirs.state_dict()) and not cfg["load"]["skipped"]
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["input_size"] == [3, 224, 224]

    # another head: the backbone loads, the file's fc is reported as skipped and ours left as initialised
    ten = create_backbone("resnet18", num_classes=10, pretrained=path)
    load = ten.pretrained_cfg["load"]
    assert set(load["skipped"]) == {"fc.weight", "fc.bias"} and "shape (1000, 512)" in load["skipped"]["fc.weight"]
    assert load["missing"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(ten.layer4[1].conv2.weight, theirs.layer4[1].conv2.weight)
    with pytest.raises(PretrainedError, match="strict loading failed.*fc.weight"):
        create_backbone("resnet18", num_classes=10, pretrained=path, pretrained_strict=True)


def test_alexnet_tv_takes_torchvision_alexnet_weights():
    torch.manual_seed(0)
    theirs = torchvision.models.alexnet().eval()
    ours = create_backbone("alexnet_tv").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _same_outputs(ours, theirs, size=96)
    assert sum(p.numel() for p in ours.parameters()) == backbone_info("alexnet_tv").published["params"]
    # the paper-faithful AlexNet cannot take them (other widths and names): the reason the _tv layout exists
    with pytest.raises(RuntimeError):
        create_backbone("alexnet").load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("aux", [True, False])
def test_googlenet_tv_takes_torchvision_googlenet_files(tmp_path, aux):
    torch.manual_seed(0)
    theirs = _randomize_bn_(torchvision.models.googlenet(aux_logits=True, init_weights=True))
    path = tmp_path / "googlenet.pth"
    torch.save(theirs.state_dict(), path)  # torchvision's files hold the aux heads too
    ours = create_backbone("googlenet_tv", aux_logits=aux, pretrained=path, pretrained_strict=aux)
    _same_outputs(ours, theirs)
    skipped = ours.pretrained_cfg["load"]["skipped"]
    assert not skipped if aux else (skipped and all(k.startswith(("aux1.", "aux2.")) for k in skipped))
    # with transform_input (how torchvision's ImageNet weights are used), still the same outputs
    theirs.transform_input = True
    _same_outputs(create_backbone("googlenet_tv", aux_logits=True, transform_input=True, pretrained=path), theirs)
    if not aux:
        assert sum(p.numel() for p in ours.parameters()) == backbone_info("googlenet_tv").published["params"]


class _TaskModel(nn.Module):
    """Stands in for a task model that holds the zoo network at ``.backbone`` with a head of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_backbone("resnet18", features_only=True, in_chans=1)
        self.head = nn.Conv2d(512, 2, 1)


def test_cnnapps_checkpoint_gives_backbone_tensors_and_preprocessing(tmp_path):
    torch.manual_seed(0)
    task_model = _TaskModel()
    state = {"class_names": ["bg", "person"], "image_size": 96, "in_chans": 1, "mean": [0.4], "std": [0.2],
             "mode": "semantic"}
    path = save_checkpoint({"task": "segment", "config": {"model": {"backbone": "resnet18"}}, "data_state": state,
                            "model": task_model.state_dict()}, tmp_path / "best.pt")
    ours = create_backbone("resnet18", pretrained=path)  # in_chans and num_classes from the checkpoint
    cfg = ours.pretrained_cfg
    assert ours.conv1.in_channels == 1 and ours.num_classes == 2
    assert cfg["load"]["prefix"] == "backbone." and cfg["load"]["missing"] == ["fc.weight", "fc.bias"]
    assert set(cfg["load"]["skipped"]) == {"head.weight", "head.bias"}
    assert (cfg["task"], cfg["classes"], cfg["mean"], cfg["std"]) == ("segment", ["bg", "person"], [0.4], [0.2])
    assert cfg["input_size"] == [1, 96, 96] and cfg["file"] == "cnnapps checkpoint"
    torch.testing.assert_close(ours.layer3[0].conv1.weight, task_model.backbone.layer3[0].conv1.weight)
    body = create_backbone("resnet18", features_only=True, pretrained=path, pretrained_strict=True)
    with torch.no_grad():
        x = torch.randn(1, 1, 64, 64)
        torch.testing.assert_close(body.eval()(x)[-1], task_model.backbone.eval()(x)[-1])


def test_unusable_weights_are_one_clear_error(tmp_path):
    with pytest.raises(PretrainedError, match="not found"):
        create_backbone("lenet5", pretrained=tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="garbage.pt: not a readable"):
        create_backbone("lenet5", pretrained=garbage)
    other = tmp_path / "other.pt"
    torch.save({"something.else": torch.zeros(3)}, other)
    with pytest.raises(PretrainedError, match="no tensor fits"):
        create_backbone("lenet5", pretrained=other)
    torch.save({"numbers": [1, 2]}, other)
    with pytest.raises(PretrainedError, match="no state dict"):
        create_backbone("lenet5", pretrained=other)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        create_backbone("lenet5", pretrained=True)


def test_pretrained_cfg_of_a_random_backbone():
    cfg = create_backbone("lenet5").pretrained_cfg
    assert cfg == {"source": "random init", "input_size": [1, 32, 32], "num_classes": 10, "mean": None,
                   "std": None, "classes": None}
    assert backbone_info("vgg11").pretrained_cfg["std"] == [0.229, 0.224, 0.225]
    # another input width than the family's: its per-channel normalisation no longer applies
    assert create_backbone("resnet18", in_chans=1).pretrained_cfg["mean"] is None
