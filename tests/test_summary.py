"""summarize() counts parameters and multiply-adds like the published tables; the CLI prints them."""
from __future__ import annotations

import pytest
from torch import nn

from cnnapps.__main__ import main
from cnnapps.backbones import backbone_info
from cnnapps.summary import summarize

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def test_vgg16_totals_at_224():
    s = summarize("vgg16", (3, 224, 224))
    assert s.params == s.trainable_params == 138_357_544
    assert abs(s.macs - 15.47e9) / 15.47e9 < 0.01
    table = s.format_table()
    assert "Total params: 138,357,544" in table
    first = s.rows[0]
    assert (first.name, first.type, first.output_shape, first.params) == ("features.0", "Conv2d", (64, 224, 224), 1_792)
    assert first.macs == 64 * 224 * 224 * 3 * 9


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_macs_match_published(name):
    published = backbone_info(name).published
    s = summarize(name, (3, 224, 224))
    assert s.params == published["params"]
    # torchvision's metadata counts conv + linear multiply-adds like we do: 1%.
    assert abs(s.macs / 1e9 - published["gmacs"]) / published["gmacs"] < 0.01
    # He et al. table 1 counts the original blocks (stride in the first 1x1 conv): torchvision's blocks are up
    # to 7.6% dearer (resnet50: 4.09 vs 3.8); with stride_in_1x1 we match the paper within 2%.
    assert abs(s.macs / 1e9 - published["paper_gmacs"]) / published["paper_gmacs"] < 0.08
    if "50" in name or "101" in name or "152" in name:
        v1 = summarize(name, (3, 224, 224), stride_in_1x1=True)
        assert v1.params == s.params
        assert abs(v1.macs / 1e9 - published["paper_gmacs"]) / published["paper_gmacs"] < 0.02


def test_other_published_numbers():
    alex = summarize("alexnet", (3, 227, 227))
    conv1 = alex.rows[0]
    assert (conv1.name, conv1.output_shape, conv1.params) == ("conv1", (96, 55, 55), 34_944)
    g = summarize("googlenet", (3, 224, 224))
    assert abs(g.macs / 1e9 - 1.5) / 1.5 < 0.06  # "1.5 billion multiply-adds" (our 5x5 branches: 1.58)
    assert abs(g.params - 6.8e6) / 6.8e6 < 0.04  # table 1: about 6.8 M
    se = summarize("seresnet50", (3, 224, 224), stride_in_1x1=True)
    assert abs(se.macs / 1e9 - 3.87) / 3.87 < 0.01  # Hu et al. table 2
    assert summarize("lenet5", (1, 32, 32)).params == 61_706


def test_counts_1d_convs_groups_and_shared_modules():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, groups=2), relu, nn.Conv1d(8, 8, 1), relu)
    s = summarize(model, (4, 10))
    assert [r.macs for r in s.rows] == [8 * 10 * 2 * 3, 0, 8 * 10 * 8, 0]
    assert [r.output_shape for r in s.rows] == [(8, 10)] * 4
    assert s.params == (8 * 2 * 3 + 8) + (8 * 8 + 8)
    model.train()
    summarize(model, (4, 10))
    assert model.training  # mode restored
    h = summarize("hannun34_1d", (1, 2560))
    assert h.rows[-1].output_shape == (12,) and h.params == 10_468_204
    with pytest.raises(TypeError):
        summarize(model, (4, 10), num_classes=3)


def test_cli_summary_prints_totals(capsys):
    assert main(["summary", "vgg16", "--input", "3,224,224"]) == 0
    out = capsys.readouterr().out
    assert "138,357,544" in out and "features.28" in out
    assert main(["summary", "alexnet", "--num-classes", "10", "--set", "groups=2", "lrn=false"]) == 0
    out = capsys.readouterr().out
    assert "LocalResponseNorm" not in out and f"Total params: {60_965_224 - 4096 * 990 - 990:,}" in out
    assert main(["summary", "hannun34_1d", "--input", "1,1024", "--set", "width=8"]) == 0
    assert "8x1024" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    assert main(["summary", "resnt18"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err
    assert main(["summary", "resnet18", "--input", "1,8192"]) == 2
    assert "2D" in capsys.readouterr().err


def test_cli_list_shows_backbones_and_tasks(capsys):
    from cnnapps.tasks import list_tasks

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "hannun34_1d" in out and "1x8192" in out and "vgg16_bn" in out
    assert all(task in out for task in list_tasks())
