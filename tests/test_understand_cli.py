"""``python -m cnnapps explain`` and ``visualize`` on small checkpoints of each task's ci config (classify, ECG,
audio), made with the engine's ``fit`` and ``max_steps_per_epoch``: every method and mode writes its picture, bad
inputs are reported per file, user errors are one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnapps.__main__ import main
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import fit
from cnnapps.tasks import get_task
from cnnapps.understand.attribution import METHODS

pytestmark = pytest.mark.slow

SMOKE = {"classify": ["train.epochs=1", "train.max_steps_per_epoch=3"],
         "ecg": ["train.epochs=1", "train.max_steps_per_epoch=3", "data.max_records=200"],
         "audio": ["train.epochs=1", "train.max_steps_per_epoch=2", "data.max_per_class=3"]}


@pytest.fixture(scope="module")
def ckpts(data_root, tmp_path_factory):
    """best.pt of a few training steps of each task's shipped ci config."""
    out = {}
    for name, extra in SMOKE.items():
        task = get_task(name)
        cfg = load_config(task.Config, "ci", extra + ["train.threads=2"], search=task.config_dir())
        run = tmp_path_factory.mktemp(name)
        fit(task, cfg, run, data_root, quiet=True)
        out[name] = run / "checkpoints" / "best.pt"
    return out


@pytest.fixture(scope="module")
def inputs(data_root, tmp_path_factory):
    from cnnapps.tasks.ecg.prepare import cinc2017_source

    folder = tmp_path_factory.mktemp("inputs")
    with np.load(data_root / "mnist" / "mnist.npz") as z:
        digits = []
        for i in range(2):
            Image.fromarray(z["x_test"][i]).save(folder / f"digit{i}.png")
            digits.append(str(folder / f"digit{i}.png"))
    (folder / "broken.png").write_bytes(b"not an image")
    return {"classify": digits, "broken": str(folder / "broken.png"),
            "ecg": str(cinc2017_source(data_root).record_dir / "A00001"),
            "audio": str(data_root / "fsdd" / "recordings" / "3_theo_0.wav")}


def _rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_explain_every_method_on_images_and_a_bad_file(ckpts, inputs, tmp_path, capsys):
    for method in METHODS:
        status = main(["explain", "--checkpoint", str(ckpts["classify"]), *inputs["classify"], inputs["broken"],
                       "--method", method, "--out", str(tmp_path)])
        assert status == 1  # one input could not be read; the others were explained
        good, bad = _rows(capsys)[:2], _rows_last(tmp_path)
        assert bad["error"].startswith(inputs["broken"]) and "unreadable image" in bad["error"]
        for row in good:
            assert Path(row["png"]).stat().st_size > 5000 and np.load(row["npy"]).shape == (32, 32)
            assert row["target"] == row["label"]  # default: explain the predicted class
    cam = _rows_for(tmp_path, "gradcam")[0]
    assert cam["stage"] == 1  # LeNet-5's deepest stage wider than 1x1 (S4, 5x5)
    assert main(["explain", "--checkpoint", str(ckpts["classify"]), inputs["classify"][0], "--target", "3",
                 "--method", "saliency", "--out", str(tmp_path)]) == 0
    assert _rows(capsys)[0]["target"] == "3"


def _rows_last(folder: Path) -> dict:
    return json.loads((folder / "explain.jsonl").read_text().splitlines()[-1])


def _rows_for(folder: Path, method: str) -> list[dict]:
    return [r for r in map(json.loads, (folder / "explain.jsonl").read_text().splitlines()) if r.get("method") == method]


@pytest.mark.parametrize("method", ["gradcam", "integrated-gradients", "occlusion"])
def test_explain_an_ecg_record_per_predicted_rhythm(ckpts, inputs, tmp_path, capsys, method):
    assert main(["explain", "--checkpoint", str(ckpts["ecg"]), inputs["ecg"], "--method", method, "--seconds", "12",
                 "--out", str(tmp_path)]) == 0
    (row,) = _rows(capsys)
    saved = np.load(row["npz"])
    assert set(row["targets"]) <= set(row["probabilities"]) and row["targets"]
    assert set(saved.files) == {"signal", *row["targets"]}
    n = len(saved["signal"])
    assert n == 12 * 200 and all(saved[t].shape == (n,) for t in row["targets"])
    assert Path(row["png"]).stat().st_size > 20000


def test_explain_audio_over_the_spectrogram(ckpts, inputs, tmp_path, capsys):
    for method in ("gradcam", "saliency"):
        assert main(["explain", "--checkpoint", str(ckpts["audio"]), inputs["audio"], "--method", method,
                     "--out", str(tmp_path)]) == 0
        (row,) = _rows(capsys)
        assert np.load(row["npy"]).shape == (64, 63)  # 64 mel bins x frames of a 1 s clip at hop 128


@pytest.mark.parametrize("task", ["classify", "ecg", "audio"])
def test_visualize_filters_maximize_and_topk(ckpts, task, tmp_path, capsys, data_root, monkeypatch):
    monkeypatch.setenv("CNNAPPS_DATA", str(data_root))
    ck = str(ckpts[task])
    assert main(["visualize", "--checkpoint", ck, "--what", "filters", "--out", str(tmp_path)]) == 0
    row = _rows(capsys)[0]
    assert Path(row["png"]).stat().st_size > 5000
    assert len(row["weight_shape"]) == (3 if task == "ecg" else 4)
    target = ["--target", "1"] if task == "audio" else []
    assert main(["visualize", "--checkpoint", ck, "--what", "maximize", "--steps", "3", *target,
                 "--out", str(tmp_path)]) == 0
    row = _rows(capsys)[0]
    assert len(row["scores"]) == len(row["labels"]) and Path(row["png"]).is_file()
    assert main(["visualize", "--checkpoint", ck, "--what", "topk", "--k", "4", "--max-examples", "24",
                 "--out", str(tmp_path)]) == 0
    row = _rows(capsys)[0]
    assert len(row["patches"]) == 4 and Path(row["png"]).is_file()
    scores = [p["score"] for p in row["patches"]]
    assert scores == sorted(scores, reverse=True)


def test_user_errors_are_one_line(ckpts, inputs, tmp_path, capsys):
    assert main(["explain", "--checkpoint", str(ckpts["classify"]), inputs["classify"][0], "--target", "cat",
                 "--out", str(tmp_path)]) == 2
    assert "not a class of this model" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(tmp_path / "none.pt"), inputs["classify"][0],
                 "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["visualize", "--checkpoint", str(ckpts["classify"]), "--what", "maximize", "--stage", "1",
                 "--channel", "99", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "channel 99 out of range" in capsys.readouterr().err
