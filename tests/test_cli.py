"""One command line: `cnnapps <task> ...` and `python -m cnnapps.tasks.<task> ...` are the same parser; `config`
prints a resolved config that loads back; every bad value is exit status 2 and one line naming the key, never a
traceback."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnapps.__main__ import main as cnnapps_main
from cnnapps.engine.checkpoint import load_checkpoint, save_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.tasks import get_task, list_tasks
from cnnapps.tasks.cli import main as task_main

class NotATensor:
    """Pickled by reference: loading it would import and run code from this module."""


TASKS = ["classify", "multilabel", "detect", "segment", "ecg", "audio"]

# (overrides, the key the one-line error must name) for every task: the engine's section
TRAIN_BAD = [
    ("train.epochs=0", "train.epochs"), ("train.epochs=-1", "train.epochs"),
    ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.eval_every=0", "train.eval_every"), ("train.batch_size=0", "train.batch_size"),
    ("train.lr=0", "train.lr"), ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.optimizer=adm", "train.optimizer"), ("train.precision=fp8", "train.precision"),
    ("train.schedule=linear", "train.schedule"), ("train.device=gpu", "train.device"),
    ("train.loggers=wandb", "train.loggers"), ("train.lrr=1", "lrr"), ("train.epochs=two", "train.epochs"),
]


def _one_line_error(capsys, status: int, key: str) -> str:
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert key in err, err
    return err


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("override,key", TRAIN_BAD)
def test_bad_train_values_are_one_line_errors(task, override, key, capsys, tmp_path):
    status = task_main(task, ["train", "--out", str(tmp_path / "run"), "--set", override, "--quiet"])
    _one_line_error(capsys, status, key)
    assert not (tmp_path / "run").exists()  # refused before any data was read or folder made


# (task, overrides, the key the one-line error must name, a word it must also say) for the image tasks' own fields
IMAGE_BAD = [
    *[(task, [override], key, None) for task in ("classify", "multilabel", "detect")
      for override, key in (("data.val_fraction=1.5", "data.val_fraction"),
                            ("data.val_fraction=-0.1", "data.val_fraction"),
                            ("data.train_subset=-5", "data.train_subset"),
                            ("data.test_subset=-1", "data.test_subset"))],
    *[(task, [override], key, None) for task in ("classify", "multilabel", "segment")
      for override, key in (("data.image_size=-4", "data.image_size"), ("data.crop_scale=0", "data.crop_scale"),
                            ("data.rotation=-5", "data.rotation"), ("data.dataset=imagenet", "data.dataset"))],
    *[(task, ["model.backbone=resnet19"], "model.backbone", "did you mean")
      for task in ("classify", "multilabel", "detect", "segment")],
    ("classify", ["model.backbone=resnet18_1d"], "model.backbone", "2D"),  # a 1D network on images
    ("classify", ["model.in_chans=-1"], "model.in_chans", None),
    ("multilabel", ["data.image_size=8"], "data.image_size", None),
    ("multilabel", ["data.test_fraction=0"], "data.test_fraction", None),
    ("multilabel", ["data.val_fraction=0.5", "data.test_fraction=0.6"], "data.val_fraction", None),
    ("detect", ["data.test_fraction=1"], "data.test_fraction", None),
    ("detect", ["model.min_size=-4"], "model.min_size", None),
    ("detect", ["model.arch=yolo"], "model.arch", None),
    ("detect", ["model.nms_thresh=1.5"], "model.nms_thresh", None),
    ("segment", ["data.train_subset=-5"], "data.train_subset", None),
    ("segment", ["data.val_count=-1"], "data.val_count", None),
    ("segment", ["data.class_names=['background']"], "data.class_names", None),
    ("segment", ["model.decoder=fcm"], "model.decoder", None),
    ("segment", ["model.output_stride=4"], "model.output_stride", None),
    ("segment", ["mode=panoptic"], "mode", None),
    ("segment", ["mode=instance"], "mode", "detect"),  # one implementation: the detect task's Mask R-CNN
]


@pytest.mark.parametrize("task,overrides,key,says", IMAGE_BAD)
def test_bad_image_values_are_one_line_errors(task, overrides, key, says, capsys, tmp_path):
    sets = [arg for o in overrides for arg in ("--set", o)]
    status = task_main(task, ["train", "--out", str(tmp_path / "run"), *sets, "--quiet"])
    err = _one_line_error(capsys, status, key)
    if says:
        assert says in err, err
    if says == "did you mean":
        assert "resnet18" in err, err
    assert not (tmp_path / "run").exists()


def test_bad_config_files_name_the_file(tmp_path, capsys):
    assert task_main("classify", ["train", "--config", "nope"]) == 2
    err = _one_line_error(capsys, 2, "nope")
    assert "shipped:" in err and "ci" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 2")
    assert task_main("classify", ["train", "--config", str(bad)]) == 2
    _one_line_error(capsys, 2, str(bad))
    loop = tmp_path / "loop.toml"
    loop.write_text('base = "loop.toml"\n')
    assert task_main("classify", ["config", "--config", str(loop)]) == 2
    _one_line_error(capsys, 2, "loops")


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys, data_root):
    status = task_main("classify", ["train", "--out", "/proc/self/cnnapps-run", "--data-dir", str(data_root),
                                    "--set", "train.max_steps_per_epoch=1", "--set", "train.epochs=1", "--quiet"])
    _one_line_error(capsys, status, "/proc/self/cnnapps-run")


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, data_root, monkeypatch):
    import cnnapps.engine.runfolder as rf

    real = rf.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rf.os, "fsync", full)  # the disk fills up under the first write in the run folder
    status = task_main("classify", ["train", "--out", str(tmp_path / "run"), "--data-dir", str(data_root),
                                    "--set", "data.train_subset=64", "--set", "train.max_steps_per_epoch=1",
                                    "--set", "train.epochs=1", "--quiet"])
    monkeypatch.setattr(rf.os, "fsync", real)
    err = _one_line_error(capsys, status, str(tmp_path / "run"))
    assert "No space left on device" in err


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert task_main("classify", ["train", "--out", str(out), "--data-dir", str(data_root), "--quiet",
                                  "--set", "data.train_subset=128", "--set", "data.test_subset=64",
                                  "--set", "train.max_steps_per_epoch=1", "--set", "train.epochs=1"]) == 0
    return out / "checkpoints" / "best.pt"


def test_an_unknown_backbone_inside_a_checkpoint_names_the_file(small_checkpoint, tmp_path, capsys, data_root):
    state = load_checkpoint(small_checkpoint)
    state["config"]["model"]["backbone"] = "resnet19"
    lying = tmp_path / "lying.pt"
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, lying)
    for command in (["evaluate", "--checkpoint", str(lying), "--data-dir", str(data_root)],
                    ["predict", "--checkpoint", str(lying), "x.png"]):
        status = task_main("classify", command)
        err = _one_line_error(capsys, status, str(lying))
        assert "resnet19" in err


def test_soup_with_a_foreign_or_corrupt_checkpoint(small_checkpoint, tmp_path, capsys, data_root):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(256))
    foreign = tmp_path / "foreign.pt"
    state = load_checkpoint(small_checkpoint)
    save_checkpoint({**{k: v for k, v in state.items() if k != "format"}, "task": "ecg"}, foreign)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": NotATensor()}, unsafe)  # a pickle that would run our code: refused, never loaded
    for bad in (corrupt, foreign, plain, unsafe):
        status = cnnapps_main(["soup", "--task", "classify", str(small_checkpoint), str(bad), "--data-dir",
                               str(data_root), "--results", str(tmp_path / "res")])
        err = _one_line_error(capsys, status, str(bad))
        assert "weights_only=False" not in err


def test_config_prints_every_field_with_its_meaning_and_loads_back(tmp_path, capsys):
    for name in TASKS:
        task = get_task(name)
        assert task_main(name, ["config", "--config", "default"]) == 0
        text = capsys.readouterr().out
        assert "# passes over the training split [>= 1]" in text  # help and allowed values as comments
        copy = tmp_path / f"{name}.toml"
        copy.write_text(text)
        assert load_config(task.Config, copy) == load_config(task.Config, "default", search=task.config_dir())
    assert task_main("ecg", ["config", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "default" in listed and "ci" in listed and "hannun" in listed


def test_the_console_script_and_python_m_are_one_parser(capsys):
    assert sorted(list_tasks()) == sorted(TASKS)
    with pytest.raises(SystemExit) as version:
        cnnapps_main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("cnnapps ")
    assert cnnapps_main(["ecg", "config", "--config", "ci", "--set", "train.epochs=3"]) == 0
    via_console = capsys.readouterr().out
    assert task_main("ecg", ["config", "--config", "ci", "--set", "train.epochs=3"]) == 0
    assert capsys.readouterr().out == via_console and "epochs = 3" in via_console
    # every predict and evaluate flag says what it is for
    from cnnapps.tasks.cli import build_parser

    for name in TASKS:
        parser = build_parser(get_task(name))
        sub = next(a for a in parser._actions if a.dest == "command")
        for command in ("predict", "evaluate", "train", "bench", "config"):
            for action in sub.choices[command]._actions:
                if action.dest != "help":
                    assert action.help, f"{name} {command} {action.option_strings or action.dest} has no help"


def test_no_traceback_reaches_the_user_from_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnapps", "classify", "train", "--set", "train.grad_accum=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: train.grad_accum = 0: must be >= 1"
