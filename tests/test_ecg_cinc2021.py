"""12-lead PhysioNet/CinC Challenge 2020/2021 records: ``# Dx:`` codes to the scored classes (checked by hand
against the sample's headers), the recursive dataset reader with its counted skips, and train / evaluate /
predict (answers.txt, per-step probabilities) end to end on the 50-record sample."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnapps.engine.config import load_config
from cnnapps.tasks.cli import main as task_main
from cnnapps.tasks.ecg.cinc2021 import SCORED_2020, SCORED_2021, class_table, code_names, dx_codes, multi_hot
from cnnapps.tasks.ecg.dx import dx_targets, pool_steps
from cnnapps.tasks.ecg.prepare import PrepParams, cinc2021_source, prepare_source, read_header
from cnnapps.tasks.ecg.task import ECGTask
from conftest import read_eval

TINY = ["model.width=4", "model.kernel_size=8", "model.increase_every=4", "train.batch_size=8", "train.threads=1"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Caches of these tests go to a temporary folder, never the user's."""
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def sample(data_root) -> Path:
    return data_root / "cinc2021_sample"


def _abbrs(codes: list[str], table=SCORED_2021) -> set[str]:
    return {c.abbr for c, on in zip(table, multi_hot(codes, table)) if on}


# each record's "# Dx:" line as its .hea file gives it, and the scored classes read off the Challenge's
# dx_mapping_scored.csv by hand: 67741000119109, 164873001 (LVH), 55827005, 164930006, 428750005 are not scored;
# 59118001 (RBBB) counts as RBBB with 713427006
HAND_CHECKED = {
    "E07500": ("67741000119109,426177001", {"SB"}),
    "E07505": ("164873001", set()),
    "E07507": ("428750005,111975006", {"LQT"}),
    "E07509": ("59118001,426177001", {"RBBB", "SB"}),
    "HR06002": ("426177001,426783006,713426002", {"SB", "NSR", "IRBBB"}),
    "JS20003": ("284470004,427084000,55827005,164934002,427172004", {"PAC", "STach", "TAb", "PVC"}),
    "JS20017": ("284470004,164930006,427084000,55827005,59931005,698252002,365413008,164934002",
                {"PAC", "STach", "TInv", "NSIVCB", "PRWP", "TAb"}),
}


@pytest.mark.parametrize("name", sorted(HAND_CHECKED))
def test_dx_codes_of_sample_records_parse_into_their_scored_classes(sample, name):
    line, classes = HAND_CHECKED[name]
    assert f"# Dx: {line}" in (sample / f"{name}.hea").read_text()  # the table above is the file's line
    codes = dx_codes(read_header(sample / name).comments)
    assert codes == line.split(",")
    assert _abbrs(codes) == classes


def test_scored_tables_and_the_dx_line_rules():
    assert len(SCORED_2021) == 26 and sum(len(c.codes) for c in SCORED_2021) == 30
    assert len(SCORED_2020) == 24 and sum(len(c.codes) for c in SCORED_2020) == 27
    assert len(code_names(SCORED_2021)) == 30  # no code in two classes
    # equivalent codes are one class: either code, or both, give one positive
    assert _abbrs(["63593006"]) == _abbrs(["284470004", "63593006"]) == {"PAC"}
    assert _abbrs(["733534002"]) == {"LBBB"} and _abbrs(["733534002"], SCORED_2020) == set()  # joined in 2021
    assert _abbrs(["365413008"], SCORED_2020) == set()  # PRWP is a 2021 class
    assert dx_codes(["Age: 50", "Dx: 426783006, 426783006 ,164934002"]) == ["426783006", "164934002"]
    assert dx_codes(["Age: 50"]) is None and dx_codes(["Dx:"]) == []
    with pytest.raises(ValueError, match="'AF'"):
        dx_codes(["Dx: 426783006,AF"])
    with pytest.raises(ValueError, match="scored2019"):
        class_table("scored2019")


def test_pooling_counts_only_the_real_steps():
    logits = torch.tensor([[[1.0, 3.0, 100.0]], [[2.0, 4.0, 6.0]]])  # (2 items, 1 class, 3 steps)
    lengths = torch.tensor([512, 768])  # 2 and 3 real steps
    assert pool_steps(logits, lengths).flatten().tolist() == [2.0, 4.0]
    assert pool_steps(logits, lengths, how="max").flatten().tolist() == [3.0, 6.0]


def _copy(sample: Path, folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        for f in sample.glob(f"{n}.*"):
            shutil.copy(f, folder / f.name)


def test_damaged_records_are_counted_skips_in_a_nested_folder(sample, tmp_path):
    root = tmp_path / "cinc"
    _copy(sample, root / "georgia" / "g1", ["E07500", "E07505", "E07509"])
    _copy(sample, root / "ptb-xl" / "g1", ["HR06000", "HR06001", "HR06002", "HR06003", "HR06004"])
    _copy(sample, root / "cpsc", ["JS20004"])  # lead V2 is a flat line in this real record
    ptb = root / "ptb-xl" / "g1"
    (ptb / "HR06000.mat").unlink()  # missing signal file
    data = (ptb / "HR06001.mat").read_bytes()
    (ptb / "HR06001.mat").write_bytes(data[: len(data) // 2])  # truncated
    hea = (ptb / "HR06002.hea").read_text()
    (ptb / "HR06002.hea").write_text(hea.replace("HR06002 12 500 5000", "HR06002 12 500 4000", 1))  # lies
    hea = (ptb / "HR06003.hea").read_text()
    (ptb / "HR06003.hea").write_text("\n".join(ln for ln in hea.splitlines() if "Dx" not in ln) + "\n")
    hea = (ptb / "HR06004.hea").read_text()
    (ptb / "HR06004.hea").write_text(hea.replace("# Dx: 426783006", "# Dx: 426783006,sinus"))
    # WFDB's invalid-sample value (-32768 in format 16) reads as NaN: a 0.6 s run in lead I skips the record,
    # a 0.1 s run is interpolated; samples are frame-interleaved after the 24-byte MAT v4 header ("16x1+24")
    _copy(sample, root / "cpsc", ["JS20005", "JS20006"])
    for name, run in (("JS20005", 300), ("JS20006", 50)):
        raw = bytearray((root / "cpsc" / f"{name}.mat").read_bytes())
        for t in range(1000, 1000 + run):
            raw[24 + 2 * t * 12: 24 + 2 * t * 12 + 2] = (-32768).to_bytes(2, "little", signed=True)
        (root / "cpsc" / f"{name}.mat").write_bytes(bytes(raw))
    cache = prepare_source(cinc2021_source(root), PrepParams(leads=("all",)))
    assert cache.names == ["cpsc/JS20006", "georgia/g1/E07500", "georgia/g1/E07505", "georgia/g1/E07509"]
    assert cache.records[0].nan_filled == 50
    assert cache.skipped == {"missing_signal_file": ["ptb-xl/g1/HR06000"], "truncated_signal": ["ptb-xl/g1/HR06001"],
                             "header_length_mismatch": ["ptb-xl/g1/HR06002"], "no_label": ["ptb-xl/g1/HR06003"],
                             "bad_dx": ["ptb-xl/g1/HR06004"], "flat_line": ["cpsc/JS20004"],
                             "nan_samples": ["cpsc/JS20005"]}
    assert "'sinus'" in cache.index["skip_messages"]["ptb-xl/g1/HR06004"]
    assert cache.n_leads == 12 and cache.signals(0).shape == (2000, 12)
    targets = dx_targets(cache, SCORED_2021)
    assert targets.sum(1).tolist() == [4, 1, 0, 2]  # PAC STach TAb PVC; SB; nothing scored; RBBB + SB
    # a record without a scored class: kept all-negative by default, else a counted skip before the split
    task = ECGTask()
    kept = task.build_data(_cfg(root, "data.fractions=[1.0, 0.0, 0.0]"), tmp_path, split=None)
    assert len(kept.train.records) == 4 and kept.state["unscored_records"] == 1
    left = task.build_data(_cfg(root, "data.fractions=[1.0, 0.0, 0.0]", "data.unscored=skip"), tmp_path)
    assert len(left.train.records) == 3 and left.skipped["no_scored_label"] == 1


def _cfg(path: Path, *extra: str):
    task = ECGTask()
    return load_config(task.Config, "cinc2021", [f"data.path={path}", *TINY, *extra], search=task.config_dir())


def test_train_evaluate_predict_on_the_12_lead_sample(sample, data_root, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [a for s in [f"data.path={sample}", *TINY, "train.epochs=2"] for a in ("--set", s)]
    assert task_main("ecg", ["train", "--config", "cinc2021", "--data-dir", str(data_root), "--out", str(run),
                             "--quiet", *sets]) == 0
    best = run / "checkpoints" / "best.pt"
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
    assert len(thresholds) == 26
    saved = torch.load(best, map_location="cpu", weights_only=False)
    buffer = next(v for k, v in saved["model"].items() if k.endswith("thresholds"))
    assert np.allclose(buffer.numpy(), list(thresholds.values()), atol=1e-4)
    assert not np.allclose(buffer.numpy(), 0.5)  # calibrated on validation, not the initial 0.5
    assert np.allclose(saved["data_state"]["thresholds"], buffer.numpy())  # for an exported model's JSON
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["records"] == {"train": 38, "val": 5, "test": 5} and summary["skipped"] == {"flat_line": 2}
    assert summary["leads_read"]["leads"] == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5",
                                              "V6"]
    test = json.loads((run / "metrics.json").read_text())
    assert {"macro_f1", "mAP", "auroc_macro"} <= set(test) and 0.0 <= test["macro_f1"] <= 1.0

    assert task_main("ecg", ["evaluate", "--checkpoint", str(best), "--data-dir", str(data_root),
                             "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    values = read_eval(tmp_path / "eval")
    assert values["macro_f1"] == pytest.approx(test["macro_f1"]) and values["examples"] == 5

    folder = tmp_path / "records"
    _copy(sample, folder / "a", ["E07500", "E07509"])
    _copy(sample, folder / "b", ["HR06002", "JS20003"])
    capsys.readouterr()
    answers = tmp_path / "answers.txt"
    assert task_main("ecg", ["predict", "--checkpoint", str(best), str(folder), "--answers", str(answers),
                             "--steps", "--plot", "--out", str(tmp_path / "pictures"), "--quiet"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [Path(r["input"]).name for r in rows] == ["E07500", "E07509", "HR06002", "JS20003"]
    lines = answers.read_text().splitlines()
    assert len(lines) == 4 and [ln.split(",")[0] for ln in lines] == ["E07500", "E07509", "HR06002", "JS20003"]
    for row, line in zip(rows, lines):
        assert "error" not in row and len(row["probabilities"]) == 26 and len(row["leads"]) == 12
        assert line.split(",")[1:] == (row["codes"] or [""])  # the row's codes, as a Dx line joins them
        assert len(row["steps"]) == 8 and len(row["steps"][0]) == 26  # 2000 samples: 8 steps whose centre is real
        assert Path(row["picture"]).is_file()
        for abbr, p in row["labels"].items():
            assert p >= thresholds[abbr] - 1e-4


def test_predict_rows_keep_the_schema_for_a_damaged_record(sample, tmp_path):
    task = ECGTask()
    root = tmp_path / "cinc"
    _copy(sample, root, ["E07500", "E07509", "E07512", "HR06000", "HR06004"])
    cfg = _cfg(root, "data.fractions=[0.6, 0.2, 0.2]")
    data = task.build_data(cfg, tmp_path)
    model = task.build_model(cfg, data)
    (root / "HR06000.mat").unlink()
    answers = tmp_path / "answers.txt"
    rows = list(task.predict(model, [str(root / "HR06000"), str(root / "E07500.hea")], data.state, cfg,
                             torch.device("cpu"), answers=answers))
    assert rows[0] == {"input": str(root / "HR06000"), "error": rows[0]["error"]}
    assert rows[0]["error"].startswith("missing_signal_file") and "HR06000" in rows[0]["error"]
    assert rows[1]["input"] == str(root / "E07500.hea") and "codes" in rows[1]
    assert answers.read_text().splitlines()[0].split(",")[0] == "E07500" and len(answers.read_text().splitlines()) == 1


def _data_prep_ecg():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("data_prep_ecg", REPO / "data_prep" / "ecg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cinc2021_download_from_a_file_url_mirror_follows_nested_records_and_checks_sums(sample, tmp_path):
    import hashlib

    from cnnapps.tasks.ecg.prepare import ECGDataError, dataset_source

    dp = _data_prep_ecg()
    project = tmp_path / "mirror" / "challenge-2021" / "1.0.3"
    layout = {"training/georgia/g1": ["E07500", "E07509"], "training/ptb-xl/g1": ["HR06002"]}
    sums = []
    for sub, names in layout.items():
        _copy(sample, project / sub, names)
        (project / sub / "RECORDS").write_text("".join(f"{n}\n" for n in names))
        sums += [f"{hashlib.sha256((project / sub / f'{n}.{e}').read_bytes()).hexdigest()} {sub}/{n}.{e}"
                 for n in names for e in ("hea", "mat")]
    (project / "RECORDS").write_text("training/\n")  # PhysioNet lists subfolders with a trailing slash
    (project / "training" / "RECORDS").write_text("georgia/\nptb-xl/g1/HR06002\n")  # or record paths
    (project / "training" / "georgia" / "RECORDS").write_text("g1/\n")
    (project / "SHA256SUMS.txt").write_text("\n".join(sums) + "\n")
    dest = tmp_path / "data"
    assert dp.download_physionet("cinc2021", dest, (tmp_path / "mirror").as_uri()) == dest / "cinc2021"
    cache = prepare_source(dataset_source(dest, "cinc2021"), PrepParams(leads=("all",)))
    assert cache.names == ["training/georgia/g1/E07500", "training/georgia/g1/E07509", "training/ptb-xl/g1/HR06002"]
    assert cache.n_leads == 12 and cache.index["label_counts"]["426177001"] == 3  # SB in all three

    (project / "training" / "georgia" / "g1" / "E07509.mat").write_bytes(b"tampered")
    with pytest.raises(ECGDataError, match="SHA-256"):
        dp.download_physionet("cinc2021", tmp_path / "data2", str(tmp_path / "mirror"))
    assert not (tmp_path / "data2" / "cinc2021" / "training" / "georgia" / "g1" / "E07509.mat").exists()
    (project / "training" / "RECORDS").write_text("../../secrets\n")
    with pytest.raises(ECGDataError, match="refusing"):
        dp.download_physionet("cinc2021", tmp_path / "data3", str(tmp_path / "mirror"))


def test_cinc2021_archives_unpack_and_are_checked(sample, tmp_path):
    import io
    import tarfile

    from cnnapps.tasks.ecg.prepare import ECGDataError, dataset_source

    dp = _data_prep_ecg()
    archive = tmp_path / "WFDB_Ga.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for n in ("E07500", "E07509"):
            for e in ("hea", "mat"):
                tar.add(sample / f"{n}.{e}", f"WFDB_Ga/{n}.{e}")
        tar.add(sample / "E07512.hea", "WFDB_Ga/E07512.hea")  # its .mat is not in the archive
    dest = tmp_path / "data"
    assert dp.extract_cinc2021_archives([archive], dest) == {"WFDB_Ga.tar.gz": {"records": 3, "without_signal": 1}}
    cache = prepare_source(dataset_source(dest, "cinc2021"), PrepParams(leads=("all",)))
    assert len(cache) == 2 and cache.skipped == {"missing_signal_file": ["WFDB_Ga/WFDB_Ga/E07512"]}
    bad = tmp_path / "WFDB_Bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.hea")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ECGDataError, match="unsafe"):
        dp.extract_cinc2021_archives([bad], dest)
    assert not (dest / "cinc2021" / "WFDB_Bad").exists() and not (dest / "escape.hea").exists()
    with pytest.raises(ECGDataError, match="not found"):
        dp.extract_cinc2021_archives([tmp_path / "nope.tar.gz"], dest)
