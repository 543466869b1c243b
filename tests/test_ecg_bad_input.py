"""Bad ECG input at preparation: damaged copies of real records and hand-written WFDB records each become a logged
skip with its reason (counted in the index and the data splits), and unusable sources a clear error naming the
file; a killed preparation leaves no cache that looks complete, and a changed source gives a new cache."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from cnnapps.data.root import DataNotFoundError
from cnnapps.engine.config import load_config
from cnnapps.tasks.ecg import prepare as prep
from cnnapps.tasks.ecg.prepare import (ECGDataError, PrepParams, cinc2017_source, folder_source, mitdb_source,
                                       prepare_source, safe_extract, unpack_archive)
from cnnapps.tasks.ecg.task import ECGConfig, ECGTask


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Caches of these tests go to a temporary folder, never the user's."""
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def raw_dirs(data_root):
    """The unpacked CinC and MIT-BIH folders in the default cache (unpacked once, reused)."""
    return cinc2017_source(data_root).record_dir, mitdb_source(data_root).record_dir


def _copy(src: Path, name: str, dst: Path, new: str | None = None) -> None:
    """Copy WFDB record ``name`` (header + signal, + .atr) into ``dst``, optionally renamed to ``new``."""
    new = new or name
    for f in src.glob(f"{name}.*"):
        if new == name:
            shutil.copy(f, dst / f.name)
        elif f.suffix == ".hea":
            (dst / f"{new}.hea").write_text(f.read_text().replace(name, new))
        else:
            shutil.copy(f, dst / f"{new}{f.suffix}")


def _write(folder: Path, name: str, signal: np.ndarray, fs: float = 300) -> None:
    wfdb.wrsamp(name, fs=fs, units=["mV"], sig_name=["ECG"], p_signal=signal[:, None], fmt=["16"],
                write_dir=str(folder))


@pytest.fixture
def broken_folder(tmp_path, raw_dirs) -> Path:
    """A WFDB folder with REFERENCE.csv: two good records and one of each kind of damage."""
    cinc_dir, _ = raw_dirs
    folder = tmp_path / "records"
    folder.mkdir()
    _copy(cinc_dir, "A00001", folder, "good1")
    _copy(cinc_dir, "A00002", folder, "good2")
    _copy(cinc_dir, "A00003", folder, "nomat")
    (folder / "nomat.mat").unlink()  # missing signal file
    _copy(cinc_dir, "A00004", folder, "cut")
    with open(folder / "cut.mat", "r+b") as fh:  # truncated signal
        fh.truncate(24 + 2 * 3000 + 1)
    _copy(cinc_dir, "A00005", folder, "liar")
    header = (folder / "liar.hea").read_text().splitlines()
    n = int(header[0].split()[3])
    header[0] = header[0].replace(f" {n} ", f" {n // 2} ")  # the header claims half the samples the file holds
    (folder / "liar.hea").write_text("\n".join(header) + "\n")
    _copy(cinc_dir, "A00006", folder, "badlabel")
    _copy(cinc_dir, "A00007", folder, "unlisted")
    t = np.arange(9000) / 300
    ecg = np.sin(2 * np.pi * 1.2 * t) + 0.2 * np.sin(2 * np.pi * 7 * t)
    short_gap = ecg.copy()
    short_gap[1000:1030] = np.nan  # 0.1 s: interpolated
    _write(folder, "gap", short_gap)
    long_gap = ecg.copy()
    long_gap[2000:2600] = np.nan  # 2 s: skipped
    _write(folder, "nans", long_gap)
    _write(folder, "flat", np.full(9000, 0.25))
    _write(folder, "tiny", ecg[:300])  # 1 s at 300 Hz -> 200 samples at 200 Hz < one 256-sample step
    (folder / "garbled.hea").write_text("this is not a WFDB header\n")
    labels = {"good1": "N", "good2": "A", "nomat": "N", "cut": "O", "liar": "N", "badlabel": "X", "gap": "N",
              "nans": "N", "flat": "~", "tiny": "N", "garbled": "N", "ghost": "N"}  # ghost: no files at all
    (folder / "REFERENCE.csv").write_text("".join(f"{k},{v}\r\n" for k, v in labels.items()))
    return folder


EXPECTED_SKIPS = {
    "missing_signal_file": ["nomat"], "truncated_signal": ["cut"], "header_length_mismatch": ["liar"],
    "unknown_label": ["badlabel"], "no_label": ["unlisted"], "nan_samples": ["nans"], "flat_line": ["flat"],
    "too_short": ["tiny"], "unreadable_header": ["garbled"], "missing_record": ["ghost"],
}


def test_each_damaged_record_is_a_skip_with_its_reason(broken_folder, caplog):
    with caplog.at_level("WARNING", logger="cnnapps.tasks.ecg.prepare"):
        cache = prepare_source(folder_source(broken_folder), PrepParams())
    assert cache.skipped == EXPECTED_SKIPS
    assert sorted(cache.names) == ["gap", "good1", "good2"]
    assert cache.index["label_counts"] == {"N": 2, "A": 1}
    messages = cache.index["skip_messages"]
    assert "cut.mat" in messages["cut"] and "bytes" in messages["cut"]
    assert "'X'" in messages["badlabel"] and "REFERENCE.csv" in messages["badlabel"]
    assert "600 NaN" in messages["nans"]
    for name in ("nomat", "liar", "flat", "tiny"):
        assert any(name in r.getMessage() for r in caplog.records), name
    gap = cache.records[cache.names.index("gap")]
    assert gap.nan_filled == 30 and np.isfinite(cache.signal(cache.names.index("gap"))).all()


def test_skips_reach_the_data_splits_and_evaluation_runs_on_the_rest(broken_folder):
    task = ECGTask()
    cfg = load_config(ECGConfig, None, [])
    state = {"dataset": "cinc2017", "target": "record", "fs": 200, "lead": "", "normalize": "zscore", "step": 256,
             "classes": ["N", "A", "O", "~"], "window": 6144, "eval_window": 0, "in_chans": 1,
             "class_weights": [1.0, 1.0, 1.0, 1.0]}
    data = task.build_data(cfg, broken_folder, state=state, split="all")
    assert data.skipped == {k: len(v) for k, v in EXPECTED_SKIPS.items()}
    assert len(data.test) == 3
    batch = data.collate_fn([data.test[i] for i in range(3)])
    assert (batch["y"] >= 0).sum() > 0 and torch.isfinite(batch["x"]).all()


def test_unreadable_archive_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "training2017.tar.xz"
    bad.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(ECGDataError, match="training2017.tar.xz"):
        unpack_archive(bad, "cinc2017")
    assert not list((tmp_path / "cache" / "ecg" / "raw").glob("cinc2017-*"))  # nothing half-unpacked


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt", "ok/../../escape.txt"])
def test_archive_members_outside_the_target_are_refused(tmp_path, member):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ECGDataError, match="unsafe"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_missing_reference_csv_is_an_error_naming_it(tmp_path, raw_dirs):
    cinc_dir, _ = raw_dirs
    unpacked = tmp_path / "root" / "cinc2017" / "training2017"
    unpacked.mkdir(parents=True)
    _copy(cinc_dir, "A00001", unpacked)
    with pytest.raises(DataNotFoundError, match="REFERENCE.csv"):
        cinc2017_source(tmp_path / "root")
    with pytest.raises(DataNotFoundError, match="cinc2017"):
        cinc2017_source(tmp_path / "elsewhere")


def test_a_bad_reference_line_is_an_error_naming_the_file(tmp_path):
    ref = tmp_path / "REFERENCE.csv"
    ref.write_text("A00001,N\nA00002\n")
    with pytest.raises(ECGDataError, match=r"REFERENCE.csv:2"):
        prep.read_reference(ref)


def test_a_killed_preparation_leaves_no_complete_looking_cache(broken_folder, tmp_path, monkeypatch):
    source = folder_source(broken_folder)
    real = prep.prepare_signal
    calls = {"n": 0}

    def dies_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    with monkeypatch.context() as patch:  # undone at the end of the block; the cache folder stays patched
        patch.setattr(prep, "prepare_signal", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            prepare_source(source, PrepParams())
    prepared = tmp_path / "cache" / "ecg" / "prepared"
    assert not [p for p in prepared.iterdir() if (p / "index.json").exists()]
    assert not list(prepared.glob(".tmp-*"))
    cache = prepare_source(source, PrepParams())
    assert len(cache) == 3 and cache.path.parent == prepared


def test_a_changed_source_or_parameter_gives_a_new_cache(broken_folder):
    first = prepare_source(folder_source(broken_folder), PrepParams())
    again = prepare_source(folder_source(broken_folder), PrepParams())
    assert again.path == first.path
    other_fs = prepare_source(folder_source(broken_folder), PrepParams(fs=250))
    assert other_fs.path != first.path and other_fs.records[0].length == 7500
    (broken_folder / "REFERENCE.csv").write_text((broken_folder / "REFERENCE.csv").read_text()
                                                 .replace("good2,A", "good2,O"))
    changed = prepare_source(folder_source(broken_folder), PrepParams())
    assert changed.path != first.path and changed.index["label_counts"] == {"N": 2, "O": 1}


def test_a_missing_lead_is_a_skip_and_an_absent_folder_an_error(tmp_path, raw_dirs):
    _, mitdb_dir = raw_dirs
    folder = tmp_path / "mit"
    folder.mkdir()
    _copy(mitdb_dir, "100", folder)
    _copy(mitdb_dir, "102", folder)  # V5 + V2, no MLII
    cache = prepare_source(folder_source(folder), PrepParams(lead="MLII"))
    assert cache.names == ["100"] and cache.skipped == {"lead_not_found": ["102"]}
    assert cache.has_annotations and len(cache.beats(0)) == 2273  # 2,274 annotations, one '+' rhythm mark
    with pytest.raises(DataNotFoundError, match="no WFDB records"):
        folder_source(tmp_path / "empty")


@pytest.mark.parametrize("leads", [("all",), ("ECG",)])
def test_the_multi_lead_path_keeps_every_skip(broken_folder, leads):
    cache = prepare_source(folder_source(broken_folder), PrepParams(leads=leads, missing_lead="substitute"))
    assert cache.skipped == EXPECTED_SKIPS and sorted(cache.names) == ["gap", "good1", "good2"]
    assert cache.n_leads == 1 and cache.lead_names == ["ECG"]


def test_a_damaged_second_lead_skips_the_record_naming_the_lead(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    t = np.arange(6000) / 250
    ecg = np.sin(2 * np.pi * 1.2 * t) + 0.2 * np.sin(2 * np.pi * 7 * t)

    def two(name: str, second: np.ndarray, names: tuple[str, str] = ("II", "V1")) -> None:
        wfdb.wrsamp(name, fs=250, units=["mV", "mV"], sig_name=list(names), p_signal=np.stack([ecg, second], 1),
                    fmt=["16", "16"], write_dir=str(folder))

    two("good", 0.5 * ecg)
    two("flatv1", np.full(6000, 0.1))
    gap = 0.5 * ecg
    gap[100:1100] = np.nan  # 4 s
    two("nanv1", gap)
    two("nov1", 0.5 * ecg, ("II", "V2"))
    two("cut", 0.5 * ecg)
    with open(folder / "cut.dat", "r+b") as fh:
        fh.truncate(1000)
    two("tiny", 0.5 * ecg)
    header = (folder / "tiny.hea").read_text().replace(" 6000", " 200", 1)  # the header shrinks the record...
    (folder / "tiny.hea").write_text(header)
    with open(folder / "tiny.dat", "r+b") as fh:  # ...and the file with it: 200 samples at 250 Hz < 256 at 200
        fh.truncate(200 * 2 * 2)
    cache = prepare_source(folder_source(folder), PrepParams(leads=("II", "V1"), missing_lead="skip"))
    assert cache.names == ["good"] and cache.n_leads == 2
    assert cache.skipped == {"flat_line": ["flatv1"], "nan_samples": ["nanv1"], "lead_not_found": ["nov1"],
                             "truncated_signal": ["cut"], "too_short": ["tiny"]}
    messages = cache.index["skip_messages"]
    assert "lead V1" in messages["flatv1"] and "lead V1" in messages["nanv1"] and "'V1'" in messages["nov1"]
    substituted = prepare_source(folder_source(folder), PrepParams(leads=("II", "V1"), missing_lead="substitute"))
    assert sorted(substituted.names) == ["good", "nov1"] and substituted.records[1].substituted == {"V1": "V2"}

def test_duplicates_and_the_paper_strip_amid_damaged_records(broken_folder, raw_dirs):
    """Duplicate detection sees only the records preparation kept (the damaged ones stay counted skips), and the
    millivolt strip of a record whose file has since been damaged falls back to the normalised signal."""
    from cnnapps.tasks.ecg.data import duplicate_records
    from cnnapps.tasks.ecg.plots import record_in_millivolts

    _copy(raw_dirs[0], "A00001", broken_folder, "twin")
    with open(broken_folder / "REFERENCE.csv", "a") as fh:
        fh.write("twin,N\r\n")
    cache = prepare_source(folder_source(broken_folder), PrepParams())
    assert cache.skipped == EXPECTED_SKIPS
    assert [[cache.names[i] for i in g] for g in duplicate_records(cache)] == [["good1", "twin"]]
    good2 = cache.names.index("good2")
    assert record_in_millivolts(cache, good2)[1] == "mV"
    with open(broken_folder / "good2.mat", "r+b") as fh:  # truncated after preparation
        fh.truncate(100)
    x, units = record_in_millivolts(cache, good2)
    assert units == "SD" and np.array_equal(x, cache.signal(good2))
    (broken_folder / "good1.mat").unlink()  # gone after preparation
    assert record_in_millivolts(cache, cache.names.index("good1"))[1] == "SD"
