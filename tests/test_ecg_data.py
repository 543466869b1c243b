"""ECG data on the real CinC 2017 and MIT-BIH records: unpacking, prepared caches, labels lined up with the signal,
windows, splits, no WFDB reads in an epoch, predict on real records, a smoke fit and the config files."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import fit
from cnnapps.tasks.ecg.data import (IGNORE, Augment, EvalWindows, RhythmLabeler, TrainWindows, class_weights,
                                    collate_windows, merge_segments, n_valid_steps, rhythm_class_lookup)
from cnnapps.tasks.ecg.prepare import (BEAT_CLASSES, MITDB_DS1, MITDB_DS2, MITDB_PACED, PrepParams, clean_rhythm,
                                       mitdb_source, prepare, read_reference, resample)
from cnnapps.tasks.ecg.task import ECGConfig, ECGTask

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.width=4", "model.num_blocks=8", "model.subsample_every=1", "model.increase_every=4",
              "model.kernel_size=8"]


@pytest.fixture(scope="session")
def mitdb(data_root):
    """The MIT-BIH cache (lead MLII, 200 Hz), prepared once (a few seconds; reused from disk afterwards)."""
    return prepare(data_root, "mitdb", PrepParams(lead="MLII"))


@pytest.fixture(scope="session")
def cinc(data_root):
    """The CinC 2017 cache (200 Hz), prepared once: about 40 s cold on a busy 2-core machine, 0.1 s warm."""
    return prepare(data_root, "cinc2017", PrepParams())


def _mitdb_cfg(*extra: str) -> ECGConfig:
    return load_config(ECGConfig, None, ["data.dataset=mitdb", "data.target=rhythm", "data.lead=MLII",
                                         "data.window=8192", "data.eval_window=65536", *extra])


# ---------------------------------------------------------------- raw records and caches


def test_record_100_reads_as_650000x2_at_360hz_with_2274_annotations(data_root):
    folder = mitdb_source(data_root).record_dir  # unpacked from mitdb.tar.xz into the cache
    rec = wfdb.rdrecord(str(folder / "100"))
    assert rec.p_signal.shape == (650000, 2) and rec.fs == 360 and rec.sig_name == ["MLII", "V5"]
    assert len(wfdb.rdann(str(folder / "100"), "atr").sample) == 2274


def test_cinc_cache_has_every_record_and_the_reference_label_counts(cinc, data_root):
    reference = read_reference(data_root / "cinc2017" / "REFERENCE.csv")
    skipped = {name for names in cinc.skipped.values() for name in names}
    assert len(cinc) == 8528 - len(skipped)
    expected = Counter(label for name, label in reference.items() if name not in skipped)
    assert cinc.index["label_counts"] == dict(expected)
    assert dict(expected) == {"N": 5050, "A": 738, "O": 2456, "~": 284}  # REFERENCE.csv as published
    assert cinc.index["skipped"] == {}  # the shared copy is complete (SOURCE.md): nothing to skip
    r = cinc.records[0]
    assert (r.name, r.label, r.orig_fs, r.orig_length) == ("A00001", "N", 300.0, 9000)
    assert r.length == 6000  # 30 s at 200 Hz
    assert all(rec.length == math.ceil(rec.orig_length * 2 / 3) for rec in cinc.records[:50])
    x = cinc.signal(0)
    assert x.dtype == np.float32 and abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_mitdb_cache_beats_match_de_chazal(mitdb):
    assert mitdb.skipped == {"lead_not_found": ["102", "104"]}  # the two records without MLII
    counts = {}
    for name, ds in (("DS1", MITDB_DS1), ("DS2", MITDB_DS2)):
        total = np.zeros(5, int)
        for i, r in enumerate(mitdb.records):
            if r.name in ds:
                total += np.bincount(mitdb.beats(i)[:, 1], minlength=5)
        counts[name] = dict(zip(BEAT_CLASSES, total.tolist()))
    # the beat counts of de Chazal et al. 2004, Table I
    assert counts["DS1"] == {"N": 45866, "S": 944, "V": 3788, "F": 415, "Q": 8}
    assert counts["DS2"] == {"N": 44259, "S": 1837, "V": 3221, "F": 388, "Q": 7}
    assert "AFIB" in mitdb.rhythm_names and all("\x00" not in n and "(" not in n for n in mitdb.rhythm_names)


def test_cached_signal_is_the_resampled_record(mitdb, data_root):
    folder = mitdb_source(data_root).record_dir
    i = mitdb.names.index("201")
    raw = wfdb.rdrecord(str(folder / "201"), channels=[0]).p_signal[:, 0]
    ref = resample(raw, 360, 200)
    ref = (ref - ref.mean()) / ref.std()
    got = mitdb.signal(i)
    assert len(got) == len(ref) == math.ceil(650000 * 200 / 360)
    assert np.allclose(got[100000:101000], ref[100000:101000], atol=1e-4)


# ---------------------------------------------------------------- labels line up


def _afib_episode(data_root, record: str) -> tuple[int, int]:
    """(start, end) in 360 Hz samples of the longest AFIB episode, read independently with wfdb.rdann."""
    ann = wfdb.rdann(str(mitdb_source(data_root).record_dir / record), "atr")
    marks = [(int(s), clean_rhythm(a)) for s, sym, a in zip(ann.sample, ann.symbol, ann.aux_note) if sym == "+"]
    spans = [(s, marks[k + 1][0] if k + 1 < len(marks) else 650000) for k, (s, name) in enumerate(marks)
             if name == "AFIB"]
    return max(spans, key=lambda span: span[1] - span[0])


@pytest.mark.parametrize("record", ["201", "203"])
def test_a_window_inside_an_afib_episode_is_labelled_afib(mitdb, data_root, record):
    start, end = _afib_episode(data_root, record)
    centre_200 = int((start + end) / 2 * 200 / 360)
    i = mitdb.names.index(record)
    classes = ["N", "AFIB", "AFL", "B", "T", "VT", "SVTA", "OTHER"]
    labeler = RhythmLabeler(mitdb, rhythm_class_lookup(mitdb.rhythm_names, classes, ["SBR=N"]))
    windows = EvalWindows(mitdb, [i], labeler, window=8192)
    item = next(windows[k] for k in range(len(windows))
                if windows[k]["offset"] * 256 <= centre_200 < windows[k]["offset"] * 256 + windows[k]["length"])
    step = (centre_200 - item["offset"] * 256) // 256
    assert classes[int(item["y"][step])] == "AFIB"
    # and the signal in that window is the cache's signal at the same place
    assert torch.equal(item["x"][0, step * 256:(step + 1) * 256],
                       torch.from_numpy(np.array(mitdb.signal(i)[item["offset"] * 256 + step * 256:][:256])))


def test_rhythm_before_the_first_annotation_and_unmapped_rhythms_are_ignored(mitdb):
    lookup = rhythm_class_lookup(mitdb.rhythm_names, ["N", "AFIB"], aliases=[], other="OTHER")
    names = mitdb.rhythm_names
    assert lookup[names.index("N")] == 0 and lookup[names.index("AFIB")] == 1
    assert lookup[names.index("VT")] == IGNORE and lookup[255] == IGNORE
    with_other = rhythm_class_lookup(names, ["N", "OTHER"], aliases=["SBR=N"])
    assert with_other[names.index("SBR")] == 0 and with_other[names.index("VT")] == 1


# ---------------------------------------------------------------- windows


def test_short_records_are_padded_and_padding_steps_ignored(cinc):
    from cnnapps.tasks.ecg.data import RecordLabeler, record_labels_for_cinc

    short = min(range(len(cinc)), key=lambda i: cinc.records[i].length)
    length = cinc.records[short].length  # 9 s -> 1,809 samples at 200 Hz
    labeler = RecordLabeler(record_labels_for_cinc(cinc))
    item = TrainWindows(cinc, [short], labeler, window=6144, time_shift=False)[0]
    assert item["x"].shape == (1, 6144) and item["y"].shape == (24,)
    assert torch.equal(item["x"][0, :length], torch.from_numpy(np.array(cinc.signal(short))))
    assert torch.all(item["x"][0, length:] == 0)
    valid = n_valid_steps(length)
    assert (item["y"][:valid] >= 0).all() and (item["y"][valid:] == IGNORE).all()
    # with time_shift a short record starts at a random sample below one step
    shifted = TrainWindows(cinc, [short], labeler, window=6144)
    signal = np.array(cinc.signal(short))
    torch.manual_seed(0)
    starts = set()
    for _ in range(8):
        x = shifted[0]["x"][0].numpy()
        starts.add(next(s for s in range(256) if np.array_equal(x[:64], signal[s:s + 64])))
    assert len(starts) > 1


def test_evaluation_covers_every_sample_exactly_once(mitdb):
    ids = np.arange(len(mitdb))[:5]
    ds = EvalWindows(mitdb, ids, RhythmLabeler(mitdb, rhythm_class_lookup(mitdb.rhythm_names, ["N"])), 65536)
    covered = {int(r): np.zeros(mitdb.records[int(r)].length, int) for r in ids}
    for k in range(len(ds)):
        it = ds[k]
        covered[it["record"]][it["offset"] * 256: it["offset"] * 256 + it["length"]] += 1
    assert all((c == 1).all() for c in covered.values())
    batch = collate_windows([ds[0], ds[len(ds) - 1]])
    assert batch["x"].shape[-1] % 256 == 0 and batch["y"].shape[-1] == batch["x"].shape[-1] // 256
    short = int(batch["length"].min())
    row = int(batch["length"].argmin())
    assert (batch["x"][row, 0, short:] == 0).all() and (batch["y"][row, -(-short // 256):] == IGNORE).all()


def test_an_epoch_reads_no_wfdb_file(data_root, cinc, mitdb, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("an epoch must not read WFDB files")

    for name in ("rdrecord", "rdsamp", "rdann", "rdheader"):
        monkeypatch.setattr(wfdb, name, forbidden)
    task = ECGTask()
    for cfg in (load_config(ECGConfig, None, ["data.max_records=200"]), _mitdb_cfg()):
        data = task.build_data(cfg, data_root)
        loader = torch.utils.data.DataLoader(data.train, batch_size=16, shuffle=True, collate_fn=data.collate_fn)
        for k, batch in enumerate(loader):
            assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64
            if k == 3:
                break
        for k in range(min(len(data.val), 20)):
            data.val[k]


def test_splits_are_disjoint_stratified_and_repeatable(data_root, cinc):
    task = ECGTask()
    cfg = load_config(ECGConfig, None, [])
    a, b = task.build_data(cfg, data_root), task.build_data(cfg, data_root)
    sets = [set(ds.records.tolist()) for ds in (a.train, a.val, a.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    dropped = sum(len(group) - 1 for group in a.state["duplicates_removed"])
    assert dropped == 2  # A01176 = A00227 and A03123 = A02656 (test_ecg_split.py)
    assert sum(map(len, sets)) == len(cinc) - dropped
    assert [len(s) for s in sets] == [6820, 853, 853]
    assert all(np.array_equal(x.records, y.records) for x, y in ((a.train, b.train), (a.test, b.test)))
    labels = np.array([r.label for r in cinc.records])
    for s in sets:  # stratified: each split keeps the overall share of AF within a record
        assert abs(np.mean(labels[list(s)] == "A") - 738 / 8528) < 0.01
    other = task.build_data(load_config(ECGConfig, None, ["data.split_seed=1"]), data_root)
    assert not np.array_equal(other.test.records, a.test.records)


def test_mitdb_split_is_inter_patient(data_root, mitdb):
    data = ECGTask().build_data(_mitdb_cfg(), data_root)
    names = [{mitdb.names[i] for i in ds.records} for ds in (data.train, data.val, data.test)]
    assert names[2] == set(MITDB_DS2)
    assert names[0] | names[1] == set(MITDB_DS1) and not names[0] & names[1]
    assert not (names[0] | names[1]) & names[2]
    assert not set(MITDB_PACED) & set().union(*names)
    with pytest.raises(Exception, match="disjoint"):
        ECGTask().build_data(_mitdb_cfg("data.val_records=[100]"), data_root)


# ---------------------------------------------------------------- weights, augmentation, configs


def test_class_weights_inverse_frequency_clipped():
    w = class_weights(np.array([900, 90, 10, 0]), "inverse", max_weight=10.0)
    # total 1000 over 3 present classes: 1000 / (3 * n), then clipped to [0.1, 10]; absent class: 1
    assert np.allclose(w, [1000 / 2700, 1000 / 270, 10.0, 1.0], atol=1e-6)
    assert np.allclose(class_weights(np.array([1, 1]), "none"), 1)


def test_weighted_sampler_favours_tiles_with_rare_rhythms(data_root):
    data = ECGTask().build_data(_mitdb_cfg("data.weighted_sampler=true"), data_root)
    w = data.sample_weights.numpy()
    assert len(w) == len(data.train)
    vt = data.state["classes"].index("VT")
    has_vt = np.array([(data.train.tile_labels(i) == vt).any() for i in range(len(data.train))])
    assert has_vt.any() and w[has_vt].min() > np.median(w[~has_vt])


def test_augmentation_changes_amplitude_and_baseline_only_where_asked():
    x = torch.sin(torch.linspace(0, 60, 2000))[None]
    torch.manual_seed(0)
    assert torch.equal(Augment(200)(x), x)  # everything off
    torch.manual_seed(0)
    a = Augment(200, scale=0.2, wander=0.5, noise=0.1)(x)
    torch.manual_seed(0)
    b = Augment(200, scale=0.2, wander=0.5, noise=0.1)(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    scaled = Augment(200, scale=0.2)(x)
    ratio = (scaled / x)[x.abs() > 0.5]
    assert torch.allclose(ratio, ratio[0]) and 0.8 <= float(ratio[0]) <= 1.2


def test_default_config_is_the_dataclass_defaults():
    assert load_config(ECGConfig, "default", search=ECGTask.config_dir()) == ECGConfig()


@pytest.mark.parametrize("name", ["default", "ci", "hannun", "mitdb_rhythm"])  # mitdb_beats: test_ecg_beats
def test_every_config_file_loads_and_builds_its_model(name):
    cfg = load_config(ECGConfig, name, search=ECGTask.config_dir())
    from cnnapps.tasks.base import DataSplits
    from cnnapps.tasks.ecg.task import _settings

    state = _settings(cfg, None)
    model = ECGTask().build_model(cfg, DataSplits(None, None, None, state=state))
    out = model(torch.zeros(2, 1, cfg.data.window))
    assert out.shape == (2, len(state["classes"]), cfg.data.window // 256)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "head"}
    if cfg.data.dataset == "mitdb":
        assert cfg.train.monitor == "seq_f1"


def test_merge_segments():
    assert merge_segments(np.array([0, 0, 1, 1, 1, 0]), 1.28) == [
        (0.0, 2.56, 0), (2.56, pytest.approx(6.4), 1), (pytest.approx(6.4), pytest.approx(7.68), 0)]


# ---------------------------------------------------------------- predict and a smoke fit


def _tiny_model(state_overrides: list[str]):
    from cnnapps.tasks.base import DataSplits
    from cnnapps.tasks.ecg.task import _settings

    cfg = load_config(ECGConfig, None, TINY_MODEL + state_overrides)
    state = _settings(cfg, None)
    torch.manual_seed(0)
    return ECGTask().build_model(cfg, DataSplits(None, None, None, state=state)).eval(), cfg, state


def test_predict_on_a_360hz_record_and_by_lead_name(data_root, tmp_path):
    folder = mitdb_source(data_root).record_dir
    model, cfg, state = _tiny_model(["data.dataset=mitdb", "data.target=rhythm", "data.lead=MLII"])
    task = ECGTask()
    rows = list(task.predict(model, [str(folder / "100"), str(folder / "114.hea"), str(folder / "102")], state,
                             cfg, torch.device("cpu"), plot=True, out_dir=tmp_path, steps=True,
                             answers=tmp_path / "answers.txt"))
    r100, r114, r102 = rows
    assert r114["input"] == str(folder / "114.hea")
    # one CinC-style line per record, the record's label; per-step probabilities on request
    assert (tmp_path / "answers.txt").read_text().splitlines() == [f"{n},{r['label']}" for n, r in
                                                                    zip(("100", "114", "102"), rows)]
    assert (len(r100["steps"]) - 1) * 1.28 < r100["duration_s"] <= len(r100["steps"]) * 1.28  # steps cover it
    assert r100["step_s"] == 256 / 200 and len(r100["steps"][0]) == len(state["classes"])
    assert np.argmax(np.mean(r100["steps"], 0)) == state["classes"].index(r100["label"])
    assert r100["fs"] == 360 and r100["lead"] == "MLII" and r100["duration_s"] == pytest.approx(650000 / 360)
    assert r100["label"] in state["classes"] and sum(r100["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    segs = r100["segments"]
    assert segs[0]["start_s"] == 0 and segs[-1]["end_s"] <= r100["duration_s"]
    assert all(a["end_s"] == pytest.approx(b["start_s"]) and a["rhythm"] != b["rhythm"]
               for a, b in zip(segs, segs[1:]))
    assert r114["lead"] == "MLII"  # MLII is the second signal of record 114
    assert r102["lead"] == "V5"  # no MLII: the first signal
    assert Path(r100["picture"]).is_file() and Path(r100["picture"]).stat().st_size > 10000
    (named,) = task.predict(model, [str(folder / "100")], state, cfg, torch.device("cpu"), lead="V5")
    assert named["lead"] == "V5" and named["probabilities"] != r100["probabilities"]
    (missing,) = task.predict(model, [str(folder / "100")], state, cfg, torch.device("cpu"), lead="V1")
    assert "lead_not_found" in missing["error"] and "V1" in missing["error"]
    (cinc_row,) = task.predict(model, [str(tmp_path / "nope")], state, cfg, torch.device("cpu"))
    assert "missing_record" in cinc_row["error"]


def test_smoke_fit_evaluates_and_reports(data_root, tmp_path, cinc):
    cfg = load_config(ECGConfig, None, TINY_MODEL + [
        "data.max_records=96", "data.window=1024", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.batch_size=16", "train.threads=2"])
    result = fit(ECGTask(), cfg, tmp_path / "run", data_root, quiet=True)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"challenge_f1", "challenge_f1_majority", "f1_N", "f1_A", "f1_O", "f1_noise", "seq_f1", "set_f1",
            "accuracy"} <= set(metrics)
    assert 0.0 <= metrics["challenge_f1"] <= 1.0 and result.test_metrics["accuracy"] == metrics["accuracy"]
    for png in ("confusion.png", "confusion_steps.png", "ecg_strip.png"):
        assert (run / png).is_file(), png
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["records"] == {"train": 76, "val": 10, "test": 10} and summary["skipped_at_preparation"] == {}
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["data_state"]
    assert {"fs", "lead", "classes", "window", "target", "normalize", "step", "class_weights"} <= set(state)


# ---------------------------------------------------------------- downloads (local mirror only: no network)


def _data_prep_ecg():
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_prep_ecg", REPO / "data_prep" / "ecg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_physionet_from_a_file_url_mirror(data_root, tmp_path, monkeypatch):
    import hashlib
    import shutil
    import zipfile

    from cnnapps.tasks.ecg.prepare import ECGDataError, cinc2017_source, dataset_source, prepare_source

    mit_src, cinc_src = mitdb_source(data_root).record_dir, cinc2017_source(data_root).record_dir
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path / "cache"))  # after finding the unpacked sources above
    dp = _data_prep_ecg()
    mirror = tmp_path / "mirror"
    mit = mirror / "mitdb" / "1.0.0"
    mit.mkdir(parents=True)
    (mit / "RECORDS").write_text("100\n201\n")
    sums = []
    for name in ("100", "201"):
        for ext in ("hea", "dat", "atr"):
            shutil.copy(mit_src / f"{name}.{ext}", mit / f"{name}.{ext}")
            sums.append(f"{hashlib.sha256((mit / f'{name}.{ext}').read_bytes()).hexdigest()} {name}.{ext}")
    (mit / "SHA256SUMS.txt").write_text("\n".join(sums) + "\n")
    challenge = mirror / "challenge-2017" / "1.0.0"
    challenge.mkdir(parents=True)
    with zipfile.ZipFile(challenge / "training2017.zip", "w") as zf:
        for name in ("A00001", "A00002"):
            for ext in ("hea", "mat"):
                zf.write(cinc_src / f"{name}.{ext}", f"training2017/{name}.{ext}")
        zf.writestr("training2017/RECORDS", "A00001\nA00002\n")
        zf.writestr("training2017/REFERENCE.csv", "A00001,N\r\nA00002,N\r\n")

    dest = tmp_path / "data"
    url = mirror.as_uri()  # file:///...
    assert dp.download_physionet("mitdb", dest, url) == dest / "mitdb"
    assert dp.download_physionet("cinc2017", dest, str(mirror)) == dest / "cinc2017"  # a plain folder works too
    assert (dest / "cinc2017" / "REFERENCE.csv").is_file()
    mitdb_cache = prepare_source(dataset_source(dest, "mitdb"), PrepParams(lead="MLII"))
    assert mitdb_cache.names == ["100", "201"] and len(mitdb_cache.beats(0)) == 2273
    cinc_cache = prepare_source(dataset_source(dest, "cinc2017"), PrepParams())
    assert cinc_cache.index["label_counts"] == {"N": 2}

    (mit / "100.atr").write_bytes(b"tampered")  # the mirror now serves a file that fails its checksum
    with pytest.raises(ECGDataError, match="SHA-256"):
        dp.download_physionet("mitdb", tmp_path / "data2", url)
    with pytest.raises(ECGDataError, match="cannot download"):
        dp.download_physionet("mitdb", tmp_path / "data3", (tmp_path / "nowhere").as_uri())


def test_bench_helpers_read_the_same_windows_both_ways(mitdb):
    from cnnapps.tasks.ecg.bench import windows_per_second_cache, windows_per_second_wfdb

    assert windows_per_second_cache(mitdb, 8192, n=5) > 0 and windows_per_second_wfdb(mitdb, 8192, n=3) > 0
