"""The callback protocol and the built-in callbacks, each with its resume: a user's callback sees every hook in
order and keeps its state across a resume; EMA, early stopping, checkpoints, curves, run facts and transfer
behave the same in an interrupted-and-resumed run as in an uninterrupted one; the loggers (metrics.jsonl, CSV,
TensorBoard) agree with each other."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cnnapps.engine.callbacks import Callback
from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import fit
from cnnapps.tasks.classify.task import ClassifyConfig, ClassifyTask

SMALL = ["data.train_subset=512", "data.test_subset=128", "data.val_fraction=0.25", "train.batch_size=64",
         "train.epochs=3", "train.lr=0.05", "train.threads=1", "train.warmup_epochs=0"]


def _cfg(*extra: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, SMALL + list(extra))


class Interrupt(Callback):
    """Raise at the start of epoch ``at`` (a run killed there, as far as the run folder can tell)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer) -> None:
        if trainer.epoch == self.at:
            raise KeyboardInterrupt(f"interrupted at epoch {self.at}")


def _straight_and_resumed(tmp_path: Path, data_root: Path, cfg, at: int = 2, callbacks=lambda: []):
    """An uninterrupted fit, and the same fit interrupted at epoch ``at`` then resumed: (straight, resumed)."""
    straight = fit(ClassifyTask(), cfg, tmp_path / "straight", data_root, quiet=True, callbacks=callbacks())
    with pytest.raises(KeyboardInterrupt):
        fit(ClassifyTask(), cfg, tmp_path / "cut", data_root, quiet=True, callbacks=[*callbacks(), Interrupt(at)])
    resumed = fit(ClassifyTask(), cfg, tmp_path / "cut", data_root, quiet=True, resume=True, callbacks=callbacks())
    return straight, resumed


class Recorder(Callback):
    """Every hook call in order, a value of its own in each validation row, and a step count as its state."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.steps = 0

    def configure_model(self, trainer):
        self.calls.append("configure_model")

    def setup(self, trainer):
        self.calls.append("setup")

    def on_fit_start(self, trainer):
        self.calls.append("on_fit_start")

    def on_train_epoch_start(self, trainer):
        self.calls.append(f"on_train_epoch_start {trainer.epoch}")

    def on_train_batch_end(self, trainer, loss):
        assert isinstance(loss, float) and loss > 0
        self.steps += 1
        if "on_train_batch_end" not in self.calls[-1:]:
            self.calls.append("on_train_batch_end")

    def on_validation_end(self, trainer, row):
        assert "val_accuracy" in row
        row["val_recorder_steps"] = float(self.steps)
        self.calls.append("on_validation_end")

    def on_epoch_end(self, trainer, row):
        self.calls.append("on_epoch_end")

    def on_fit_end(self, trainer, result):
        assert result.test_metrics["examples"] == 128
        self.calls.append("on_fit_end")

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_a_user_callback_sees_every_hook_in_order_and_adds_values(tmp_path, data_root):
    rec = Recorder()
    result = fit(ClassifyTask(), _cfg("train.epochs=2", "train.max_steps_per_epoch=3"), tmp_path / "run",
                 data_root, quiet=True, callbacks=[rec])
    epoch = ["on_train_batch_end", "on_validation_end", "on_epoch_end"]
    assert rec.calls == ["configure_model", "setup", "on_fit_start", "on_train_epoch_start 1", *epoch,
                         "on_train_epoch_start 2", *epoch, "on_fit_end"]
    assert rec.steps == 6
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["val_recorder_steps"] for r in rows] == [3.0, 6.0]
    assert result.history[-1]["val_recorder_steps"] == 6.0


def test_a_callback_can_stop_the_fit(tmp_path, data_root):
    class StopAfterOne(Callback):
        def on_epoch_end(self, trainer, row):
            return True

    result = fit(ClassifyTask(), _cfg("train.max_steps_per_epoch=2"), tmp_path / "run", data_root, quiet=True,
                 callbacks=[StopAfterOne()])
    assert result.epochs_run == 1 and result.stopped_early
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1


def test_callback_state_survives_a_resume(tmp_path, data_root):
    straight, resumed = _straight_and_resumed(tmp_path, data_root, _cfg(), callbacks=lambda: [Recorder()])
    assert [r["val_recorder_steps"] for r in straight.history] == [r["val_recorder_steps"] for r in resumed.history]
    saved = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["callbacks"]["Recorder"]
    assert saved == {"steps": int(straight.history[-1]["val_recorder_steps"])}


def test_ema_weights_and_values_resume_exactly(tmp_path, data_root):
    straight, resumed = _straight_and_resumed(tmp_path, data_root, _cfg("train.ema_decay=0.9"))
    assert [r["val_ema_accuracy"] for r in straight.history] == [r["val_ema_accuracy"] for r in resumed.history]
    a, b = (load_checkpoint(tmp_path / r / "checkpoints/last.pt")["callbacks"]["EMA"]["model"]
            for r in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_counts_from_the_history_across_a_resume(tmp_path, data_root):
    # lr 0: the weights never change, so validation never improves after epoch 1
    cfg = _cfg("train.epochs=6", "train.lr=1e-12", "train.early_stop_patience=2", "train.max_steps_per_epoch=2")
    straight, resumed = _straight_and_resumed(tmp_path, data_root, cfg, at=3)
    assert straight.epochs_run == resumed.epochs_run == 3 and straight.stopped_early and resumed.stopped_early
    assert straight.best_epoch == resumed.best_epoch == 1


def test_checkpoints_curves_and_run_facts_after_a_resume(tmp_path, data_root):
    straight, resumed = _straight_and_resumed(tmp_path, data_root, _cfg())
    for run, result in (("straight", straight), ("cut", resumed)):
        folder = tmp_path / run
        last, best = (load_checkpoint(folder / "checkpoints" / n) for n in ("last.pt", "best.pt"))
        assert last["epoch"] == 3 and best["epoch"] == last["best_epoch"] == result.best_epoch
        assert (folder / "curves.png").stat().st_size > 0
        steps = last["callbacks"]["Curves"]["steps"]
        assert [s[0] for s in steps] == list(range(1, last["global_step"] + 1))  # every step once
        facts = json.loads((folder / "run.json").read_text())
        assert facts["task"] == "classify" and "commit" in facts and facts["resumed"] == (run == "cut")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints/last.pt")["callbacks"]["Curves"]["steps"]
            for r in ("straight", "cut"))
    assert a == b


def test_transfer_freezes_again_on_resume_and_loads_weights_once(tmp_path, data_root):
    fit(ClassifyTask(), _cfg("train.epochs=1", "train.max_steps_per_epoch=2"), tmp_path / "source", data_root,
        quiet=True)
    init = tmp_path / "source/checkpoints/best.pt"
    cfg = _cfg(f"train.init_checkpoint={init}", "train.freeze_stages=1", "train.reset_head=false")
    straight, resumed = _straight_and_resumed(tmp_path, data_root, cfg)
    source = load_checkpoint(init)["model"]
    for run in ("straight", "cut"):
        w = load_checkpoint(tmp_path / run / "checkpoints/last.pt")["model"]
        frozen = [k for k in w if k.startswith("c1.")]  # LeNet-5's first stage (C1, pooled by S2)
        assert frozen and all(torch.equal(w[k], source[k]) for k in frozen)  # frozen through both runs
    assert straight.test_metrics["accuracy"] == resumed.test_metrics["accuracy"]


def test_tensorboard_and_csv_agree_with_metrics_jsonl(tmp_path, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg("train.loggers=[\"jsonl\", \"tensorboard\", \"csv\"]", "train.max_steps_per_epoch=4")
    straight, resumed = _straight_and_resumed(tmp_path, data_root, cfg)
    run = tmp_path / "cut"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in table] == [r["epoch"] for r in rows] == [1, 2, 3]
    assert [float(r["val_accuracy"]) for r in table] == [r["val_accuracy"] for r in rows]

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    assert numeric <= tags and {"train/loss", "train/lr", "test/accuracy"} <= tags
    ends = [sum(r["steps"] for r in rows[:i + 1]) for i in range(len(rows))]  # each epoch's last step
    for key in numeric:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(s, pytest.approx(r[key], rel=1e-6)) for s, r in zip(ends, rows) if key in r], key
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 13))  # per step, each once despite the resume
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(resumed.test_metrics["accuracy"])
    assert any("confusion" in t for t in events.Tags()["images"])
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])


def test_a_resume_that_changes_the_schedule_says_so(tmp_path, data_root, caplog):
    cfg = _cfg("train.epochs=1", "train.max_steps_per_epoch=2", "train.schedule=onecycle")
    fit(ClassifyTask(), cfg, tmp_path / "run", data_root, quiet=True)
    longer = _cfg("train.epochs=3", "train.max_steps_per_epoch=2", "train.schedule=onecycle")
    with caplog.at_level("WARNING"):
        result = fit(ClassifyTask(), longer, tmp_path / "run", data_root, quiet=True, resume=True)
    assert result.epochs_run == 3  # one-cycle stretched to the new length instead of stepping past its end
    assert any("train.epochs 1 -> 3" in r.getMessage() and "onecycle" in r.getMessage() for r in caplog.records)
