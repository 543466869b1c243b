"""Deployment: every registered backbone through torch.export (dynamic batch; dynamic spatial size where torch
allows it) and the ONNX dynamo exporter, compared with eager; `cnnapps export` on ECG, audio and image
checkpoints (files, preprocessing JSON, parity); `predict --onnx` giving the checkpoint's predictions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnapps.__main__ import main as cnnapps_main
from cnnapps.backbones import backbone_info, create_backbone, list_backbones
from cnnapps.export import (OnnxModule, check_parity, export_model, export_program, meta_path_for, read_meta,
                            save_program, total_stride)
from conftest import ci_config

# Where torch.export cannot keep the spatial size dynamic (checked: the export must say so, with a reason):
# LeNet-5's head needs a 1x1 C5 map (32x32 input), and the paper's AlexNet (no padding in conv1) is down to a
# 1x1 map before its adaptive pool at 96x96 inputs, a size torch specialises.
FIXED_SIZE = {"lenet5", "alexnet"}
SMALL = {"hannun34_1d": {"width": 8}, "nin": {"width": 48}}


def _example(name: str, model: torch.nn.Module, batch: int) -> torch.Tensor:
    info = backbone_info(name)
    stride = total_stride(model)
    # two strides' worth (the dynamic minimum) or the family's smallest input, whichever is larger
    size = [max(2 * stride, -(-s // stride) * stride) for s in info.min_input[1:]]
    if name in ("lenet5", "alexnet", "alexnet_tv", "zfnet"):  # 32x32 for LeNet-5, 96x96 for the AlexNet family
        size = list(info.default_input[1:]) if name == "lenet5" else [96] * info.dim
    return torch.randn(batch, info.min_input[0], *size, generator=torch.Generator().manual_seed(0))


def export_and_compare(name: str, folder: str) -> dict:
    """torch.export ``name`` (dynamic batch, and spatial size where allowed), then ONNX from the same program;
    both compared with eager at another batch and (where dynamic) a bigger size. Runs in a worker process."""
    torch.set_num_threads(1)  # one core per worker: ONNX translation is single-threaded Python anyway
    torch.manual_seed(0)
    model = create_backbone(name, **SMALL.get(name, {})).eval()
    x = _example(name, model, 2)
    program, spec = export_program(model, x)
    inputs = [torch.cat([x, x[:1]])]
    if not spec.fixed:
        grown = inputs[0]
        for axis in range(2, x.dim()):
            grown = torch.cat([grown, grown.narrow(axis, 0, total_stride(model))], dim=axis)
        inputs.append(grown)
    exported = check_parity(program.module(), model, inputs, tolerance=1e-5)
    # weights beside the graph: VGG's 500 MB then need no protobuf serialisation (seconds per net)
    onnx_file = save_program(program, "onnx", Path(folder) / f"{name}.onnx", optimize=False, external_data=True)
    onnx = check_parity(OnnxModule(onnx_file, threads=1), model, inputs, tolerance=1e-4)
    return {"dim": model.dim, "spec": spec, "exported": exported, "onnx": onnx,
            "shapes": [list(t.shape) for t in inputs]}


@pytest.fixture(scope="module")
def registry_exports(request, tmp_path_factory):
    """``export_and_compare`` for every registered backbone the session runs the test of, two at a time in worker
    processes (the exporters are single-threaded, so this halves the wall time on two cores): {name: result, or
    the exception}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    folder = str(tmp_path_factory.mktemp("registry_onnx"))
    workers = max(1, min(2, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        selected = [item.callspec.params["name"] for item in request.session.items
                    if getattr(item, "originalname", "") == "test_every_backbone_exports_and_matches_eager"]
        futures = {name: pool.submit(export_and_compare, name, folder) for name in selected}
        out = {}
        for name, future in futures.items():
            try:
                out[name] = future.result()
            except Exception as exc:  # noqa: BLE001 - the test of that backbone reports it
                out[name] = exc
    return out


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_exports_and_matches_eager(registry_exports, name):
    result = registry_exports[name]
    if isinstance(result, Exception):
        raise result
    spec = result["spec"]
    assert spec.shape[0] == "batch" and "batch" in spec.dynamic
    spatial = ["length"] if result["dim"] == 1 else ["height", "width"]
    if name in FIXED_SIZE:
        assert set(spec.fixed) == set(spatial) and spec.why_fixed, spec
    else:
        assert set(spec.dynamic) == {"batch", *spatial}, spec
        assert len(result["shapes"]) == 2  # compared at a size the export was not traced at, too
    exported, onnx = result["exported"], result["onnx"]
    assert exported.passed and exported.label_agreement == 1.0, exported
    assert onnx.passed and onnx.shapes == result["shapes"], onnx


def test_export_model_writes_the_json_and_refuses_a_bad_tolerance(tmp_path):
    model = create_backbone("resnet18_1d", num_classes=3)
    x = torch.randn(3, 1, 256)
    result = export_model(model, x, "exported", tmp_path / "r.pt2", preprocessing={"sample_rate": 200})
    meta = read_meta(result.path)
    assert meta["input"]["shape"] == ["batch", 1, "32*k"] and meta["preprocessing"] == {"sample_rate": 200}
    assert meta["parity"]["passed"] and meta["parity"]["shapes"] == [[3, 1, 256], [3, 1, 224]]
    assert "length: multiples of 32" in result.summary()
    from cnnapps.export import ExportError

    with pytest.raises(ExportError, match="differ from eager"):
        export_model(model, x, "exported", tmp_path / "s.pt2", tolerance=-1.0)


# ------------------------------------------------------------------ checkpoints of the tasks


@pytest.fixture(scope="session")
def checkpoints(data_root, tmp_path_factory):
    """Tiny checkpoints of three tasks: each ci config for 2 steps of one epoch (seconds; the metrics are noise,
    the export does not care)."""
    from cnnapps.engine.trainer import fit
    from cnnapps.tasks import get_task

    out = {}
    root = tmp_path_factory.mktemp("export_ckpt")
    for name in ("classify", "ecg", "audio"):
        task = get_task(name)
        cfg = ci_config(task, "train.epochs=1", "train.max_steps_per_epoch=2", "train.threads=1")
        fit(task, cfg, root / name, data_root, quiet=True)
        out[name] = root / name / "checkpoints" / "best.pt"
    return out


# the .pt2 format's save/load/parity path is test_export_model_writes_the_json's; ONNX here for the three tasks
EXPORTS = [("classify", "onnx"), ("ecg", "onnx"), ("audio", "onnx")]


@pytest.fixture(scope="session")
def exports(checkpoints, data_root, tmp_path_factory):
    """`cnnapps export` run once per (task, format): {(task, fmt): (exit status, what it printed, the file)}."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for task, fmt in EXPORTS:
        path = folder / f"{task}.{'onnx' if fmt == 'onnx' else 'pt2'}"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = cnnapps_main(["export", "--checkpoint", str(checkpoints[task]), "--format", fmt, "--out",
                               str(path), "--data-dir", str(data_root), "--examples", "4"])
        out[task, fmt] = rc, printed.getvalue(), path
    return out


@pytest.mark.parametrize("task,fmt", EXPORTS)
def test_cnnapps_export_on_task_checkpoints(exports, task, fmt):
    rc, printed, out = exports[task, fmt]
    assert rc == 0, printed
    assert out.is_file() and "largest |exported - eager|" in printed and "predicted labels agree" in printed
    meta = json.loads(meta_path_for(out).read_text())
    pre, parity = meta["preprocessing"], meta["parity"]
    assert meta["task"] == task and parity["passed"] and parity["label_agreement"] >= 0.99
    assert parity["shapes"][0][0] == 4 and pre["classes"] and pre["num_classes"] == len(pre["classes"])
    shape = meta["input"]["shape"]
    if task == "classify":  # LeNet-5 on 32x32 MNIST digits: fixed size, said with the reason
        assert shape == ["batch", 1, 32, 32] and meta["input"]["why_fixed"] and pre["input_size"] == [1, 32, 32]
        assert len(pre["mean"]) == 1 and len(pre["std"]) == 1
    elif task == "ecg":  # any length that is a multiple of the 256-sample label step
        assert shape == ["batch", 1, "256*k"] and pre["sample_rate"] == 200 and pre["data"]["step"] == 256
        assert len(parity["shapes"]) == 2 and parity["shapes"][1][-1] < parity["shapes"][0][-1]
    else:  # waveforms of the model's clip length, the log-mel front end inside the exported graph
        assert shape == ["batch", pre["input_samples"]] and pre["sample_rate"] == 8000
        assert meta["input"]["fixed"] == {"length": pre["input_samples"]}


def test_export_errors_are_one_line(checkpoints, tmp_path, capsys):
    rc = cnnapps_main(["export", "--checkpoint", str(tmp_path / "absent.pt"), "--format", "onnx"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("cnnapps export: error:") and "absent.pt" in err and "\n" not in err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 7, 7), np.float32))  # not what LeNet-5 takes
    rc = cnnapps_main(["export", "--checkpoint", str(checkpoints["classify"]), "--format", "exported",
                       "--input", str(bad), "--out", str(tmp_path / "x.pt2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("cnnapps export: error:") and "\n" not in err


def _predict(task: str, argv: list[str], capsys) -> list[dict]:
    from cnnapps.tasks.cli import main as task_main

    assert task_main(task, ["predict", *argv, "--quiet"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_predict_with_an_exported_model_gives_the_checkpoints_predictions(checkpoints, exports, data_root,
                                                                          capsys):
    from cnnapps.tasks.ecg.prepare import mitdb_source

    image = sorted((data_root / "pennfudan" / "images").glob("*.jpg"))[0]
    record = str(mitdb_source(data_root).record_dir / "100")
    for task, inputs in (("classify", [str(image)]), ("ecg", [record])):
        out = exports[task, "onnx"][2]
        eager = _predict(task, ["--checkpoint", str(checkpoints[task]), *inputs], capsys)
        onnx = _predict(task, ["--onnx", str(out), *inputs], capsys)
        assert len(eager) == len(onnx) == len(inputs)
        for a, b in zip(eager, onnx):
            assert a["label"] == b["label"] and "error" not in b
            pa = a.get("probability", None) or max(a["probabilities"].values())
            pb = b.get("probability", None) or max(b["probabilities"].values())
            assert pa == pytest.approx(pb, abs=1e-3)
    # an export of another task is refused in one line
    from cnnapps.tasks.cli import main as task_main

    assert task_main("audio", ["predict", "--onnx", str(exports["ecg", "onnx"][2]), record, "--quiet"]) == 2
    assert "not 'audio'" in capsys.readouterr().err


def test_deployment_section_joins_speed_md_without_dropping_the_others(tmp_path):
    from cnnapps.bench.deploy import format_deployment
    from cnnapps.bench.speed import write_section

    write_section("engine", {"x": 1}, tmp_path, markdown=["## Engine", "", "engine numbers"])
    deployment = {"repeats": 2, "threads": 2, "batches": [1, 32], "agreement": [], "facts": {"commit": "def"},
                  "rows": [{"model": "lenet5", "runtime": "eager", "batch": 1, "input": "1x1x32x32",
                            "ms_per_batch": 0.2, "examples_per_s": 5000.0, "vs_eager": 1.0},
                           {"model": "lenet5", "runtime": "compile", "batch": 1, "input": "1x1x32x32",
                            "error": "no compiler"}]}
    md = write_section("deployment", deployment, tmp_path, markdown=format_deployment(deployment)).read_text()
    assert "engine numbers" in md and "## Deployment" in md and "| lenet5 | 1 | 1x1x32x32 | eager | 0.2 |" in md
    assert "failed: no compiler" in md and "commit: def" in md
    doc = json.loads((tmp_path / "speed.json").read_text())
    assert set(doc["sections"]) == {"engine", "deployment"}


def test_load_model_gives_the_model_with_its_preprocessing(checkpoints):
    import cnnapps

    for task, path in checkpoints.items():
        model, pre = cnnapps.load_model(path)
        assert pre["task"] == task and not model.training
        assert model.pretrained_cfg == pre["pretrained_cfg"] and pre["pretrained_cfg"]["source"] == str(path)
        assert pre["pretrained_cfg"]["num_classes"] == len(pre["pretrained_cfg"]["classes"])
