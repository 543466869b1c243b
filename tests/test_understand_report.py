"""``understand-report --quick`` writes understanding.md/.json and its pictures: the paper's numbers in their own
columns beside ours, which come from the probe that ran."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cnnapps.understand.posenet import MODEL_NAMES, MODELS, PAPER_H, TARGETS
from cnnapps.understand.report import write_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(data_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("understanding")
    md = write_report(results_dir=base / "results", data_dir=data_root, quick=True, cache_dir=base / "cache",
                      timings=False)
    return md, json.loads(md.with_suffix(".json").read_text())


def test_report_files_and_pictures(report):
    md, record = report
    text = md.read_text()
    for heading in ("## Position information", "## Equivariance probe", "## Receptive fields", "## Pictures"):
        assert heading in text
    assert "Quick mode" in text and record["quick"] is True
    assert {"machine", "commit", "time_utc"} <= set(record)
    pictures = re.findall(r"\]\((understanding/[^)]+\.png)\)", text)
    assert len(pictures) >= 5
    for rel in pictures:
        assert (md.parent / rel).stat().st_size > 5000, rel
    assert {"gradcam_and_attributions.png", "ecg_attribution.png", "position_maps.png"} <= \
        {Path(p).name for p in pictures}
    assert any(Path(p).name.startswith("filters_") for p in pictures)


def test_paper_numbers_stand_beside_measured_ones(report):
    md, record = report
    text = md.read_text()
    rows = record["position"]["rows"]
    for model in MODELS:
        ours = next(r for r in rows if (r["model"], r["target"], r["kernel"], r["stages"], r["images"],
                                        r["padding"]) == (model, "H", 3, "all", "natural", "replicate"))
        spc, mae = PAPER_H[model]
        line = f"| {MODEL_NAMES[model]} | {spc:.3f} | {mae:.3f} | {ours['spc']:.3f} | {ours['mae']:.3f} |"
        assert line in text, line
    assert record["position"]["paper_H"]["vgg16"] == {"spc": 0.742, "mae": 0.149}
    # every model, target and test image was measured
    measured = {(r["model"], r["target"], r["images"]) for r in rows if r["padding"] == "replicate"}
    assert {(m, t, i) for m in MODELS for t in TARGETS for i in ("natural", "black", "white")} <= measured
    # the constant images: the raw-image read-out finds nothing, a zero-padded network does
    get = {(r["model"], r["target"], r["images"], r["padding"]): r["spc"] for r in rows}
    assert get["posenet", "H", "black", "replicate"] == 0.0
    assert get["vgg16", "H", "black", "replicate"] > 0.3


def test_equivariance_and_receptive_fields_in_the_record(report):
    _, record = report
    circular = [p for p in record["equivariance"] if p["padding"] == "circular" and "VGG" in p["name"]]
    assert circular and all(s["error"] < 1e-4 for p in circular for s in p["stages"] if s["error"] is not None)
    assert any("1D" in p["name"] for p in record["equivariance"])
    rf = {(r["backbone"], r["module"]): r["rf"] for r in record["receptive_fields"]}
    assert rf["vgg16", "features.30"] == 212 and rf["alexnet", "pool5"] == 195 and rf["lenet5", "c5"] == 32
