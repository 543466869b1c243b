"""Classification task through the engine on real MNIST: smoke fit, exact resume, errors, evaluate, predict."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_eval
from cnnapps.engine.callbacks import Callback
from cnnapps.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import TrainingDiverged, fit
from cnnapps.tasks.classify.task import ClassifyConfig, ClassifyTask
from cnnapps.tasks.cli import main

SMALL = ["data.train_subset=640", "data.test_subset=256", "data.val_fraction=0.2", "train.batch_size=64",
         "train.epochs=2", "train.lr=0.05", "train.threads=2", "train.warmup_epochs=0"]


def _cfg(*extra: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, SMALL + list(extra))


def test_two_batch_smoke_fit_writes_the_run_folder(tmp_path, data_root):
    cfg = _cfg("train.max_steps_per_epoch=2", "train.epochs=1")
    result = fit(ClassifyTask(), cfg, tmp_path / "run", data_root, quiet=True)
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "curves.png", "confusion.png"):
        assert (run / name).is_file(), name
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["steps"] == 2 and {"train_loss", "val_accuracy", "lr", "seconds", "samples_per_s"} <= set(row)
    final = json.loads((run / "metrics.json").read_text())
    assert final["examples"] == 256 and 0.0 <= final["accuracy"] <= 1.0
    assert result.test_metrics["accuracy"] == final["accuracy"]


def test_resume_after_an_interruption_reaches_the_same_weights(tmp_path, data_root):
    cfg = _cfg()
    straight = fit(ClassifyTask(), cfg, tmp_path / "straight", data_root, quiet=True)

    class InterruptEpochTwo(Callback):
        def on_train_epoch_start(self, trainer):
            if trainer.epoch == 2:
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        fit(ClassifyTask(), cfg, tmp_path / "killed", data_root, quiet=True, callbacks=[InterruptEpochTwo()])
    assert load_checkpoint(tmp_path / "killed/checkpoints/last.pt")["epoch"] == 1
    resumed = fit(ClassifyTask(), cfg, tmp_path / "killed", data_root, resume=True, quiet=True)

    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "killed/checkpoints/last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.test_metrics["accuracy"] == straight.test_metrics["accuracy"]


def test_non_finite_loss_names_epoch_and_step(tmp_path, data_root, monkeypatch):
    task = ClassifyTask()
    real_step = task.step
    calls = {"n": 0}

    def nan_on_third_step(model, batch, cfg):
        out = real_step(model, batch, cfg)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(task, "step", nan_on_third_step)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 3"):
        fit(task, _cfg("train.epochs=1"), tmp_path / "run", data_root, quiet=True)


def test_cli_train_evaluate_predict(tmp_path, data_root, capsys):
    out = tmp_path / "cli"
    args = ["--data-dir", str(data_root), "--out", str(out), "--quiet"]
    assert main("classify", ["train", *args, *sum((["--set", s] for s in SMALL + ["train.epochs=1"]), [])]) == 0
    ckpt = out / "checkpoints" / "best.pt"
    capsys.readouterr()
    assert main("classify", ["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data_root),
                             "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    evaluated = read_eval(tmp_path / "ev")
    trained = json.loads((out / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])  # same 256 test digits, same weights

    with np.load(data_root / "mnist" / "mnist.npz") as z:
        img = z["x_test"][0]
    png = tmp_path / "digit.png"
    Image.fromarray(img).save(png)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    capsys.readouterr()
    status = main("classify", ["predict", "--checkpoint", str(ckpt), str(png), str(broken), "--quiet"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1  # one input failed, and the exit status says so
    assert rows[0]["input"] == str(png) and rows[0]["label"] in [str(i) for i in range(10)]
    assert len(rows[0]["top"]) == 5 and "broken.png" in rows[1]["error"]


def test_cli_reports_bad_config_and_bad_checkpoint(tmp_path, data_root, capsys):
    assert main("classify", ["train", "--data-dir", str(data_root), "--out", str(tmp_path / "x"),
                             "--set", "train.lrr=1"]) == 2
    assert "unknown key(s) lrr" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main("classify", ["evaluate", "--checkpoint", str(bad), "--data-dir", str(data_root)]) == 2
    assert "bad.pt: not a readable checkpoint" in capsys.readouterr().err


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, data_root, capsys):
    cfg = _cfg("train.max_steps_per_epoch=1", "train.epochs=1")
    fit(ClassifyTask(), cfg, tmp_path / "run", data_root, quiet=True)
    state = load_checkpoint(tmp_path / "run/checkpoints/best.pt")
    state["config"]["model"]["backbone"] = "resnet18"  # the weights are LeNet-5's
    save_checkpoint(state, tmp_path / "lying.pt")
    assert main("classify", ["evaluate", "--checkpoint", str(tmp_path / "lying.pt"),
                             "--data-dir", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert "lying.pt: the checkpoint does not fit this model" in err and "missing" in err
    with pytest.raises(CheckpointError, match="written by task 'classify', not 'ecg'"):
        load_checkpoint(tmp_path / "run/checkpoints/best.pt", task="ecg")


def test_transfer_freezes_stages_and_resets_the_head(tmp_path, data_root):
    src = fit(ClassifyTask(), _cfg("train.epochs=1"), tmp_path / "mnist", data_root, quiet=True)
    ckpt = src.run_dir / "checkpoints" / "best.pt"
    cfg = load_config(ClassifyConfig, None, ["data.dataset=digits", "data.image_size=32", "train.epochs=1",
                                             "train.freeze_stages=2", f"train.init_checkpoint={ckpt}",
                                             "train.threads=2"])
    fit(ClassifyTask(), cfg, tmp_path / "digits", data_root, quiet=True)
    before = load_checkpoint(ckpt)["model"]
    after = load_checkpoint(tmp_path / "digits/checkpoints/last.pt")["model"]
    from cnnapps.engine.trainer import _stage_boundary
    from cnnapps.backbones import create_backbone

    frozen, head = _stage_boundary(create_backbone("lenet5", num_classes=10, in_chans=1), 2)
    assert frozen, "freeze_stages=2 froze nothing"
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} changed although frozen"
    assert any(not torch.equal(before[n], after[n]) for n in head if n.endswith("weight"))


def test_evaluate_split_all_on_an_image_folder_counts_bad_files(tmp_path, data_root, capsys):
    """A user's ImageFolder tree is evaluated whole with the checkpoint's preprocessing; a corrupt image is a
    logged, counted skip."""
    fit(ClassifyTask(), _cfg("train.max_steps_per_epoch=3", "train.epochs=1"), tmp_path / "run", data_root,
        quiet=True)
    with np.load(data_root / "mnist" / "mnist.npz") as z:
        images, labels = z["x_test"][:30], z["y_test"][:30]
    tree = tmp_path / "digits"
    for i, (img, label) in enumerate(zip(images, labels)):
        (tree / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tree / str(label) / f"{i}.png")
    (tree / "3" / "broken.png").write_bytes(b"not an image")
    assert main("classify", ["evaluate", "--checkpoint", str(tmp_path / "run/checkpoints/best.pt"), "--split", "all",
                             "--data-dir", str(tree), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    metrics = read_eval(tmp_path / "ev")
    assert metrics["examples"] == 30 and metrics["skipped: unreadable image"] == 1
    assert isinstance(metrics["examples"], int)  # a count prints as one


def test_a_torchvision_weights_file_initialises_the_backbone(tmp_path, data_root):
    import torchvision

    tv = torchvision.models.resnet18(num_classes=1000)
    torch.save(tv.state_dict(), tmp_path / "resnet18-tv.pth")
    cfg = _cfg("model.backbone=resnet18", "data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=1",
               "model.in_chans=3", f"train.init_checkpoint={tmp_path / 'resnet18-tv.pth'}", "train.freeze_stages=-1")
    fit(ClassifyTask(), cfg, tmp_path / "run", data_root, quiet=True)
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    # every body tensor came from the file and stayed frozen; the 10-class head is new
    assert torch.equal(state["layer4.1.conv2.weight"], tv.state_dict()["layer4.1.conv2.weight"])
    assert torch.equal(state["conv1.weight"], tv.state_dict()["conv1.weight"])
    assert state["fc.weight"].shape == (10, 512)


def test_the_split_follows_data_split_seed_not_train_seed(data_root):
    """Runs that differ only in train.seed (soup ingredients, seed studies) must see one validation split."""
    def val_and_test(*extra: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = ClassifyTask().build_data(_cfg(*extra), data_root)
        return data.val.images, data.test.images

    v0, t0 = val_and_test()
    v1, t1 = val_and_test("train.seed=7")
    assert torch.equal(v0, v1) and torch.equal(t0, t1)
    v2, _ = val_and_test("data.split_seed=7")
    assert not torch.equal(v0, v2)
