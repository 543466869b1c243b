"""The speed report's measurements are real and comparable: same models, same inputs, ratios from both."""
from __future__ import annotations

import torch

from cnnapps.bench.speed import (compare_with_torchvision, conv_vs_matmul, format_backbones, model_throughput,
                                  write_section)


def test_side_by_side_rows_measure_both_implementations():
    rows = compare_with_torchvision(["resnet18"], size=32, batch=2, device=torch.device("cpu"), repeats=1,
                                    variants=["fp32+channels_last"])
    assert [(r["mode"], r["variant"]) for r in rows] == [("eval", "fp32+channels_last"), ("train", "fp32+channels_last")]
    for r in rows:
        assert r["ours_per_s"] > 0 and r["torchvision_per_s"] > 0
        # the ratio is taken before rounding the two rates for the table
        assert abs(r["ratio"] / (r["ours_per_s"] / r["torchvision_per_s"]) - 1) < 0.05


def test_train_mode_updates_weights_and_eval_does_not():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    before = model[0].weight.detach().clone()
    model_throughput(model, (3, 8, 8), 2, train=False, bf16=False, channels_last=False,
                     device=torch.device("cpu"), repeats=1)
    assert torch.equal(before, model[0].weight)
    model_throughput(model, (3, 8, 8), 2, train=True, bf16=False, channels_last=False,
                     device=torch.device("cpu"), repeats=1)
    assert not torch.equal(before, model[0].weight)


def test_conv_and_matmul_rates_and_report():
    rates = conv_vs_matmul(torch.device("cpu"), repeats=1, hw=16, n=256)
    assert rates["conv3x3_gflops"] > 0 and rates["matmul_gflops"] > 0
    text = "\n".join(format_backbones({
        "repeats": 1, "machine": "m", "load_at_start": "0.1 on 2 cores", "commit": "c", "time_utc": "t", "torch": "2",
        "backbones": [{"model": "resnet18", "mode": "eval", "variant": "fp32", "input": "2x3x32x32",
                       "ours_per_s": 10.0, "torchvision_per_s": 8.0, "ratio": 1.25}],
        "hannun34_1d": [], "conv_vs_matmul": rates, "pipelines": {}}))
    assert "| resnet18 | eval | fp32 | 2x3x32x32 | 10.0 | 8.0 | 1.25 |" in text


def test_each_speed_section_is_written_without_losing_the_others(tmp_path):
    import json

    # a speed.json from before sections holds the backbones report alone
    old = {"repeats": 1, "machine": "m", "load_at_start": "0", "commit": "c", "time_utc": "t", "torch": "2",
           "backbones": [], "hannun34_1d": [], "conv_vs_matmul": {"x": 1}, "pipelines": {}}
    (tmp_path / "speed.json").write_text(json.dumps(old))
    write_section("other", {"value": 3}, tmp_path, markdown=["## Other", "value 3"])
    doc = json.loads((tmp_path / "speed.json").read_text())
    assert doc["sections"]["backbones"] == old and doc["sections"]["other"] == {"value": 3}
    text = (tmp_path / "speed.md").read_text()
    assert text.index("Backbones against torchvision") < text.index("## Other") < text.index("value 3")


def test_a_variant_that_cannot_run_is_a_row_with_its_error(monkeypatch):
    class Broken(torch.nn.Module):  # what torch.compile returns where inductor cannot build its kernels
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            raise RuntimeError("no C++ compiler\nmore detail")

    def broken_compile(model, *a, **k):
        return Broken(model)

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = compare_with_torchvision(["resnet18"], size=32, batch=2, device=torch.device("cpu"), repeats=1,
                                    variants=["fp32+compile"])
    assert all(r["ratio"] is None and r["error"] == "RuntimeError: no C++ compiler" for r in rows)
    text = "\n".join(format_backbones({
        "repeats": 1, "machine": "m", "load_at_start": "0", "commit": "c", "time_utc": "t", "torch": "2",
        "backbones": rows, "hannun34_1d": [], "conv_vs_matmul": {}, "pipelines": {}}))
    assert "failed: RuntimeError: no C++ compiler" in text
