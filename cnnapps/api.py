"""Training, evaluating and loading from Python: what the command line does, as three functions.

    import cnnapps
    result = cnnapps.train("classify", config="ci", overrides={"train.epochs": 1}, out="runs/mnist")
    values = cnnapps.evaluate(result.run_dir / "checkpoints" / "best.pt")
    model, preprocessing = cnnapps.load_model(result.run_dir / "checkpoints" / "best.pt")
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cnnapps.data.root import find_data_root
from cnnapps.engine.callbacks import Callback
from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.task import Task
from cnnapps.engine.trainer import FitResult, evaluate_checkpoints, fit, model_from_checkpoint
from cnnapps.tasks import get_task

PathLike = str | os.PathLike


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


def train(task: str | Task, config: PathLike | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
          out: PathLike | None = None, callbacks: Sequence[Callback] = (), data_dir: PathLike | None = None,
          resume: bool = False, overwrite: bool = False, quiet: bool = True) -> FitResult:
    """Train ``task`` (a name such as ``"ecg"`` or a Task) and evaluate its best weights on the test split.

    ``config``: a shipped config's name (``"ci"``) or a TOML file; None: the task's defaults. ``overrides``:
    ``{"train.epochs": 2}`` (typed values) or ``["train.epochs=2"]`` (as ``--set`` takes them). ``out``: the run
    folder (default ``runs/<task>/<time>``); ``callbacks``: your own ``cnnapps.engine.callbacks.Callback``
    objects, run beside the built-in ones. Returns the FitResult (run folder, test metrics, best epoch, history).
    """
    t = _task(task)
    run = Path(out) if out is not None else Path("runs") / t.name / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if resume and config is None:
        config = run / "config.toml"
    cfg = load_config(t.Config, config, overrides, search=t.config_dir())
    return fit(t, cfg, run, find_data_root(data_dir), resume=resume, quiet=quiet, callbacks=callbacks,
               overwrite=overwrite)


def _checkpoint_task(checkpoint: PathLike) -> Task:
    return get_task(str(load_checkpoint(checkpoint).get("task")))


def evaluate(checkpoint: PathLike | Sequence[PathLike], split: str = "test", data_dir: PathLike | None = None,
             out: PathLike | None = None, device: str = "auto") -> dict[str, float]:
    """Metrics of a checkpoint (several: their ensemble) on ``split`` (test, val, train, or all: every example
    of the folder ``data_dir``), with the preprocessing it was trained with. The task comes from the checkpoint.
    With ``out`` the values and pictures are also written there (``eval-<split>-<time>.json``)."""
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    task = _checkpoint_task(paths[0])
    return evaluate_checkpoints(task, paths, find_data_root(data_dir), split=split, out_dir=out, quiet=True,
                                device=device).values


def load_model(checkpoint: PathLike, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a checkpoint in eval mode, and its preprocessing: ``{"task", "config",
    "pretrained_cfg", ...}`` plus everything the task fitted on its training data (class names, sampling rate,
    normalisation, ...). ``pretrained_cfg`` holds the timm-style facts (classes, mean/std, input size or sampling
    rate, where the weights came from) and is also set on the model as ``model.pretrained_cfg``."""
    from cnnapps.engine.config import to_dict
    from cnnapps.export import load_pretrained_cfg

    task = _checkpoint_task(checkpoint)
    model, cfg, state = model_from_checkpoint(task, checkpoint, device)
    facts = load_pretrained_cfg(checkpoint)
    model.pretrained_cfg = facts
    return model, {"task": task.name, "config": to_dict(cfg), "pretrained_cfg": facts, **state}
