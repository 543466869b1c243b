"""Multi-lead ECG input: the lead alias table, monitor records whose non-ECG signals (PLETH, RESP, ABP) are never read
as leads wherever they sit, missing leads read in place with a warning naming record and lead, two-lead MIT-BIH
caches whose first lead is the one-lead cache, and predict on a two-lead model."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from cnnapps.engine.config import ConfigError, load_config
from cnnapps.tasks.ecg.leads import canonical_lead, choose_leads, parse_leads, same_lead, signal_kind
from cnnapps.tasks.ecg.prepare import (PrepParams, RecordSkip, folder_source, mitdb_source, prepare_signal,
                                       prepare_source, read_lead, read_leads)
from cnnapps.tasks.ecg.task import ECGConfig, ECGTask, _settings

TINY_MODEL = ["model.width=4", "model.num_blocks=8", "model.subsample_every=1", "model.increase_every=4",
              "model.kernel_size=8"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Caches of these tests go to a temporary folder, never the user's."""
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path / "cache"))


def _ecg(n: int, fs: float, rate_hz: float = 1.2, seed: int = 0) -> np.ndarray:
    """A crude ECG: a narrow Gaussian 'R wave' per beat plus a little noise (mV)."""
    t = np.arange(n) / fs
    phase = (t * rate_hz) % 1.0
    rng = np.random.default_rng(seed)
    return 1.2 * np.exp(-((phase - 0.5) ** 2) / (2 * 0.01 ** 2)) + 0.02 * rng.standard_normal(n)


def _pleth(n: int, fs: float) -> np.ndarray:
    t = np.arange(n) / fs
    return 50 + 20 * np.sin(2 * np.pi * 1.2 * t) ** 2


def _resp(n: int, fs: float) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * 0.25 * np.arange(n) / fs)


def _monitor(folder: Path, name: str, signals: list[tuple[str, str, np.ndarray]], fs: float = 250) -> None:
    """Write a WFDB record with the given (name, units, samples) signals, in that order."""
    wfdb.wrsamp(name, fs=fs, units=[u for _, u, _ in signals], sig_name=[n for n, _, _ in signals],
                p_signal=np.stack([x for _, _, x in signals], axis=1), fmt=["16"] * len(signals),
                write_dir=str(folder))


# ---------------------------------------------------------------- the alias table


@pytest.mark.parametrize("name,canonical", [
    ("MLII", "II"), ("II", "II"), ("ECG II", "II"), ("Lead II", "II"), ("D2", "II"), ("dii", "II"),
    ("MLI", "I"), ("MLIII", "III"), ("AVR", "aVR"), ("avl", "aVL"), ("aVF", "aVF"), ("V1", "V1"), ("MV1", "V1"),
    ("MCL1", "V1"), ("v5", "V5"), ("V4R", "V4R"), ("ECG", None), ("ECG1", None), ("PLETH", None), ("RESP", None),
])
def test_lead_names_map_to_their_canonical_lead(name, canonical):
    assert canonical_lead(name) == canonical


def test_same_lead_and_signal_kind_by_name_and_units():
    assert same_lead("MLII", "II") and same_lead("ii", "ECG II") and same_lead("ECG", "ecg")
    assert not same_lead("II", "III") and not same_lead("V1", "V2") and not same_lead("ECG", "II")
    assert signal_kind("MLII", "mV") == "ecg" and signal_kind("ECG", "") == "ecg"
    assert signal_kind("PLETH", "NU") == "ppg" and signal_kind("Pleth", "mV") == "ppg"  # the name decides
    assert signal_kind("RESP", "Ohm") == "resp" and signal_kind("ABP", "mmHg") == "pressure"
    assert signal_kind("ART", "mV") == "pressure" and signal_kind("SpO2", "%") == "ppg"
    assert signal_kind("channel 3", "mmHg") == "non-voltage"  # an unknown name: the units decide
    assert signal_kind("channel 1", "uV") == "ecg" and signal_kind("channel 1", "adu") == "unknown"
    assert signal_kind("II", "mmHg") == "non-voltage"  # a lead name with pressure units is no ECG


def test_parse_leads_refuses_repeats_and_all_beside_names():
    assert parse_leads("MLII, V1") == ["MLII", "V1"] and parse_leads(["all"]) == ["all"]
    with pytest.raises(ValueError, match="same lead"):
        parse_leads(["II", "MLII"])
    with pytest.raises(ValueError, match="alone"):
        parse_leads(["all", "II"])


# ---------------------------------------------------------------- monitor records


MONITOR_LAYOUTS = {
    "ecg_first": [("II", "mV"), ("PLETH", "NU"), ("RESP", "Ohm")],
    "pleth_first": [("PLETH", "NU"), ("II", "mV"), ("RESP", "Ohm")],
    "resp_first": [("RESP", "Ohm"), ("ABP", "mmHg"), ("II", "mV"), ("PLETH", "NU")],
    "ecg_last": [("PLETH", "NU"), ("RESP", "Ohm"), ("ART", "mmHg"), ("V", "mV")],
    "two_ecg": [("PLETH", "NU"), ("ECG II", "mV"), ("RESP", "Ohm"), ("V1", "mV")],
    "unnamed": [("Ch0", "mmHg"), ("Ch1", "mV"), ("Ch2", "%")],
}


def _write_layout(folder: Path, name: str, layout: list[tuple[str, str]], n: int = 2500, fs: float = 250) -> None:
    makers = {"ppg": _pleth, "resp": _resp, "pressure": lambda n, fs: 80 + 30 * _resp(n, fs),
              "non-voltage": lambda n, fs: 90 + _resp(n, fs)}
    signals = []
    for k, (sig, units) in enumerate(layout):
        kind = signal_kind(sig, units)
        signals.append((sig, units, _ecg(n, fs, seed=k) if kind == "ecg" else makers[kind](n, fs)))
    _monitor(folder, name, signals, fs)


@pytest.mark.parametrize("layout", list(MONITOR_LAYOUTS))
def test_monitor_records_never_read_a_non_ecg_signal(tmp_path, layout):
    spec = MONITOR_LAYOUTS[layout]
    _write_layout(tmp_path, layout, spec)
    ecg_names = [n for n, u in spec if signal_kind(n, u) == "ecg"]
    x, fs, lead = read_lead(tmp_path / layout)  # the first ECG signal, wherever it is
    assert lead == ecg_names[0] and fs == 250 and x.shape == (2500,)
    x, _, choice = read_leads(tmp_path / layout, ["all"])
    assert choice.names == ecg_names and x.shape == (2500, len(ecg_names))
    # a PPG or pressure waveform would sit far from the ECG's zero-mean, +-1.2 mV range
    assert np.abs(x.mean(0)).max() < 0.5 and x.max() < 1.5
    # two leads wanted, only one ECG signal: refused, never padded with PLETH or RESP
    if len(ecg_names) == 1:
        with pytest.raises(RecordSkip, match="not ECG") as info:
            read_leads(tmp_path / layout, ["II", "V1"], substitute=True)
        assert info.value.reason == "lead_not_found"
    with pytest.raises(RecordSkip) as info:
        read_lead(tmp_path / layout, "PLETH")  # named on purpose: still not an ECG lead
    assert info.value.reason == "lead_not_found"


def test_a_record_without_ecg_is_a_clear_error_and_a_counted_skip(tmp_path, caplog):
    folder = tmp_path / "monitor"
    folder.mkdir()
    _write_layout(folder, "noecg", [("PLETH", "NU"), ("RESP", "Ohm"), ("ABP", "mmHg")])
    _write_layout(folder, "ok", MONITOR_LAYOUTS["resp_first"])
    with pytest.raises(RecordSkip, match=r"no ECG signal among PLETH \(NU, ppg\), RESP \(Ohm, resp\)") as info:
        read_lead(folder / "noecg")
    assert info.value.reason == "no_ecg_signal"
    for params in (PrepParams(), PrepParams(leads=("all",)), PrepParams(leads=("II",), missing_lead="substitute")):
        cache = prepare_source(folder_source(folder), params)
        assert cache.names == ["ok"] and cache.skipped == {"no_ecg_signal": ["noecg"]}
        assert cache.records[0].leads == ["II"]


# ---------------------------------------------------------------- missing leads, several leads


def test_choose_leads_matches_aliases_and_substitutes_only_when_asked():
    names, units = ["V5", "MLII", "PLETH"], ["mV", "mV", "NU"]
    assert choose_leads(names, units, ["II"], "r").indices == [1]  # MLII ~ II
    assert choose_leads(names, units, [], "r").indices == [0]
    with pytest.raises(Exception, match="no lead 'V1'"):
        choose_leads(names, units, ["II", "V1"], "r")
    choice = choose_leads(names, units, ["II", "V1"], "r", substitute=True)
    assert choice.indices == [1, 0] and choice.names == ["MLII", "V5"] and choice.substituted == {"V1": "V5"}


@pytest.fixture(scope="module")
def mitdb_dir(data_root) -> Path:
    """The unpacked MIT-BIH folder in the default cache (module scope: set up before the per-test cache)."""
    return mitdb_source(data_root).record_dir


def _copy_mitdb(src: Path, folder: Path, names: list[str], seconds: int = 120) -> Path:
    """The first ``seconds`` of MIT-BIH records (signals as read, annotations up to there) as WFDB records."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        rec = wfdb.rdrecord(str(src / n), sampto=seconds * 360, physical=False)
        wfdb.wrsamp(n, fs=rec.fs, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal, fmt=rec.fmt,
                    adc_gain=rec.adc_gain, baseline=rec.baseline, write_dir=str(folder))
        ann = wfdb.rdann(str(src / n), "atr", sampto=seconds * 360)
        wfdb.wrann(n, "atr", ann.sample, ann.symbol, aux_note=ann.aux_note, write_dir=str(folder))
    return folder


def test_two_lead_mitdb_cache_keeps_the_one_lead_signal_and_warns_per_substitution(mitdb_dir, tmp_path, caplog):
    folder = _copy_mitdb(mitdb_dir, tmp_path / "mit", ["100", "101", "114"])  # MLII+V5, MLII+V1, V5+MLII
    one = prepare_source(folder_source(folder), PrepParams(lead="MLII"))
    with caplog.at_level(logging.WARNING, logger="cnnapps.tasks.ecg.prepare"):
        two = prepare_source(folder_source(folder), PrepParams(leads=("MLII", "V1"), missing_lead="substitute"))
    assert one.path != two.path and one.n_leads == 1 and two.n_leads == 2 and two.lead_names == ["MLII", "V1"]
    for i, name in enumerate(two.names):
        assert np.array_equal(two.signal(i, 0), one.signal(one.names.index(name)))  # lead 0: the one-lead cache
        assert two.signals(i).shape == (one.records[i].length, 2)
    by_name = {r.name: r for r in two.records}
    assert by_name["100"].leads == ["MLII", "V5"] and by_name["100"].substituted == {"V1": "V5"}
    assert by_name["101"].leads == ["MLII", "V1"] and not by_name["101"].substituted
    assert by_name["114"].leads == ["MLII", "V5"]  # MLII is 114's second signal
    assert two.index["lead_substitutions"] == {"100": {"V1": "V5"}, "114": {"V1": "V5"}}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("100" in m and "V1" in m and "V5" in m for m in warned)
    # the raw V5 of record 114 (its first signal), prepared alone, is lead 1 of the cache
    rec = wfdb.rdrecord(str(folder / "114"), channels=[0])
    assert rec.sig_name == ["V5"]
    v5, _ = prepare_signal(rec.p_signal[:, 0], rec.fs, PrepParams(), "114")
    assert np.array_equal(two.signal(two.names.index("114"), 1), v5)
    strict = prepare_source(folder_source(folder), PrepParams(leads=("MLII", "V1"), missing_lead="skip"))
    assert strict.names == ["101"] and strict.skipped == {"lead_not_found": ["100", "114"]}


def _two_lead_cfg(*extra: str) -> ECGConfig:
    return load_config(ECGConfig, None, TINY_MODEL + [
        "data.dataset=mitdb", "data.target=rhythm", "data.lead=MLII", 'data.leads=["MLII", "V1"]',
        "data.window=2048", "data.eval_window=8192", "data.train_records=[101]", "data.val_records=[114]",
        "data.test_records=[100]", *extra])


def test_two_lead_rhythm_windows_model_and_predict(mitdb_dir, tmp_path, caplog):
    root = tmp_path / "root"
    _copy_mitdb(mitdb_dir, root / "mitdb", ["100", "101", "114"])
    task = ECGTask()
    cfg = _two_lead_cfg()
    data = task.build_data(cfg, root)
    assert data.state["in_chans"] == 2 and data.state["lead_names"] == ["MLII", "V1"]
    item = data.train[0]
    assert item["x"].shape == (2, 2048) and data.val[0]["x"].shape[0] == 2
    batch = data.collate_fn([data.train[i] for i in range(3)])
    torch.manual_seed(0)
    model = task.build_model(cfg, data).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv1d))
    assert first_conv.in_channels == 2
    out = task.step(model, batch, cfg)
    assert out["output"].shape == (3, len(data.state["classes"]), 8) and torch.isfinite(out["loss"])

    folder = root / "mitdb"
    with caplog.at_level(logging.WARNING, logger="cnnapps.tasks.ecg.task"):
        r100, r101 = task.predict(model, [str(folder / "100"), str(folder / "101")], data.state, cfg,
                                  torch.device("cpu"))
    assert r101["leads"] == ["MLII", "V1"] and r100["leads"] == ["MLII", "V5"]
    assert any("100" in r.getMessage() and "V5" in r.getMessage() and "V1" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    (named,) = task.predict(model, [str(folder / "100")], data.state, cfg, torch.device("cpu"), lead="MLII,V5")
    assert named["leads"] == ["MLII", "V5"] and named["probabilities"] == r100["probabilities"]
    (wrong,) = task.predict(model, [str(folder / "100")], data.state, cfg, torch.device("cpu"), lead="MLII")
    assert "lead_not_found" in wrong["error"] and "2 lead(s)" in wrong["error"]


def test_lead_config_is_checked_when_it_loads():
    s = _settings(_two_lead_cfg(), None)
    assert s["leads"] == ["MLII", "V1"] and s["in_chans"] == 2
    assert _settings(load_config(ECGConfig, None, ["data.leads=all"]), None)["leads"] == ["all"]
    with pytest.raises(ConfigError, match="data.lead"):
        _settings(load_config(ECGConfig, None, ["data.lead=V1", "data.leads=MLII,V1"]), None)
    with pytest.raises(ConfigError, match="same lead"):
        _settings(load_config(ECGConfig, None, ["data.leads=II,MLII"]), None)
    with pytest.raises(ConfigError, match="missing_lead"):
        load_config(ECGConfig, None, ["data.missing_lead=guess"])
    # one lead: the cache key ignores missing_lead, so a one-lead config keeps its cache
    assert PrepParams(lead="MLII", missing_lead="substitute") == PrepParams(lead="MLII")


def test_all_leads_of_a_12_lead_record(data_root, tmp_path):
    folder = tmp_path / "twelve"
    folder.mkdir()
    for name in ("HR06000", "JS20000"):
        for f in (data_root / "cinc2021_sample").glob(f"{name}.*"):
            shutil.copy(f, folder / f.name)
    cache = prepare_source(folder_source(folder), PrepParams(leads=("all",)))
    assert cache.n_leads == 12 and cache.lead_names == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3",
                                                        "V4", "V5", "V6"]
    assert cache.signals(0).shape == (2000, 12)  # 10 s at 500 Hz -> 200 Hz
    raw = wfdb.rdrecord(str(folder / "HR06000")).p_signal
    ii = cache.signal(cache.names.index("HR06000"), 1)
    assert np.corrcoef(ii[::2][:900], raw[::5][:900, 1])[0, 1] > 0.9  # lead II is lead II
    assert cache.index["lead_substitutions"] == {}
