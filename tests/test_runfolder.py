"""Run folders never lose a result: real SIGKILLs at injected points in a child process, then resume; reuse of
a folder, two runs on one folder, a failed resume, evaluate into a run folder, messages that name only files
that exist, and file modes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.runfolder import RunFolder, RunFolderError
from cnnapps.engine.trainer import fit
from cnnapps.tasks.classify.task import ClassifyConfig, ClassifyTask
from cnnapps.tasks.cli import main
from conftest import REPO, read_eval

SMALL = ["data.train_subset=640", "data.test_subset=256", "data.val_fraction=0.2", "train.batch_size=64",
         "train.epochs=2", "train.lr=0.05", "train.threads=1", "train.warmup_epochs=0"]

# The child trains SMALL with `fit` after installing KILL, a snippet that SIGKILLs the process at one point.
CHILD = """
import os, signal, sys
from pathlib import Path
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import fit
from cnnapps.tasks.classify.task import ClassifyConfig, ClassifyTask

def die():
    os.kill(os.getpid(), signal.SIGKILL)

{kill}

cfg = load_config(ClassifyConfig, None, {overrides!r})
fit(ClassifyTask(), cfg, Path(sys.argv[1]), Path(sys.argv[2]), quiet=True)
"""


def _killed_run(run: Path, data_root: Path, kill: str, overrides=SMALL) -> None:
    """Train in a child process that SIGKILLs itself where ``kill`` says; assert that it died so."""
    script = CHILD.format(kill=textwrap.dedent(kill), overrides=list(overrides))
    proc = subprocess.run([sys.executable, "-c", script, str(run), str(data_root)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a / "checkpoints/last.pt"), _weights(b / "checkpoints/last.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise
    ba, bb = _weights(a / "checkpoints/best.pt"), _weights(b / "checkpoints/best.pt")
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma == {**mb, "train_seconds": ma["train_seconds"]}
    ja, jb = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b))
    assert [r["epoch"] for r in ja] == [r["epoch"] for r in jb] == [1, 2]
    assert [r["val_accuracy"] for r in ja] == [r["val_accuracy"] for r in jb]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    fit(ClassifyTask(), load_config(ClassifyConfig, None, SMALL), run, data_root, quiet=True)
    return run


def test_kill_between_the_two_checkpoint_writes_of_an_epoch(tmp_path, data_root, straight):
    # SIGKILL right after the first checkpoint file of epoch 2 is complete, before the second one
    _killed_run(tmp_path / "run", data_root, """
        import cnnapps.engine.checkpoint as ck, cnnapps.engine.callbacks as cb
        real = ck.save_checkpoint
        def save(payload, path):
            real(payload, path)
            if payload["epoch"] == 2:
                die()
        cb.save_checkpoint = save
    """)
    assert main("classify", ["train", "--resume", "--out", str(tmp_path / "run"), "--data-dir", str(data_root),
                             "--quiet"]) == 0
    _assert_same_run(straight, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["epoch"] == state["best_epoch"]


def test_kill_after_the_metrics_line_before_the_checkpoint(tmp_path, data_root, straight):
    _killed_run(tmp_path / "run", data_root, """
        import cnnapps.engine.loggers as lg
        real = lg.JsonlLogger.on_epoch_end
        def logged(self, trainer, row):
            real(self, trainer, row)
            if row["epoch"] == 2:
                die()
        lg.JsonlLogger.on_epoch_end = logged
    """)
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and load_checkpoint(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1
    assert main("classify", ["train", "--resume", "--out", str(tmp_path / "run"), "--data-dir", str(data_root),
                             "--quiet"]) == 0
    _assert_same_run(straight, tmp_path / "run")  # epoch 2 is in metrics.jsonl once


def test_kill_during_a_checkpoint_write_leaves_no_temporary_file(tmp_path, data_root, straight):
    _killed_run(tmp_path / "run", data_root, """
        import torch
        real = torch.save
        def save(obj, f, *a, **kw):
            real(obj, f, *a, **kw)
            if obj.get("epoch") == 2:
                f.flush()
                die()  # the temporary file is complete on disk, never renamed
        torch.save = save
    """)
    left = list((tmp_path / "run/checkpoints").glob(".*.tmp"))
    assert left, "the kill should have left a temporary checkpoint"
    assert main("classify", ["train", "--resume", "--out", str(tmp_path / "run"), "--data-dir", str(data_root),
                             "--quiet"]) == 0
    assert not list((tmp_path / "run").rglob("*.tmp"))
    _assert_same_run(straight, tmp_path / "run")


def test_an_existing_run_folder_is_refused_without_resume_or_overwrite(tmp_path, data_root, straight, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    args = ["train", "--out", str(run), "--data-dir", str(data_root), "--quiet",
            *sum((["--set", s] for s in SMALL + ["train.epochs=1"]), [])]
    assert main("classify", args) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main("classify", [*args, "--overwrite"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # a new run, nothing appended
    # a folder that holds anything but a run is never emptied
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with RunFolder(other, overwrite=True):
        pass
    assert (other / "keep.txt").read_text() == "mine"


def test_a_second_run_on_a_held_folder_exits_at_once_naming_the_holder(tmp_path, data_root, capsys):
    run, started = tmp_path / "run", tmp_path / "started"
    script = CHILD.format(kill=f"""
import time
import cnnapps.engine.loggers as lg
real = lg.JsonlLogger.on_fit_start
def hold(self, trainer):
    real(self, trainer)
    Path({str(started)!r}).write_text("yes")
    time.sleep(120)
lg.JsonlLogger.on_fit_start = hold
""", overrides=SMALL)
    holder = subprocess.Popen([sys.executable, "-c", script, str(run), str(data_root)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if started.exists() or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists(), "the first run never started"
        t0 = time.perf_counter()
        status = main("classify", ["train", "--out", str(run), "--data-dir", str(data_root), "--overwrite",
                                   "--quiet"])
        err = capsys.readouterr().err
        assert status == 2 and time.perf_counter() - t0 < 30
        assert str(run) in err and f"pid {holder.pid}" in err and "in use" in err
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(run, resume=True):  # the operating system released the dead holder's lock
        pass


def test_a_failed_resume_leaves_the_config_and_the_run_resumable(tmp_path, data_root, straight):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    config = (run / "config.toml").read_bytes()
    base = ["train", "--resume", "--out", str(run), "--data-dir", str(data_root), "--quiet"]
    assert main("classify", [*base, "--set", "model.backbone=resnet18"]) == 2
    assert (run / "config.toml").read_bytes() == config
    assert main("classify", [*base, "--set", "train.epochs=3"]) == 0
    assert load_checkpoint(run / "checkpoints/last.pt")["epoch"] == 3


def test_evaluate_into_a_run_folder_never_touches_its_results(tmp_path, data_root, straight, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main("classify", ["evaluate", "--checkpoint", str(run / "checkpoints/best.pt"), "--data-dir",
                             str(data_root), "--out", str(run), "--quiet"]) == 0
    assert before == {n: (run / n).read_bytes() for n in before}
    values = read_eval(run)
    assert values["accuracy"] == pytest.approx(json.loads(before["metrics.json"])["accuracy"])
    # without --out nothing is written and no file is named
    capsys.readouterr()
    assert main("classify", ["evaluate", "--checkpoint", str(run / "checkpoints/best.pt"), "--data-dir",
                             str(data_root), "--quiet"]) == 0
    assert "metrics.json" not in capsys.readouterr().out


def test_messages_name_only_files_that_exist(tmp_path, data_root, capsys, monkeypatch):
    task = ClassifyTask()
    real_step = task.step

    def nan_step(model, batch, cfg):
        out = real_step(model, batch, cfg)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr("cnnapps.tasks.cli.get_task", lambda name: task)
    monkeypatch.setattr(task, "step", nan_step)
    assert main("classify", ["train", "--out", str(tmp_path / "nan"), "--data-dir", str(data_root), "--quiet",
                             *sum((["--set", s] for s in SMALL), [])]) == 2
    err = capsys.readouterr().err
    assert "epoch 1, step 1" in err and "no checkpoint was written yet" in err and "last.pt" not in err
    monkeypatch.undo()
    # a finished run prints the files it wrote, each of which exists
    assert main("classify", ["train", "--out", str(tmp_path / "ok"), "--data-dir", str(data_root), "--quiet",
                             *sum((["--set", s] for s in SMALL + ["train.epochs=1"]), [])]) == 0
    out = capsys.readouterr().out
    listed = out.split("run folder:")[1].splitlines()[1].strip().split(", ")
    assert "checkpoints/best.pt" in listed and all((tmp_path / "ok" / n).exists() for n in listed)


def test_checkpoints_get_the_mode_of_every_other_run_file(straight):
    mode = (straight / "config.toml").stat().st_mode & 0o777
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", "run.json"):
        assert (straight / name).stat().st_mode & 0o777 == mode, name


def test_a_folder_held_by_a_live_process_is_refused(tmp_path):
    with RunFolder(tmp_path / "r"):
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
            RunFolder(tmp_path / "r").acquire()
