"""Callbacks: optional behaviour of a fit, kept outside the loop (Lightning's idea, smaller).

A callback overrides the hooks it needs; each receives the ``Trainer``, whose attributes are the state of the fit
(``model``, ``optimizer``, ``data``, ``metric``, ``epoch``, ``global_step``, ``history``, ``best_value``,
``best_epoch``, ``improved``, ``run_dir``, ``is_rank0``, ...). Hooks, in the order a fit calls them:

``configure_model``     the task built the model; before the optimiser (transfer, freezing, parameter groups)
``setup``               model, optimiser and schedule built; before a resume restores state
``on_fit_start``        everything built and restored; before the first epoch
``on_train_epoch_start``
``on_train_batch_end``  after each optimiser step, with that step's loss (``trainer.global_step`` counted)
``on_validation_end``   the model's validation values are in ``row``; a callback may add its own; True stops
``on_epoch_end``        the epoch's row is complete and in ``history``; True stops the fit after this epoch
``on_fit_end``          after the test evaluation, with the FitResult

A callback with state returns it from ``state_dict``; every checkpoint saves it under ``state_key`` and a
resumed run hands it back to ``load_state_dict`` before ``on_fit_start``. The trainer's ``default_callbacks``
are what every fit runs; ``Task.callbacks(cfg)`` adds a task's own and ``fit(..., callbacks=[...])`` a user's.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from cnnapps.engine.checkpoint import load_matching_weights, save_checkpoint
from cnnapps.engine.config import ConfigError
from cnnapps.engine.runinfo import load_average, run_facts
from cnnapps.engine.state import FitResult, FitState
from cnnapps.metrics.base import headline

log = logging.getLogger("cnnapps.engine")


class Callback:
    """Base class: every hook does nothing. See the module docstring for when each is called."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint (its class name; unique within a fit)."""
        return type(self).__name__

    def configure_model(self, trainer: FitState) -> None:
        pass

    def setup(self, trainer: FitState) -> None:
        pass

    def on_fit_start(self, trainer: FitState) -> None:
        pass

    def on_train_epoch_start(self, trainer: FitState) -> None:
        pass

    def on_train_batch_end(self, trainer: FitState, loss: float) -> None:
        pass

    def on_validation_end(self, trainer: FitState, row: dict[str, Any]) -> bool | None:
        pass

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> bool | None:
        pass

    def on_fit_end(self, trainer: FitState, result: FitResult) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------- the model before training


def stage_boundary(model: nn.Module, n_stages: int) -> tuple[list[str], list[str]]:
    """Split parameter names into (body, head): body = the parameters of every module registered up to the end
    of the backbone's first ``n_stages`` feature stages (all stages when n_stages < 0), stem included. A task
    model holds its zoo network as ``.backbone``; anything outside the backbone counts as head."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ConfigError("train.freeze_stages / train.backbone_lr_mult need a backbone with feature_info")
    names = [n for n, _ in model.named_parameters()]
    n = len(info) if n_stages < 0 else min(n_stages, len(info))
    if n == 0:
        return [], names
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # registration (pre-)order
    stage = prefix + info.module_name(n - 1)
    if stage not in order:
        raise ConfigError(f"feature stage module {stage!r} not found in the model")
    end = max(i for name, i in order.items() if name == stage or name.startswith(stage + "."))
    body = [p for p in names if p.startswith(prefix) and order[p.rsplit(".", 1)[0]] <= end]
    body_set = set(body)
    return body, [p for p in names if p not in body_set]


class Transfer(Callback):
    """``train.init_checkpoint``, ``freeze_stages``, ``reset_head`` and ``backbone_lr_mult``: start from other
    weights, keep the first stages fixed, train the backbone at a lower rate. The weights are loaded on a fresh
    run only (a resumed one has its own); freezing and parameter groups apply to both."""

    def configure_model(self, trainer: FitState) -> None:
        tc, model = trainer.tc, trainer.model
        if tc.init_checkpoint and not trainer.resuming:
            head = stage_boundary(model, -1)[1] if tc.reset_head else []
            loaded, skipped = load_matching_weights(model, tc.init_checkpoint, skip_names=tuple(head))
            log.info("init_checkpoint %s: loaded %d tensors, kept %d fresh (%s%s)", tc.init_checkpoint, len(loaded),
                     len(skipped), ", ".join(skipped[:4]), " ..." if len(skipped) > 4 else "")
        if tc.freeze_stages:
            frozen, _ = stage_boundary(model, tc.freeze_stages)
            params = dict(model.named_parameters())
            for name in frozen:
                params[name].requires_grad_(False)
            log.info("froze %d parameter tensors (freeze_stages=%d)", len(frozen), tc.freeze_stages)
        if trainer.param_groups is None and tc.backbone_lr_mult != 1.0:
            body, head = stage_boundary(model, -1)
            params = dict(model.named_parameters())
            groups = [{"params": [params[n] for n in body if params[n].requires_grad],
                       "lr": tc.lr * tc.backbone_lr_mult},
                      {"params": [params[n] for n in head if params[n].requires_grad], "lr": tc.lr}]
            trainer.param_groups = [g for g in groups if g["params"]]


# ---------------------------------------------------------------- during training


class EMA(Callback):
    """``train.ema_decay``: a Polyak (exponential moving) average of the weights, updated after every optimiser
    step and validated beside the raw weights (``val_ema_*``). Its weights are part of every checkpoint."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.model: AveragedModel | None = None

    def setup(self, trainer: FitState) -> None:
        self.model = AveragedModel(trainer.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    def on_train_batch_end(self, trainer: FitState, loss: float) -> None:
        self.model.update_parameters(trainer.model)

    def on_validation_end(self, trainer: FitState, row: dict[str, Any]) -> None:
        if trainer.is_rank0 and trainer.data.val is not None:
            values = trainer.evaluate(self.model.module, trainer.data.val, desc="val ema",
                                      metric=trainer.task.metrics(trainer.cfg, trainer.data))
            row.update({f"val_ema_{k}": v for k, v in values.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()} if self.model is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("model") is not None:
            self.model.load_state_dict(state["model"])


class EarlyStopping(Callback):
    """``train.early_stop_patience``: stop when ``patience`` validations in a row did not improve the monitored
    metric. The count is read from the history (validated epochs after the best one), so it needs no state of
    its own and a resumed run counts exactly as an uninterrupted one."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> bool:
        key = f"val_{trainer.monitor}"
        bad = sum(1 for h in trainer.history if h["epoch"] > trainer.best_epoch and key in h)
        if bad >= self.patience:
            log.info("early stop: %s did not improve for %d validations", trainer.monitor, bad)
            return True
        return False


class ProgressBar(Callback):
    """A tqdm bar per training epoch (on a terminal, rank 0, not quiet) and one log line per epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def on_train_epoch_start(self, trainer: FitState) -> None:
        if self.enabled and trainer.is_rank0:
            self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {trainer.epoch}/{trainer.tc.epochs}",
                            leave=False, file=sys.stderr)
            self.loss_sum, self.n = 0.0, 0

    def on_train_batch_end(self, trainer: FitState, loss: float) -> None:
        if self.bar is not None:
            self.loss_sum, self.n = self.loss_sum + loss, self.n + 1
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss_sum / self.n:.4f}")

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if trainer.is_rank0:
            vals = ", ".join(f"{k}={v:.4f}" for k, v in headline(row).items()
                             if k.startswith("val_") and isinstance(v, float) and "ema" not in k)
            log.info("epoch %d: train_loss=%.4f %s (%.1fs, %.0f samples/s)", row["epoch"], row["train_loss"], vals,
                     row["seconds"], row["samples_per_s"])


# ---------------------------------------------------------------- the run folder


class Checkpoint(Callback):
    """``checkpoints/best.pt`` and ``last.pt`` after every epoch (rank 0), each written atomically.

    The order makes every kill point safe: best.pt (when the epoch improved) is written before last.pt, so
    last.pt never names a best epoch whose weights are not on disk; a kill between the two leaves the previous
    last.pt, and the resumed run repeats the epoch exactly and writes both again. Runs last among the epoch-end
    callbacks, so the states it saves include theirs."""

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> None:
        if not trainer.is_rank0:
            return
        folder = trainer.run_dir / "checkpoints"
        payload = trainer.checkpoint_payload()
        if trainer.improved:
            save_checkpoint(payload, folder / "best.pt")
        save_checkpoint(payload, folder / "last.pt")


class RunFacts(Callback):
    """``run.json``: machine, commit, time and versions when the fit starts, its end (load, wall time) when it
    finishes, so ``bench --from-run`` can record a long run made with ``train``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def on_fit_start(self, trainer: FitState) -> None:
        path = trainer.run_dir / "run.json"
        if trainer.is_rank0 and not (trainer.resuming and path.is_file()):
            trainer.run.write_text("run.json", json.dumps({"task": trainer.task.name, **run_facts(trainer.device)},
                                                          indent=2) + "\n")

    def on_fit_end(self, trainer: FitState, result: FitResult) -> None:
        path = trainer.run_dir / "run.json"
        if not trainer.is_rank0:
            return
        facts = json.loads(path.read_text()) if path.is_file() else {}
        facts.update({"load_at_end": load_average(), "wall_seconds": round(time.perf_counter() - self.t0, 2),
                      "resumed": bool(trainer.resuming),
                      "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        trainer.run.write_text("run.json", json.dumps(facts, indent=2) + "\n")


class Curves(Callback):
    """``curves.png`` at the end of the fit: loss (train and validation), the monitored metric per epoch and the
    learning rate per optimiser step (so warm-up and one-cycle shapes show). Keeps the per-step learning rates
    and losses as its state, so a resumed run draws the whole run."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []  # [global step, lr, loss]

    def on_train_batch_end(self, trainer: FitState, loss: float) -> None:
        self.steps.append([trainer.global_step, trainer.optimizer.param_groups[-1]["lr"], loss])

    def on_fit_end(self, trainer: FitState, result: FitResult) -> None:
        from cnnapps.engine.plots import plot_curves

        if trainer.is_rank0 and trainer.history:
            plot_curves(trainer.history, self.steps, trainer.steps_per_epoch, trainer.run_dir / "curves.png",
                        trainer.monitor)
            trainer.pictures["training curves"] = "curves.png"

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [list(s) for s in state.get("steps", [])]


class TaskReport(Callback):
    """The task's own report of the test evaluation (confusion matrices, example pictures) into the run folder."""

    def on_fit_end(self, trainer: FitState, result: FitResult) -> None:
        if trainer.is_rank0 and trainer.test_metric is not None:
            trainer.pictures.update(trainer.task.report(trainer.run_dir, trainer.test_metric, trainer.data) or {})


def picture_paths(run_dir: Path, pictures: dict[str, str]) -> list[Path]:
    """The PNG files among a report's ``{what: relative path}`` that exist."""
    return [run_dir / p for p in pictures.values() if str(p).endswith(".png") and (run_dir / p).is_file()]
