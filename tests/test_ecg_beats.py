"""Beats the way the field measures them: windows centred on R-peaks and RR features checked by hand on MIT-BIH
record 100, Q beats neither trained nor scored, per-beat Se/+P/F1, the QRS detector against the reference, damaged
records as counted skips in the beat path, the whole chain on a record without annotations, and a smoke fit."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from cnnapps.engine.config import ConfigError, load_config
from cnnapps.engine.task import DataSplits
from cnnapps.engine.trainer import fit
from cnnapps.tasks.ecg.beats import (IGNORE, RR_FEATURES, SCORED, BeatCutter, BeatDataset, BeatMetrics,
                                     classify_beats, cut_window, record_beats, rr_features)
from cnnapps.tasks.ecg.prepare import MITDB_DS2, PrepParams, mitdb_source, prepare
from cnnapps.tasks.ecg.qrs import QRSDetectionError, detect_r_peaks, score_detections
from cnnapps.tasks.ecg.task import ECGConfig, ECGTask

TINY = ["model.width=4", "model.num_blocks=3", "model.kernel_size=8", "model.beat_head.hidden=8",
        "model.beat_head.rr_hidden=4"]


@pytest.fixture(scope="module")
def mitdb(data_root):
    """The MIT-BIH cache (lead MLII, 200 Hz), shared with the other ECG tests."""
    return prepare(data_root, "mitdb", PrepParams(lead="MLII"))


def _beats_cfg(*extra: str) -> ECGConfig:
    return load_config(ECGConfig, "mitdb_beats", [*TINY, *extra], search=ECGTask.config_dir())


@pytest.fixture(scope="module")
def beat_data(mitdb, data_root) -> DataSplits:
    """The mitdb_beats splits (DS1 train and validation patients, DS2 test), built once."""
    return ECGTask().build_data(_beats_cfg(), data_root)


# ---------------------------------------------------------------- windows and RR features, checked by hand


def test_window_is_centred_on_the_r_peak_and_rr_features_match_record_100_by_hand(mitdb, beat_data, data_root):
    # Record 100 (360 Hz), from its .atr read here with wfdb: beats 6, 7, 8 at samples 1809 (N), 2044 (A, an
    # atrial premature beat) and 2402 (N); beats 2 and 12 at 662 and 3560.
    ann = wfdb.rdann(str(mitdb_source(data_root).record_dir / "100"), "atr")
    beats_360 = np.array([s for s, y in zip(ann.sample, ann.symbol) if y != "+"])
    assert beats_360[[2, 6, 7, 8, 12]].tolist() == [662, 1809, 2044, 2402, 3560]
    i = mitdb.names.index("100")
    rb = record_beats(mitdb, i, RR_FEATURES, local=10)
    assert rb.peaks[7] == round(2044 * 200 / 360) == 1136 and SCORED[rb.labels[7]] == "S"
    f = dict(zip(RR_FEATURES, rb.rr[7]))
    tol = 1.01 / 200  # R-peaks are on the 200 Hz grid: each interval is off by at most one sample
    assert f["pre"] == pytest.approx((2044 - 1809) / 360, abs=tol)  # 0.653 s: premature
    assert f["post"] == pytest.approx((2402 - 2044) / 360, abs=tol)  # 0.994 s: the compensatory pause
    assert f["local"] == pytest.approx((3560 - 662) / 10 / 360, abs=tol / 10)  # 10 intervals centred on beat 7
    average = (beats_360[-1] - beats_360[0]) / (len(beats_360) - 1) / 360
    assert f["average"] == pytest.approx(average, abs=1e-4)
    assert f["pre/average"] == pytest.approx(math.log(f["pre"] / f["average"]))
    assert f["pre/post"] == pytest.approx(math.log(f["pre"] / f["post"]))

    # the window has the R-peak sample at its centre, the record's median beat beside it
    data = beat_data
    test = data.test
    k = int(np.flatnonzero((test.items[:, 0] == i) & (test.items[:, 3] == 7))[0])
    item = test[k]
    w = data.state["beat_window"]
    signal = np.asarray(mitdb.signal(i))
    raw = signal[1136 - w // 2:1136 + w // 2]
    assert item["x"].shape == (2, w) and int(item["y"]) == SCORED.index("S")
    assert np.allclose(item["x"][0].numpy(), raw - np.median(raw), atol=1e-6)
    # and in record 100 (upright R waves in MLII) the window's maximum is the R-peak for nearly every beat
    normal = np.flatnonzero((test.items[:, 0] == i) & (test.items[:, 2] == 0))
    offsets = np.array([int(test[j]["x"][0].argmax()) - w // 2 for j in normal])
    assert np.mean(np.abs(offsets) <= 2) > 0.97
    # a stretched training window keeps the R-peak at its centre
    stretched = BeatDataset(mitdb, [rb], BeatCutter.for_stretch(w, "median", True, 0.2), np.zeros(len(RR_FEATURES)),
                            np.ones(len(RR_FEATURES)), stretch=0.2)
    offsets = np.array([int(stretched[j]["x"][0].argmax()) - w // 2 for j in np.flatnonzero(rb.labels == 0)[:300]])
    assert stretched[0]["x"].shape == (2, w) and np.mean(np.abs(offsets) <= 2) > 0.97
    # the RR features reach the model standardised by the training beats' statistics
    expected = (rb.rr[7] - np.asarray(data.state["rr_mean"])) / np.asarray(data.state["rr_std"])
    assert np.allclose(item["rr"].numpy(), expected, atol=1e-5)


def test_rr_features_at_the_record_ends_and_for_two_beats():
    peaks = np.array([0, 100, 300, 400])  # intervals 0.5, 1.0, 0.5 s at 200 Hz
    f = rr_features(peaks, 200, ("pre", "post", "average", "local_cv"), local=2)
    assert f[:, 0].tolist() == [0.5, 0.5, 1.0, 0.5] and f[:, 1].tolist() == [0.5, 1.0, 0.5, 0.5]
    assert np.allclose(f[:, 2], 2.0 / 3)
    two = rr_features(np.array([10, 210]), 200, ("pre", "post", "local"))
    assert np.allclose(two, 1.0)
    with pytest.raises(ValueError, match="at least two beats"):
        rr_features(np.array([5]), 200)


def test_cut_window_pads_beyond_the_record():
    sig = np.arange(10, dtype=np.float32)[None]
    w = cut_window(sig, 1, 6, baseline="none")
    assert w.tolist() == [[0, 0, 0, 1, 2, 3]]  # sample 1 at index 3, zeros before the record's start


# ---------------------------------------------------------------- Q beats and the scores


def test_q_beats_are_neither_trained_on_nor_scored(mitdb, beat_data):
    data = beat_data
    assert data.state["classes"] == ["N", "S", "V", "F"]
    for ds in (data.train, data.val, data.test):
        assert set(np.unique(ds.labels)) <= {0, 1, 2, 3}
    # DS2 holds 44,259 N, 1,837 S, 3,221 V, 388 F and 7 Q beats (de Chazal et al. 2004, table I)
    assert len(data.test) == 44259 + 1837 + 3221 + 388
    assert data.test.records.tolist() == [mitdb.names.index(n) for n in MITDB_DS2]
    # a Q beat still counts as a beat for the RR intervals of its neighbours (record 105 has five)
    i = mitdb.names.index("105")
    rb = record_beats(mitdb, i, ("pre",), 10)
    q = int(np.flatnonzero(mitdb.beats(i)[:, 1] == 4)[0])
    assert rb.labels[q] == IGNORE
    assert rb.rr[q + 1, 0] == pytest.approx((rb.peaks[q + 1] - rb.peaks[q]) / 200)


def test_beat_metrics_se_ppv_f1_hand_computed_and_unlabelled_beats_ignored():
    m = BeatMetrics(SCORED)
    # truth N N N S S V, predicted N N S S N V, plus a Q beat (-100) predicted V that must not count
    y = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 2])
    m.update(torch.nn.functional.one_hot(pred, 4).float() * 5, {"y": y, "record": torch.zeros(7, dtype=torch.long),
                                                                "beat": torch.arange(7)})
    m.update(torch.nn.functional.one_hot(pred[:2], 4).float(), {"y": y[:2], "record": torch.zeros(2, dtype=torch.long),
                                                                "beat": torch.arange(2)})  # repeats count once
    v = m.compute()
    assert v["beats"] == 6 and v["accuracy"] == pytest.approx(4 / 6)
    assert v["se_N"] == pytest.approx(2 / 3) and v["ppv_N"] == pytest.approx(2 / 3)
    assert v["se_S"] == pytest.approx(1 / 2) and v["ppv_S"] == pytest.approx(1 / 2)
    assert v["se_V"] == 1.0 and v["ppv_V"] == 1.0 and v["f1_V"] == 1.0
    assert "se_F" not in v and "ppv_F" not in v  # no F beats, none predicted: undefined, left out
    assert v["macro_f1"] == pytest.approx(np.mean([2 / 3, 1 / 2, 1.0])) and v["sv_f1"] == pytest.approx(0.75)
    assert m.artifacts()["beat_confusion"].tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


# ---------------------------------------------------------------- QRS detection and records without annotations


def test_detector_finds_the_annotated_beats_of_record_100(mitdb):
    i = mitdb.names.index("100")
    peaks = detect_r_peaks(np.asarray(mitdb.signal(i)), 200, "100")
    score = score_detections(mitdb.beats(i)[:, 0], peaks, 200)
    assert score.se > 0.995 and score.ppv > 0.995
    with pytest.raises(QRSDetectionError, match="flatrec"):
        detect_r_peaks(np.zeros(4000), 200, "flatrec")


def test_beats_on_a_record_without_annotations_and_the_whole_chain(mitdb, beat_data, data_root, tmp_path):
    src = mitdb_source(data_root).record_dir
    folder = tmp_path / "plain"
    folder.mkdir()
    for f in src.glob("100.*"):
        if f.suffix != ".atr":
            shutil.copy(f, folder / f.name)
    task = ECGTask()
    cfg = _beats_cfg()
    trained = beat_data
    model = task.build_model(cfg, trained).eval()
    data = task.build_data(cfg, folder, state=trained.state, split="all")
    assert len(data.test) == pytest.approx(2273, abs=5) and (data.test.labels == IGNORE).all()
    pred = classify_beats(model, np.asarray(mitdb.signal(mitdb.names.index("100"))), trained.state, where="100")
    assert len(pred.peaks) == len(data.test) and pred.probabilities.shape == (len(pred.peaks), 4)
    assert set(np.unique(pred.classes)) <= {0, 1, 2, 3}
    with pytest.raises(QRSDetectionError, match="short"):
        classify_beats(model, np.zeros(300), trained.state, where="short")


# ---------------------------------------------------------------- damaged records in the beat path


def _copy(src: Path, name: str, dst: Path, new: str) -> None:
    """Copy MIT-BIH record ``name`` as ``new`` (the header's record name and signal file renamed)."""
    for f in src.glob(f"{name}.*"):
        if f.suffix == ".hea":
            lines = f.read_text().splitlines()
            lines[0] = lines[0].replace(name, new, 1)
            lines[1:] = [ln.replace(f"{name}.dat", f"{new}.dat") for ln in lines[1:]]
            (dst / f"{new}.hea").write_text("\n".join(lines) + "\n")
        else:
            shutil.copy(f, dst / f"{new}{f.suffix}")


def _synthetic(folder: Path, name: str, signal: np.ndarray, fs: int = 360) -> None:
    """A one-lead MLII record with beat annotations every second."""
    wfdb.wrsamp(name, fs=fs, units=["mV"], sig_name=["MLII"], p_signal=signal[:, None], fmt=["16"],
                write_dir=str(folder))
    beats = np.arange(fs // 2, len(signal), fs)
    wfdb.wrann(name, "atr", beats, symbol=["N"] * len(beats), write_dir=str(folder))


@pytest.fixture
def damaged_mitdb(tmp_path, data_root) -> Path:
    """Two good annotated MIT-BIH records and one of each kind of damage, every record with a .atr file."""
    src = mitdb_source(data_root).record_dir
    folder = tmp_path / "damaged"
    folder.mkdir()
    _copy(src, "100", folder, "good1")
    _copy(src, "119", folder, "good2")
    _copy(src, "101", folder, "nodat")
    (folder / "nodat.dat").unlink()
    _copy(src, "103", folder, "cut")
    with open(folder / "cut.dat", "r+b") as fh:
        fh.truncate(3000)
    _copy(src, "105", folder, "liar")
    header = (folder / "liar.hea").read_text().splitlines()
    header[0] = header[0].replace(" 650000", " 325000")
    (folder / "liar.hea").write_text("\n".join(header) + "\n")
    _copy(src, "102", folder, "nolead")  # V5 and V2: no MLII
    t = np.arange(36000) / 360
    ecg = np.sin(2 * np.pi * 1.2 * t) ** 15
    gap = ecg.copy()
    gap[5000:5720] = np.nan  # 2 s of NaN
    _synthetic(folder, "nans", gap)
    _synthetic(folder, "flat", np.full(36000, 0.1))
    _synthetic(folder, "tiny", ecg[:400])  # 1.1 s: shorter than one step at 200 Hz
    _synthetic(folder, "onebeat", ecg[:500])  # 1.4 s, one annotated beat: no RR interval
    return folder


def test_damaged_records_are_counted_skips_in_the_beat_path(damaged_mitdb, beat_data):
    task = ECGTask()
    cfg = _beats_cfg()
    trained = beat_data
    data = task.build_data(cfg, damaged_mitdb, state=trained.state, split="all")
    assert data.skipped == {"missing_signal_file": 1, "truncated_signal": 1, "header_length_mismatch": 1,
                            "lead_not_found": 1, "nan_samples": 1, "flat_line": 1, "too_short": 1,
                            "too_few_beats": 1}
    names = [data.test.cache.records[r].name for r in data.test.records]
    assert names == ["good1", "good2"]
    assert len(data.test) == 2273 + 1987  # every N/S/V/F beat of records 100 and 119
    model = task.build_model(cfg, trained).eval()
    batch = torch.utils.data.default_collate([data.test[j] for j in range(0, len(data.test), 500)])
    out = task.step(model, batch, cfg)
    assert torch.isfinite(out["loss"]) and out["output"].shape == (len(batch["y"]), 4)


def test_a_step_mode_checkpoint_is_refused_with_a_clear_message(data_root):
    old = {"dataset": "mitdb", "target": "beats", "fs": 200, "lead": "MLII", "normalize": "zscore", "step": 256,
           "classes": ["N", "S", "V", "F", "Q"], "window": 8192, "eval_window": 65536, "in_chans": 1}
    with pytest.raises(ConfigError, match="step-labelled beats mode"):
        ECGTask().build_data(_beats_cfg(), data_root, state=old)


# ---------------------------------------------------------------- config and a smoke fit


def test_beats_config_builds_a_zoo_backbone_with_rr_features_at_the_head():
    cfg = load_config(ECGConfig, "mitdb_beats", search=ECGTask.config_dir())
    state = {"target": "beats", "classes": list(SCORED), "in_chans": 2, "beat_window": cfg.data.beats.window,
             "rr_features": list(cfg.data.beats.rr_features), "class_weights": [1.0] * 4}
    model = ECGTask().build_model(cfg, DataSplits(None, None, None, state=state))
    out = model(torch.zeros(3, 2, cfg.data.beats.window), torch.zeros(3, len(state["rr_features"])))
    assert out.shape == (3, 4)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "head"}
    assert cfg.train.monitor == "sv_f1"
    with pytest.raises(ConfigError, match="rr_features"):
        load_config(ECGConfig, "mitdb_beats", ["data.beats.rr_features=[\"pre\", \"soon\"]"],
                    search=ECGTask.config_dir())


def test_smoke_fit_on_beats_evaluates_and_reports(data_root, tmp_path):
    cfg = _beats_cfg("data.train_records=[\"101\", \"119\"]", "data.val_records=[\"118\"]",
                     "data.test_records=[\"100\"]", "train.epochs=1", "train.max_steps_per_epoch=3",
                     "train.batch_size=32", "train.threads=2")
    result = fit(ECGTask(), cfg, tmp_path / "run", data_root, quiet=True)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "se_N", "beats"} <= set(metrics) and metrics["beats"] == 2273
    assert result.test_metrics["macro_f1"] == metrics["macro_f1"]
    assert (run / "confusion_beats.png").is_file()
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["beats"]["test"] == 2273 and summary["records"] == {"train": 2, "val": 1, "test": 1}
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["data_state"]
    assert {"beat_window", "beat_margin", "rr_features", "rr_mean", "rr_std", "class_weights", "in_chans"} <= set(state)


def test_results_section_puts_de_chazal_beside_ours(tmp_path):
    from cnnapps.bench.results import format_markdown
    from cnnapps.tasks.ecg.beats import comparison_table

    test = {"se_V": 0.9, "ppv_V": 0.8, "f1_V": 2 * 0.72 / 1.7, "se_S": 0.8, "ppv_S": 0.5, "se_N": 0.95}
    table = comparison_table(test)
    assert table["rows"][2][:5] == ["V", "90.0", "77.7", "80.0", "81.9"] and "missed" in table["rows"][2][-1]
    assert table["rows"][1][-1].endswith("met")  # S: Se 80 >= 76, +P 50 >= 45
    assert table["rows"][3][1] == "n/a"  # no F score given
    record = {"task": "ecg", "config": "mitdb_beats", "time_utc": "t", "monitor": "sv_f1", "train_seconds": 1.0,
              "epochs": 1, "machine": "m", "commit": "c", "overrides": [], "test": test, "extra": {},
              "resolved_config": {}}
    (tmp_path / "metrics.json").write_text(json.dumps(test))  # the run folder bench_report reads
    record["report"] = ECGTask().bench_report(_beats_cfg(), tmp_path, tmp_path, "mitdb_beats")
    assert record["report"]["tables"] == [table]
    md = format_markdown({"task": "ecg", "runs": {"mitdb_beats": record}})
    assert "| V | 90.0 | 77.7 | 80.0 | 81.9 |" in md and "de Chazal" in md


def test_predict_with_a_beats_model_classifies_every_detected_beat(beat_data, data_root, tmp_path):
    folder = mitdb_source(data_root).record_dir
    task = ECGTask()
    cfg = _beats_cfg()
    model = task.build_model(cfg, beat_data).eval()
    t = np.arange(720) / 360
    wfdb.wrsamp("calm", fs=360, units=["mV"], sig_name=["MLII"], p_signal=0.1 * np.sin(2 * np.pi * t)[:, None],
                fmt=["16"], write_dir=str(tmp_path))  # 2 s without a heartbeat
    r100, r102, calm, missing = task.predict(model, [str(folder / "100"), str(folder / "102"), str(tmp_path / "calm"),
                                                     str(tmp_path / "nope")], beat_data.state, cfg, torch.device("cpu"))
    assert r100["lead"] == "MLII" and r100["fs"] == 360
    assert sum(r100["beat_counts"].values()) == len(r100["beats"]) == pytest.approx(2273, abs=5)
    first = r100["beats"][0]
    assert set(first) == {"time_s", "class", "p"} and first["class"] in SCORED and 0 < first["time_s"] < 1
    assert r102["lead"] == "V5" and len(r102["beats"]) > 1000  # no MLII: its first ECG signal, with a warning
    assert calm["error"].startswith("no_beats") and "calm" in calm["error"]
    assert "missing_record" in missing["error"]
