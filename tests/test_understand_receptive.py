"""Receptive fields: the traced analytic field equals the gradient support of one unit (2D and 1D, several
families), matches published values, and shows up in ``summary`` with effective stride and activation memory."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cnnapps.backbones import create_backbone
from cnnapps.backbones.alexnet import ALEXNET_CONVS, AlexNet
from cnnapps.backbones.vgg import VGG, VGG_CONFIGS
from cnnapps.summary import summarize
from cnnapps.understand.receptive import (analytic_support, gradient_support, layer_receptive_fields,
                                          receptive_field_formula, stage_receptive_fields,
                                          stage_receptive_fields_by_name)


def _thin_vgg16() -> VGG:
    # The field depends on kernels, strides and padding only; 1/16 of the widths keeps a float64 pass cheap.
    return VGG([v if v == "M" else v // 16 for v in VGG_CONFIGS["D"]], num_classes=0, features_only=True)


def _thin_alexnet() -> AlexNet:
    return AlexNet([dataclasses.replace(c, out_chs=c.out_chs // 16) for c in ALEXNET_CONVS], features_only=True)


# (label, builder, input shape): 2D chains, residual nets, inception branches, NiN's 1x1 stacks, 1D nets.
CASES = [
    ("lenet5", lambda: create_backbone("lenet5", features_only=True), (1, 32, 32)),
    ("alexnet/16", _thin_alexnet, (3, 227, 227)),
    ("vgg16/16", _thin_vgg16, (3, 224, 224)),
    ("resnet18", lambda: create_backbone("resnet18", features_only=True), (3, 64, 64)),
    ("nin", lambda: create_backbone("nin", features_only=True, width=0.25), (3, 64, 64)),
    ("googlenet", lambda: create_backbone("googlenet", features_only=True, out_indices=(0, 1, 2)), (3, 64, 64)),
    ("resnet18_1d", lambda: create_backbone("resnet18_1d", features_only=True), (1, 512)),
    ("hannun34_1d", lambda: create_backbone("hannun34_1d", features_only=True, width=2, num_blocks=8,
                                            kernel_size=8), (1, 1024)),
]


@pytest.mark.parametrize("label,build,shape", CASES, ids=[c[0] for c in CASES])
def test_analytic_field_of_every_stage_equals_the_gradient_support(label, build, shape):
    torch.manual_seed(0)
    model = build()
    stages = stage_receptive_fields(model, shape)
    centre = gradient_support(model, shape, stage=[s.index for s in stages])
    for s, box in zip(stages, centre):
        assert analytic_support(s.axes, shape) == box, (label, s.module)
    # A corner unit: its field hangs over the padding, so the start offsets are checked too, not only sizes.
    for s in stages[:2]:
        corner = (0,) * (len(shape) - 1)
        assert analytic_support(s.axes, shape, corner) == gradient_support(model, shape, s.index, corner)


def test_a_field_larger_than_the_input_is_clipped_identically():
    # resnet18 layer4 sees 435 samples; at 64x64 both the analytic span and the gradient cover the whole input.
    model = create_backbone("resnet18", features_only=True, out_indices=(4,))
    (stage,) = stage_receptive_fields(model, (3, 64, 64))
    assert stage.size == (435, 435)
    assert analytic_support(stage.axes, (3, 64, 64)) == gradient_support(model, (3, 64, 64), 0) == ((0, 63), (0, 63))


def test_published_receptive_fields():
    # LeNet-5 (LeCun et al. 1998, sec. II.B): C5's 5x5 kernels on the 5x5 S4 maps make 1x1 maps that see the
    # whole 32x32 input: field 32.
    lenet = stage_receptive_fields_by_name("lenet5")
    assert lenet[-1].module == "c5" and lenet[-1].size == (32, 32) and lenet[-1].stride == (4, 4)
    # AlexNet at 227x227: conv5 163, pool5 195 (Araujo, Norris, Sim, "Computing Receptive Fields of CNNs",
    # Distill 2019, table: AlexNet 195).
    alex = {s.module: s for s in stage_receptive_fields_by_name("alexnet")}
    assert alex["relu5"].size == (163, 163) and alex["pool5"].size == (195, 195) and alex["pool5"].stride == (32, 32)
    # VGG-16: pool5 212 (Distill 2019 table: VGG-16 212); conv5_3 196, which Ren et al. (Faster R-CNN, NeurIPS
    # 2015, sec. 3.1) quote as 228 after their 3x3 RPN window: 196 + 2 * 16.
    vgg = stage_receptive_fields_by_name("vgg16")
    assert vgg[-1].size == (212, 212) and vgg[-1].stride == (32, 32)
    rows = dict(layer_receptive_fields(_with_meta("vgg16"), (3, 224, 224)))
    assert rows["features.28"][0].size == 196 and rows["features.28"][0].stride == 16  # conv5_3's ReLU
    rpn = nn.Sequential(_with_meta("vgg16").features[:30], nn.Conv2d(512, 512, 3, padding=1, device="meta"))
    assert dict(layer_receptive_fields(rpn, (3, 224, 224)))["1"][0].size == 228
    # ZF net: conv5 139; with the RPN's 3x3 window 171 (Ren et al. 2015, sec. 3.1).
    zf = {s.module: s for s in stage_receptive_fields_by_name("zfnet")}
    assert zf["relu5"].size == (139, 139) and zf["relu5"].size[0] + 2 * zf["relu5"].stride[0] == 171


def _with_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_backbone(name)


def test_traced_field_equals_the_textbook_recursion_for_a_chain():
    # VGG-16's feature stack as a chain of (kernel, stride): conv3x3/1 and pool2x2/2.
    chain = [(3, 1) if v != "M" else (2, 2) for v in VGG_CONFIGS["D"]]
    expected = receptive_field_formula(chain)
    model = _with_meta("vgg16")
    traced = dict(layer_receptive_fields(model, (3, 224, 224)))
    # features.N for the convs and pools (the ReLUs in between do not change the field)
    idx = [i for i, m in enumerate(model.features) if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    for i, (r, j) in zip(idx, expected):
        assert (traced[f"features.{i}"][0].size, traced[f"features.{i}"][0].stride) == (r, j)


def test_squeeze_excitation_makes_the_field_global():
    # The SE gate averages the whole map, so every unit after it depends on every input sample.
    stages = stage_receptive_fields_by_name("seresnet18", (3, 64, 64))
    assert not stages[0].axes[0].whole and all(a.whole for s in stages[1:] for a in s.axes)


def test_summary_rows_carry_field_stride_and_activation_memory():
    s = summarize("vgg16", (3, 224, 224))
    row = {r.name: r for r in s.rows}
    assert row["features.28"].receptive_field == (196, 196) and row["features.28"].effective_stride == (16, 16)
    assert row["features.30"].receptive_field == (212, 212)
    assert row["classifier.0"].receptive_field is None and row["classifier.0"].geometry[0].whole
    assert row["features.0"].forward_bytes == 64 * 224 * 224 * 4
    # conv1 saves its input for the weight gradient: one 3x224x224 float image per sample
    assert row["features.0"].backward_bytes == 3 * 224 * 224 * 4
    # the first max pool saves int64 indices of its output (its input was already saved by the ReLU)
    assert row["features.4"].backward_bytes == 64 * 112 * 112 * 8
    assert s.backward_bytes == sum(r.backward_bytes for r in s.rows)  # every saved tensor belongs to a leaf here
    table = s.format_table()
    assert "Saved/sample" in table and "saved for backward" in table
    h = summarize("hannun34_1d", (1, 2048), width=4)
    last = [r for r in h.rows if r.name.startswith("norm_act")][-1]
    assert last.effective_stride == (256,) and last.receptive_field[0] > 2048


def test_summary_of_a_real_model_leaves_it_untouched():
    model = create_backbone("resnet18_1d", num_classes=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = summarize(model, (1, 512))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert s.backward_bytes and s.backward_bytes > 0
    assert {r.name: r for r in s.rows}["layer4.1.conv2"].receptive_field == (435,)
