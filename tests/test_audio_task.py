"""Audio task: configs, model building for 2D and 1D backbones, the step (with mixup), predict on bad, odd and very
long files, and a smoke fit through the engine with a checkpoint round trip."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from cnnapps.engine.config import ConfigError, load_config
from cnnapps.tasks.audio.data import fix_length
from cnnapps.tasks.audio.task import AudioConfig, AudioModel, AudioTask
from cnnapps.tasks.base import DataSplits

from conftest import FSDD, needs_fsdd

CONFIGS = AudioTask.config_dir()


DATA = FSDD.parents[1] if FSDD is not None else None  # the data root that holds fsdd/recordings


@pytest.fixture(autouse=True)
def _threads_and_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    yield
    torch.set_num_threads(old)


def _state(classes: int = 10, sample_rate: int = 8000, clip: int = 8000) -> dict:
    return {"classes": [str(i) for i in range(classes)], "sample_rate": sample_rate, "clip_samples": clip,
            "norm_mean": [-40.0] * 64, "norm_std": [20.0] * 64}


def _model(cfg: AudioConfig | None = None, state: dict | None = None) -> AudioModel:
    cfg = cfg or AudioConfig()
    return AudioTask().build_model(cfg, DataSplits(None, None, None, state=state or _state())).eval()


# ---------------------------------------------------------------- configs and model


def test_default_is_the_dataclass_defaults():
    assert load_config(AudioConfig, "default", search=CONFIGS) == AudioConfig()


@pytest.mark.parametrize("name", ["fsdd_speaker.toml", "ci.toml"])
def test_shipped_configs_load(name: str):
    cfg = load_config(AudioConfig, CONFIGS / name)
    assert cfg.data.dataset == "fsdd"


def test_speaker_config_holds_out_a_speaker():
    cfg = load_config(AudioConfig, CONFIGS / "fsdd_speaker.toml")
    assert cfg.data.split == "speaker" and cfg.data.test_speakers


def test_model_on_spectrograms_and_on_waveforms():
    x = torch.randn(2, 8000) * 0.1
    assert _model()(x).shape == (2, 10)
    cfg = load_config(AudioConfig, None, ["model.input=waveform", "model.backbone=resnet18_1d"])
    m1 = _model(cfg, {**_state(), "norm_mean": [], "norm_std": []})
    assert m1(x).shape == (2, 10)
    assert m1.frontend(x).shape == (2, 1, 8000)


def test_backbone_dimension_must_fit_the_input():
    cfg = load_config(AudioConfig, None, ["model.backbone=resnet18_1d"])
    with pytest.raises(ConfigError, match="1D.*spectrogram"):
        _model(cfg)
    with pytest.raises(ConfigError, match="model.backbone = 'resnet19': no such backbone; did you mean resnet18"):
        _model(load_config(AudioConfig, None, ["model.backbone=resnet19"]))


def test_backbone_too_large_for_the_spectrogram_is_a_config_error():
    with pytest.raises(ConfigError, match="alexnet.*at least 67x67.*64x63"):
        _model(load_config(AudioConfig, None, ["model.backbone=alexnet"]))


@pytest.mark.parametrize("overrides", [
    ["model.backbone=nin"],
    ["model.backbone=seresnet18", "model.features=mfcc"],
    ["model.input=waveform", "model.backbone=hannun34_1d"],
    ["model.input=waveform", "model.backbone=resnet34_1d"],
])
def test_other_zoo_backbones_run_on_audio(overrides: list[str]):
    cfg = load_config(AudioConfig, None, overrides)
    state = _state()
    if cfg.model.input == "waveform":
        state.update(norm_mean=[], norm_std=[])
    elif cfg.model.features == "mfcc":
        state.update(norm_mean=[0.0] * cfg.model.n_mfcc, norm_std=[1.0] * cfg.model.n_mfcc)
    out = AudioTask().step(_model(cfg, state), {"wave": torch.randn(2, 8000) * 0.1, "y": torch.tensor([1, 2])}, cfg)
    assert out["output"].shape == (2, 10) and out["loss"].ndim == 0


def test_googlenet_aux_heads_add_to_the_training_loss():
    cfg = load_config(AudioConfig, None, ["model.backbone=googlenet", "model.kwargs.aux_logits=true"])
    model = _model(cfg).train()
    out = AudioTask().step(model, {"wave": torch.randn(4, 8000) * 0.1, "y": torch.tensor([0, 1, 2, 3])}, cfg)
    assert out["output"].shape == (4, 10)
    assert out["loss"] > F.cross_entropy(out["output"], torch.tensor([0, 1, 2, 3]),
                                         label_smoothing=cfg.train.label_smoothing)


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="model.input"):
        _model(load_config(AudioConfig, None, ["model.input=image"]))
    with pytest.raises(ConfigError, match="data.dataset"):
        AudioTask().build_data(load_config(AudioConfig, None, ["data.dataset=nope"]), Path("."))


def test_step_returns_loss_and_logits_and_mixes_up_in_training():
    cfg = load_config(AudioConfig, None, ["model.mixup_alpha=0.4", "model.gain_db=0", "model.noise_prob=0",
                                          "model.freq_mask=0", "model.time_mask=0"])
    model, task = _model(cfg), AudioTask()
    batch = {"wave": torch.randn(6, 8000) * 0.1, "y": torch.tensor([0, 1, 2, 3, 4, 5])}
    with torch.no_grad():
        out = task.step(model, batch, cfg)  # eval: plain cross-entropy, no mixup
        assert out["output"].shape == (6, 10)
        torch.testing.assert_close(out["loss"], F.cross_entropy(out["output"], batch["y"],
                                                                label_smoothing=cfg.train.label_smoothing))
        model.train()
        np.random.seed(3)
        torch.manual_seed(3)
        mixed = task.step(model, batch, cfg)
        np.random.seed(3)
        lam = np.random.beta(0.4, 0.4)
        torch.manual_seed(3)
        perm = torch.randperm(6)
        logits = model(lam * batch["wave"] + (1 - lam) * batch["wave"][perm])
        ls = cfg.train.label_smoothing
        expect = lam * F.cross_entropy(logits, batch["y"], label_smoothing=ls) + \
            (1 - lam) * F.cross_entropy(logits, batch["y"][perm], label_smoothing=ls)
        torch.testing.assert_close(mixed["loss"], expect)


# ---------------------------------------------------------------- predict


def _predict(model: AudioModel, paths: list[Path], state: dict | None = None, **kw) -> list[dict]:
    return list(AudioTask().predict(model, [str(p) for p in paths], state or _state(), AudioConfig(),
                                    torch.device("cpu"), **kw))


def test_predict_bad_files_report_errors_and_the_rest_go_on(tmp_path: Path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF$\x00\x00\x00WAVEfmt " + os.urandom(64))
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), dtype=np.float32), 8000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(6000, dtype=np.int16), 8000, subtype="PCM_16")
    stereo = tmp_path / "stereo44k.wav"
    t = np.arange(44100) / 44100
    burst = (np.abs(t - 0.5) < 0.2) * (0.2 + 0.8 * np.sin(np.pi * np.clip((t - 0.3) / 0.4, 0, 1)))
    sf.write(stereo, np.stack([np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 600 * t)], 1)
             * 0.3 * burst[:, None] + 1e-3 * np.random.default_rng(0).standard_normal((44100, 2)), 44100)
    missing = tmp_path / "missing.wav"
    rows = _predict(_model(), [corrupt, empty, silent, stereo, missing])
    assert [r["input"] for r in rows] == [str(p) for p in (corrupt, empty, silent, stereo, missing)]
    assert "corrupt.wav" in rows[0]["error"] and "label" not in rows[0]
    assert "empty.wav: empty audio" in rows[1]["error"]
    assert "error" not in rows[2] and rows[2]["label"] is None and rows[2]["sequence"] == []
    assert rows[2]["reason"].startswith("silent: every sample is zero")
    assert "error" not in rows[3] and rows[3]["mode"] == "clip" and rows[3]["seconds"] == 1.0
    assert "missing.wav: no such file" in rows[4]["error"]
    r = rows[3]
    assert r["label"] in _state()["classes"] and 0 < r["probability"] <= 1
    assert r["top"][0] == [r["label"], r["probability"]] and len(r["top"]) == 3
    assert r["sequence"] == [r["label"]] and len(r["segments"]) == 1
    assert 0.2 <= r["segments"][0]["start_s"] <= 0.4 and 0.6 <= r["segments"][0]["end_s"] <= 0.8
    for row in rows:
        json.dumps(row)
        assert "\n" not in row.get("error", "")


def test_predict_clip_is_the_evaluation_pipeline(tmp_path: Path):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(6000) * 0.1 * np.hanning(6000)).astype(np.float32)
    sf.write(tmp_path / "x.wav", x, 8000, subtype="FLOAT")
    model = _model()
    (row,) = _predict(model, [tmp_path / "x.wav"], top_k=10)
    with torch.no_grad():
        expect = model(torch.from_numpy(fix_length(x, 8000))[None]).softmax(1)[0]
    got = torch.zeros(10)
    for label, p in row["top"]:
        got[int(label)] = p
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)


def test_predict_flags_out_of_range_are_errors(tmp_path: Path):
    sf.write(tmp_path / "x.wav", np.zeros(100, dtype=np.float32), 8000)
    for kw in ({"hop": 0.0}, {"gate_margin_db": -1.0}, {"min_confidence": 2.0}):
        with pytest.raises(ConfigError, match="out of range"):
            _predict(_model(), [tmp_path / "x.wav"], **kw)


# ---------------------------------------------------------------- with real data and the engine


@needs_fsdd
def test_build_data_usual_split_state_and_batches():
    cfg = load_config(AudioConfig, CONFIGS / "ci.toml", ["data.max_per_class=6"])
    data = AudioTask().build_data(cfg, DATA)
    assert (len(data.train), len(data.val), len(data.test)) == (60, 60, 60)
    assert data.state["classes"] == [str(i) for i in range(10)]
    assert len(data.state["norm_mean"]) == len(data.state["norm_std"]) == cfg.model.n_mels
    assert all(Path(f).name.split("_")[2] in {"0.wav", "1.wav", "2.wav", "3.wav", "4.wav"} for f in data.test.files)
    item = data.test[0]
    assert item["wave"].shape == (8000,) and item["y"].dtype == torch.int64
    model = AudioTask().build_model(cfg, data)
    torch.testing.assert_close(model.frontend.norm_mean, torch.tensor(data.state["norm_mean"]))
    # Given a state (a finished model), the statistics are not refitted and training clips are not randomised.
    again = AudioTask().build_data(cfg, DATA, state={**data.state, "norm_mean": [1.0] * 64})
    assert again.state["norm_mean"] == [1.0] * 64
    assert data.train.train and not again.train.train
    assert torch.equal(again.train[0]["wave"], again.train[0]["wave"])


@needs_fsdd
def test_build_data_all_takes_every_file_of_a_folder(tmp_path: Path):
    src = DATA / "fsdd" / "recordings"
    for name in ["3_theo_0.wav", "3_theo_1.wav", "8_george_7.wav"]:
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "9_nobody_0.wav").write_bytes(b"not audio")
    data = AudioTask().build_data(AudioConfig(), tmp_path, state={**_state(), "norm_mean": [0.0] * 64,
                                                                  "norm_std": [1.0] * 64}, split="all")
    assert data.train is None and len(data.test) == 3
    assert sorted(int(data.test[i]["y"]) for i in range(3)) == [3, 3, 8]
    assert data.skipped == {"not a readable audio file": 1}


@needs_fsdd
def test_smoke_fit_checkpoint_and_predict_round_trip(tmp_path: Path):
    from cnnapps.engine.trainer import evaluate_checkpoints, fit, model_from_checkpoint

    task = AudioTask()
    cfg = load_config(AudioConfig, CONFIGS / "ci.toml",
                      ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8",
                       "data.max_per_class=3", "train.threads=1", "model.mixup_alpha=0.2"])
    run = tmp_path / "run"
    result = fit(task, cfg, run, DATA, quiet=True)
    assert 0 <= result.test_metrics["accuracy"] <= 1 and "macro_f1" in result.test_metrics
    assert "f1_0" in result.test_metrics
    assert (run / "checkpoints" / "best.pt").is_file()
    assert (run / "confusion.png").stat().st_size > 0 and (run / "examples.png").stat().st_size > 0

    model, cfg2, state = model_from_checkpoint(task, run / "checkpoints" / "best.pt")
    torch.testing.assert_close(model.frontend.norm_mean, torch.as_tensor(state["norm_mean"], dtype=torch.float32))
    data = task.build_data(cfg2, DATA, state=state)
    wav = data.test.files[5]
    (row,) = task.predict(model, [wav], state, cfg2, torch.device("cpu"), top_k=10)
    with torch.no_grad():
        expect = model(data.test[5]["wave"][None]).softmax(1)[0]
    # The checkpoint's normalisation and the evaluation clip pipeline come back exactly.
    assert row["label"] == state["classes"][int(expect.argmax())]
    assert row["probability"] == pytest.approx(float(expect.max()), abs=1e-4)

    values = evaluate_checkpoints(task, [run / "checkpoints" / "best.pt"], DATA, split="test", quiet=True).values
    assert values["accuracy"] == pytest.approx(result.test_metrics["accuracy"])


# ---------------------------------------------------------------- bench: timeline, long file, leave-one-speaker-out


def _small_fsdd(folder: Path, speakers: tuple[str, ...], indices: tuple[int, ...]) -> Path:
    """A copy of a few FSDD recordings in the FSDD layout (test 0-4, validation 5-9, train 10+)."""
    rec = folder / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for s in speakers:
        for d in range(10):
            for i in indices:
                shutil.copy(DATA / "fsdd" / "recordings" / f"{d}_{s}_{i}.wav", rec)
    return folder


@needs_fsdd
def test_bench_writes_the_timeline_benchmark_and_the_long_file_measurement(tmp_path: Path):
    from cnnapps.bench.run import run_task_bench

    root = _small_fsdd(tmp_path / "data", ("jackson", "theo"), (0, 5, 10, 11))
    md = run_task_bench(AudioTask(), "ci", root, overrides=[
        "train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=8", "train.threads=1",
        "bench.timeline_pauses=[[0.3, 1.0]]", "bench.long_file_minutes=0.1", "bench.picture=timeline.png"],
        results_dir=tmp_path / "results", quiet=True)
    doc = json.loads(md.with_suffix(".json").read_text())
    run = doc["runs"]["ci"]
    tables = {t["title"]: t for t in run["report"]["tables"]}
    table = tables["timeline benchmark"]
    assert [r[0] for r in table["rows"]] == ["0.3-1"] and table["rows"][0][1:3] == [2, 20]  # 2 recordings, 20 digits
    assert 0 <= run["extra"]["timeline event F1"] <= 1
    (long,) = tables["long-file predict"]["rows"]
    assert long[0] == "0.1 min" and long[-1] == 1 and long[7] >= long[6] > 0
    assert (tmp_path / "results" / "timeline.png").stat().st_size > 0
    text = md.read_text()
    assert "timeline benchmark:" in text and "| pauses (s) |" in text and "long-file predict:" in text


@needs_fsdd
def test_bench_leave_one_speaker_out_runs_each_speaker_once_and_reports_the_spread(tmp_path: Path):
    from cnnapps.bench.run import run_task_bench

    root = _small_fsdd(tmp_path / "data", ("jackson", "theo"), (0, 5, 10))
    cfg = load_config(AudioConfig, CONFIGS / "fsdd_loso.toml")
    folds = AudioTask().bench_runs(cfg, root)
    assert [name for name, _ in folds] == ["jackson", "theo"]
    assert all(c.data.split == "speaker" and c.data.test_speakers == [n] and not c.bench.loso for n, c in folds)
    md = run_task_bench(AudioTask(), "fsdd_loso", root, overrides=[
        "train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=8", "train.threads=1"],
        results_dir=tmp_path / "results", quiet=True)
    run = json.loads(md.with_suffix(".json").read_text())["runs"]["fsdd_loso"]
    runs_table = run["report"]["tables"][0]
    assert runs_table["title"] == "runs"
    rows = runs_table["rows"]
    assert [r[0] for r in rows] == ["jackson", "theo"]
    accs = [r[1] for r in rows]
    assert run["extra"]["accuracy mean over runs"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert run["extra"]["accuracy min over runs"] == min(accs) and run["extra"]["runs"] == 2
    assert run["test"]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert run["test"]["examples"] == 30  # every recording of the held-out speaker (indices 0, 5 and 10)
    assert "Test split (mean over the runs below)" in md.read_text()


@needs_fsdd
def test_loso_ablation_reruns_the_chosen_folds_without_each_augmentation():
    cfg = load_config(AudioConfig, CONFIGS / "fsdd_loso.toml",
                      ["bench.loso_speakers=[theo, george]", "bench.ablate=[speed, specaugment]", "model.speed=0.1"])
    runs = AudioTask().bench_runs(cfg, DATA)
    assert [n for n, _ in runs] == ["all/george", "all/theo", "no speed/george", "no speed/theo",
                                    "no specaugment/george", "no specaugment/theo"]
    by = dict(runs)
    assert by["all/theo"].model.speed == 0.1 and by["no speed/theo"].model.speed == 0.0
    assert by["no specaugment/george"].model.freq_mask == 0 and by["no specaugment/george"].model.speed == 0.1
    assert by["no speed/theo"].data.test_speakers == ["theo"] and not by["no speed/theo"].bench.ablate
    with pytest.raises(ConfigError, match="bench.loso_speakers: unknown speaker"):
        AudioTask().bench_runs(load_config(AudioConfig, CONFIGS / "fsdd_loso.toml", ["bench.loso_speakers=[bob]"]),
                               DATA)
    with pytest.raises(ConfigError, match="bench.ablate"):
        load_config(AudioConfig, CONFIGS / "fsdd_loso.toml", ["bench.ablate=[volume]"])


def test_bench_summarises_ablation_groups_separately():
    from cnnapps.bench.run import _combine_folds
    from cnnapps.engine.trainer import FitResult

    def fit(acc: float) -> FitResult:
        return FitResult(Path("."), {"accuracy": acc, "examples": 500}, 3, acc, 4, 10.0)

    fits = [(n, None, fit(a), 12.0) for n, a in (("all/a", 0.9), ("all/b", 0.8), ("no speed/a", 0.7),
                                                   ("no speed/b", 0.6))]
    test, extra, table = _combine_folds(fits, "accuracy")
    assert test["accuracy"] == pytest.approx(0.85)  # the first group's mean
    assert extra["all: accuracy mean over runs"] == 0.85 and extra["no speed: accuracy mean over runs"] == 0.65
    assert extra["no speed: worst run"] == "no speed/b" and extra["runs"] == 4
    assert [r[0] for r in table["rows"]] == ["all/a", "all/b", "no speed/a", "no speed/b"]
