"""The training loop: build, restore, train an epoch, validate, let the callbacks act, evaluate the best weights.

Tasks say what a step is; this module says when. Everything optional (transfer, EMA, early stopping, checkpoints,
loggers, curves, reports, run facts) is a callback (``cnnapps.engine.callbacks``); torch.distributed details live
in ``cnnapps.engine.distributed``; the run folder's lock and atomic files in ``cnnapps.engine.runfolder``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from cnnapps.engine import distributed as ddp
from cnnapps.engine.callbacks import (EMA, Callback, Checkpoint, Curves, EarlyStopping, ProgressBar, RunFacts,
                                      TaskReport, Transfer, stage_boundary)
from cnnapps.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from cnnapps.engine.config import ConfigError, TrainConfig, dumps_toml, from_dict, to_dict
from cnnapps.engine.optim import build_optimizer, build_scheduler
from cnnapps.engine.loggers import make_loggers
from cnnapps.engine.runfolder import RunFolder, RunFolderError, write_atomic
from cnnapps.engine.state import FitResult
from cnnapps.engine.sampling import EpochShardSampler
from cnnapps.engine.seeding import epoch_seed, rng_states, seed_everything, seed_worker, set_rng_states
from cnnapps.engine.task import DataSplits, Task, TaskConfig
from cnnapps.metrics.base import Metric

log = logging.getLogger(__name__)

__all__ = ["FitResult", "Trainer", "TrainingDiverged", "RunFolderError", "fit", "evaluate_checkpoints",
           "model_from_checkpoint", "resolve_device", "stage_boundary"]
_stage_boundary = stage_boundary  # the name earlier code imported


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


# ---------------------------------------------------------------- small helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    return device


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) batch to ``device``; 4D float tensors optionally channels_last."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        if channels_last and t.dim() == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def detach_output(output: Any) -> Any:
    """Outputs handed to metrics: detached, float32 (autocast may give bf16)."""
    if isinstance(output, torch.Tensor):
        output = output.detach()
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return {k: detach_output(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(detach_output(v) for v in output)
    return output


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0]) if batch and not isinstance(batch[0], dict) else len(batch)
    return 1


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``fp32`` (off), ``bf16`` or ``fp16``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ConfigError(f"train.precision: unknown {precision!r} (fp32, bf16, fp16)")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def make_loader(dataset: Dataset, data: DataSplits, tc: TrainConfig, train: bool, epoch: int,
                device: torch.device) -> DataLoader:
    """The DataLoader of one pass: training batches in the seeded order of ``(seed, epoch)``, this process's
    share of each global batch under torch.distributed; evaluation batches in order."""
    workers = tc.num_workers if tc.num_workers >= 0 else (min(4, os.cpu_count() or 1) if device.type == "cuda" else 0)
    g = torch.Generator()
    g.manual_seed(epoch_seed(tc.seed, epoch))
    world = ddp.world_size()
    if train:
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(f"train.batch_size {tc.batch_size} must be divisible by world size {world} "
                              f"x grad_accum {tc.grad_accum}")
        bs = tc.batch_size // (world * tc.grad_accum)
        sampler = EpochShardSampler(len(dataset), tc.batch_size, epoch_seed(tc.seed, epoch), rank=ddp.rank(),
                                    world=world, weights=data.sample_weights, drop_last=world > 1)
    else:
        bs = tc.eval_batch_size or tc.batch_size
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=bs, sampler=sampler, collate_fn=data.collate_fn, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      worker_init_fn=seed_worker, generator=g, drop_last=False)


def run_eval(task: Task, cfg: TaskConfig, model: nn.Module, loader: DataLoader, metric: Metric,
             device: torch.device, desc: str = "eval", quiet: bool = True) -> dict[str, float]:
    """Metric values of ``model`` over every batch of ``loader``, plus ``loss`` (mean per example) where the
    task's step gives a loss in evaluation (a detector in eval mode gives none)."""
    model.eval()
    metric.reset()
    total, n, scored = 0.0, 0, False
    show = not quiet and sys.stderr.isatty() and ddp.is_rank0()
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
            batch = to_device(batch, device, cfg.train.channels_last)
            with autocast(device, cfg.train.precision):
                out = task.step(model, batch, cfg)
            bs = batch_size_of(batch)
            if out.get("loss") is not None:
                total += float(out["loss"]) * bs
                scored = True
            n += bs
            metric.update(detach_output(out["output"]), batch)
    values = metric.compute()
    if scored:
        values["loss"] = total / max(n, 1)
    return values


# ---------------------------------------------------------------- the trainer


def default_callbacks(tc: TrainConfig, quiet: bool) -> tuple[list[Callback], list[Callback]]:
    """What every fit runs, as (before the task's and the user's callbacks, after them): transfer, EMA, early
    stopping, progress, curves and the task's report first; the loggers of ``train.loggers``, run facts and
    checkpoints last (so they see every value the others add, and checkpoints hold every state)."""
    before: list[Callback] = [Transfer()]
    if tc.ema_decay > 0:
        before.append(EMA(tc.ema_decay))
    if tc.early_stop_patience:
        before.append(EarlyStopping(tc.early_stop_patience))
    before += [ProgressBar(enabled=not quiet and sys.stderr.isatty()), Curves(), TaskReport()]
    after: list[Callback] = [*make_loggers(tc.loggers), RunFacts(), Checkpoint()]
    return before, after


class Trainer:
    """One fit of one task: ``Trainer(task, cfg, run_dir, data_root, callbacks=[...]).fit(resume=False)``.

    Its attributes are the state of the fit that callbacks read (``model``, ``optimizer``, ``scheduler``,
    ``data``, ``metric``, ``epoch``, ``global_step``, ``history``, ``best_value``, ``best_epoch``, ``improved``,
    ``steps_per_epoch``, ``run_dir``, ``run``, ``device``, ``is_rank0``, ``resuming``). ``overwrite`` replaces a
    run folder that holds another run (without it, and without ``resume``, such a folder is refused)."""

    def __init__(self, task: Task, cfg: TaskConfig, run_dir: str | os.PathLike, data_root: str | os.PathLike,
                 callbacks: Sequence[Callback] = (), quiet: bool = False, overwrite: bool = False) -> None:
        self.task, self.cfg, self.tc = task, cfg, cfg.train
        self.run_dir, self.data_root = Path(run_dir), Path(data_root)
        self.quiet, self.overwrite = quiet, overwrite
        self.monitor = self.tc.monitor or task.monitor
        self.mode = task.monitor_mode if self.monitor == task.monitor else "max"
        if self.monitor.endswith("loss"):
            self.mode = "min"
        before, after = default_callbacks(self.tc, quiet)
        self.callbacks: list[Callback] = [*before, *task.callbacks(cfg), *callbacks, *after]
        keys = [cb.state_key for cb in self.callbacks]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"callbacks: two share a state_key ({', '.join(sorted(k for k in keys if keys.count(k) > 1))}); "
                              "give one a state_key property of its own")
        # only the callbacks that implement a hook are called for it (the per-step ones run thousands of times)
        self._hooks = {name: [cb for cb in self.callbacks if getattr(type(cb), name) is not getattr(Callback, name)]
                       for name in ("configure_model", "setup", "on_fit_start", "on_train_epoch_start",
                                    "on_train_batch_end", "on_validation_end", "on_epoch_end", "on_fit_end")}
        self.device = torch.device("cpu")
        self.is_rank0, self.resuming = True, False
        self.run: RunFolder | None = None
        self.data: DataSplits | None = None
        self.model: nn.Module | None = None
        self.train_model: nn.Module | None = None
        self.param_groups: list[dict] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.metric: Metric | None = None
        self.test_metric: Metric | None = None
        self.epoch, self.global_step, self.steps_per_epoch = 0, 0, 0
        self.history: list[dict] = []
        self.best_value: float | None = None
        self.best_epoch, self.improved = 0, False
        self.pictures: dict[str, str] = {}

    # ---- the loop
    def fit(self, resume: bool = False) -> FitResult:
        """Train, validate each epoch, keep best.pt/last.pt, then evaluate the best weights on the test split."""
        self.resuming = resume
        self._setup_process()
        folder = RunFolder(self.run_dir, resume=resume, overwrite=self.overwrite) if self.is_rank0 else None
        with folder or contextlib.nullcontext():
            self.run = folder
            self._build()
            if resume:
                self._restore()
            if self.is_rank0:  # written once the config has proved it fits (a failed resume leaves the old one)
                self.run.write_text("config.toml", dumps_toml(to_dict(self.cfg)))
            self._emit("on_fit_start")
            stop = False
            while not stop and self.epoch < self.tc.epochs:
                self.epoch += 1
                row = self._train_epoch()
                if self._validates():
                    row.update({f"val_{k}": v for k, v in self.evaluate(self.model, self.data.val, "val").items()})
                    stop = self._emit_stop("on_validation_end", row)
                self._update_monitor(row)
                self.history.append(row)
                stop = ddp.broadcast_flag(self._emit_stop("on_epoch_end", row) or stop, self.device)
            result = self._test(stopped_early=stop and self.epoch < self.tc.epochs)
            self._emit("on_fit_end", result)
        ddp.barrier()
        return result

    def _train_epoch(self) -> dict[str, Any]:
        tc = self.tc
        # Every epoch re-seeds from (seed, epoch): a resumed run shuffles and augments exactly as the original.
        seed_everything(epoch_seed(tc.seed, self.epoch), tc.deterministic)
        loader = make_loader(self.data.train, self.data, tc, True, self.epoch, self.device)
        self.train_model.train()
        self._emit("on_train_epoch_start")
        t0, seen, loss_sum, step_loss, steps = time.perf_counter(), 0, 0.0, 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            batch = to_device(batch, self.device, tc.channels_last)
            with autocast(self.device, tc.precision):
                loss = self.task.step(self.train_model, batch, self.cfg)["loss"]
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(self._diverged(value, steps + 1))
            self.scaler.scale(loss / tc.grad_accum).backward()
            bs = batch_size_of(batch)
            seen, loss_sum, step_loss = seen + bs, loss_sum + value * bs, step_loss + value / tc.grad_accum
            if (i + 1) % tc.grad_accum:
                continue
            self._optimizer_step()
            steps, self.global_step = steps + 1, self.global_step + 1
            for cb in self._hooks["on_train_batch_end"]:
                cb.on_train_batch_end(self, step_loss)
            step_loss = 0.0
            if steps >= self.steps_per_epoch:
                break
        seconds = time.perf_counter() - t0
        return {"epoch": self.epoch, "train_loss": loss_sum / max(seen, 1),
                "lr": self.optimizer.param_groups[-1]["lr"], "seconds": round(seconds, 3),
                "samples_per_s": round(seen / max(seconds, 1e-9), 2), "steps": steps}

    def _optimizer_step(self) -> None:
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step()

    def evaluate(self, model: nn.Module, dataset: Dataset, desc: str, metric: Metric | None = None
                 ) -> dict[str, float]:
        """Metric values of ``model`` on ``dataset`` (rank 0 only; the others get {})."""
        if not self.is_rank0:
            return {}
        loader = make_loader(dataset, self.data, self.tc, False, self.epoch, self.device)
        return run_eval(self.task, self.cfg, model, loader, metric or self.metric, self.device, desc, self.quiet)

    # ---- building, restoring, finishing
    def _setup_process(self) -> None:
        self.device = resolve_device(self.tc.device)
        ddp.init(self.device)
        self.is_rank0 = ddp.is_rank0()
        if self.tc.threads > 0:
            torch.set_num_threads(self.tc.threads)
        seed_everything(self.tc.seed, self.tc.deterministic)

    def _build(self) -> None:
        tc = self.tc
        self.data = data = self.task.build_data(self.cfg, self.data_root)
        for reason, count in data.skipped.items():
            log.warning("skipped %d example(s): %s", count, reason)
        self.model = self.task.build_model(self.cfg, data)
        self.param_groups = self.task.param_groups(self.model, self.cfg)
        self._emit("configure_model")
        self.model = ddp.prepare_model(self.model, self.device, tc.sync_bn).to(self.device)
        if tc.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.param_groups if self.param_groups is not None else
                                         [p for p in self.model.parameters() if p.requires_grad], tc)
        batches = len(make_loader(data.train, data, tc, True, 0, self.device))
        self.steps_per_epoch = min(math.ceil(batches / tc.grad_accum), tc.max_steps_per_epoch or batches)
        self.scheduler = build_scheduler(self.optimizer, tc, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.metric = self.task.metrics(self.cfg, data)
        self._emit("setup")
        self.train_model = ddp.wrap(torch.compile(self.model) if tc.compile else self.model, self.device)

    def _restore(self) -> None:
        last = self.run_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"--resume: no {last} to resume from")
        state = load_checkpoint(last, task=self.task.name)
        load_model_state(self.model, state["model"], last)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        self.epoch, self.best_value, self.best_epoch = state["epoch"], state["best_value"], state["best_epoch"]
        self.history = list(state.get("history", []))
        self.global_step = int(state.get("global_step", sum(h.get("steps", 0) for h in self.history)))
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
        self._note_schedule_change(state.get("config", {}).get("train", {}).get("epochs"))
        log.info("resumed %s after epoch %d", last, self.epoch)

    def _note_schedule_change(self, old_epochs: int | None) -> None:
        """A resumed run with another number of epochs continues its schedule over the new length; say so."""
        if old_epochs is None or old_epochs == self.tc.epochs:
            return
        if hasattr(self.scheduler, "total_steps"):  # one-cycle keeps its length in its state
            self.scheduler.total_steps = self.tc.epochs * self.steps_per_epoch
        log.warning("resumed with train.epochs %d -> %d: the %s schedule now spans %d epochs from where it stood "
                    "(its shape differs from a run planned for %d epochs from the start)", old_epochs,
                    self.tc.epochs, self.tc.schedule, self.tc.epochs, self.tc.epochs)

    def _validates(self) -> bool:
        return self.data.val is not None and (self.epoch % self.tc.eval_every == 0 or self.epoch == self.tc.epochs)

    def _update_monitor(self, row: dict[str, Any]) -> None:
        """Best value and epoch of the monitored metric; ``improved`` says whether this epoch is the new best."""
        if not self._validates():  # without a validation split the latest weights are the best
            self.improved = self.data.val is None
            self.best_epoch = self.epoch if self.improved else self.best_epoch
            return
        key = f"val_{self.monitor}"
        if self.is_rank0 and key not in row:
            raise ConfigError(f"train.monitor: {self.monitor!r} is not among the task's validation metrics: "
                              f"{', '.join(k[4:] for k in row if k.startswith('val_'))}")
        value = ddp.broadcast_value(row.get(key), self.device)
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(value if self.mode == "max" else -value)
        best = self.best_value
        self.improved = best is None or (value > best if self.mode == "max" else value < best)
        if self.improved:
            self.best_value, self.best_epoch = value, self.epoch

    def _test(self, stopped_early: bool) -> FitResult:
        """Load best.pt and evaluate it on the test split; metrics.json (rank 0)."""
        test: dict[str, float] = {}
        train_seconds = round(sum(h.get("seconds", 0.0) for h in self.history), 2)
        if self.is_rank0:
            best = self.run_dir / "checkpoints" / "best.pt"
            if best.is_file():
                load_model_state(self.model, load_checkpoint(best, task=self.task.name)["model"], best)
            if self.data.test is not None:
                test = self.evaluate(self.model, self.data.test, "test")
                self.test_metric = self.metric
            test.update({"best_epoch": self.best_epoch, "train_seconds": train_seconds})
            self.run.write_text("metrics.json", json.dumps(test, indent=2) + "\n")
        return FitResult(self.run_dir, test, self.best_epoch, self.best_value, len(self.history), train_seconds,
                         list(self.history), stopped_early)

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything a resumed run needs, and what evaluation and transfer read (model, config, data state)."""
        return {"task": self.task.name, "config": to_dict(self.cfg), "data_state": self.data.state,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
                "best_value": self.best_value, "best_epoch": self.best_epoch, "monitor": self.monitor,
                "rng": rng_states(), "history": self.history,
                "callbacks": {cb.state_key: s for cb in self.callbacks if (s := cb.state_dict())}}

    def _diverged(self, value: float, step: int) -> str:
        last = self.run_dir / "checkpoints" / "last.pt"
        where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        return f"non-finite loss ({value}) at epoch {self.epoch}, step {step}; {where}"

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self._hooks[hook]:
            getattr(cb, hook)(self, *args)

    def _emit_stop(self, hook: str, row: dict[str, Any]) -> bool:
        """Call ``hook`` on every callback (all of them, even after one asks to stop); True if any asked."""
        return any([bool(getattr(cb, hook)(self, row)) for cb in self._hooks[hook]])


def fit(task: Task, cfg: TaskConfig, run_dir: str | os.PathLike, data_root: str | os.PathLike,
        resume: bool = False, quiet: bool = False, callbacks: Sequence[Callback] = (),
        overwrite: bool = False) -> FitResult:
    """Train ``task`` with ``cfg`` into ``run_dir``; see ``Trainer``."""
    return Trainer(task, cfg, run_dir, data_root, callbacks=callbacks, quiet=quiet, overwrite=overwrite).fit(resume)


# ---------------------------------------------------------------- using finished checkpoints


def model_from_checkpoint(task: Task, path: str | os.PathLike, device: torch.device | str = "cpu",
                          overrides: dict | None = None) -> tuple[nn.Module, TaskConfig, dict]:
    """Rebuild the model a checkpoint was trained as, with its weights: (model in eval mode, config, data state)."""
    state = load_checkpoint(path, task=task.name)
    try:
        cfg = from_dict(task.Config, state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its config does not fit this version of task {task.name!r}: {exc}") from None
    data_state = state.get("data_state", {})
    try:
        model = task.build_model(cfg, DataSplits(train=None, val=None, test=None, state=data_state))
    except (ConfigError, KeyError, ValueError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{path}: cannot rebuild its model: {reason}") from None
    load_model_state(model, state["model"], path)
    model.to(device).eval()
    return model, cfg, data_state


class MeanOfModels(nn.Module):
    """An ensemble: the mean of its members' outputs (logits averaged, or probabilities where a task says so)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Any) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def split_dataset(data: DataSplits, split: str, task: Task) -> Dataset:
    """The dataset of ``split`` (``all`` is carried in ``test``); ConfigError if the task has none."""
    dataset = {"train": data.train, "val": data.val, "test": data.test, "all": data.test}.get(split)
    if dataset is None:
        raise ConfigError(f"split {split!r} is not available for task {task.name!r}")
    return dataset


def evaluate_model(task: Task, model: nn.Module, cfg: TaskConfig, data: DataSplits, split: str,
                   quiet: bool = True) -> tuple[dict[str, float], Metric]:
    """Metrics of ``model`` on one split of ``data`` (already built): (values, the filled metric object)."""
    device = next(model.parameters()).device
    metric = task.metrics(cfg, data)
    loader = make_loader(split_dataset(data, split, task), data, cfg.train, False, 0, device)
    return run_eval(task, cfg, model, loader, metric, device, split, quiet), metric


def load_for_evaluation(task: Task, paths: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                        split: str = "test", device: str = "auto") -> tuple[list[nn.Module], list[TaskConfig],
                                                                            DataSplits]:
    """Models of ``paths`` (on ``device``), the config each was trained with, and the data built with the
    first checkpoint's config and preprocessing."""
    dev = resolve_device(device)
    loaded = [model_from_checkpoint(task, p, dev) for p in paths]
    _, cfg, data_state = loaded[0]
    data = task.build_data(cfg, Path(data_root), state=data_state, split=split)
    return [m for m, _, _ in loaded], [c for _, c, _ in loaded], data


@dataclass
class Evaluation:
    """What ``evaluate_checkpoints`` returns: the values, and the files it wrote (none without ``out_dir``)."""

    values: dict[str, float]
    files: list[Path] = field(default_factory=list)


def evaluate_checkpoints(task: Task, paths: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                         split: str = "test", out_dir: str | os.PathLike | None = None,
                         quiet: bool = False, device: str = "auto") -> Evaluation:
    """Evaluate one checkpoint (or the mean of several: an ensemble) on a split, with the preprocessing saved in
    the first checkpoint. ``split='all'`` evaluates every example of the folder ``data_root``. With ``out_dir``
    (which may be a training run's folder) the values go to ``eval-<split>-<time>.json`` and the task's report
    pictures into the folder ``eval-<split>-<time>/``: never over a training run's own files."""
    models, cfgs, data = load_for_evaluation(task, paths, data_root, split, device)
    cfg = cfgs[0]
    model = models[0] if len(models) == 1 else MeanOfModels(models)
    values, metric = evaluate_model(task, model, cfg, data, split, quiet=quiet)
    for reason, count in data.skipped.items():
        values[f"skipped: {reason}"] = count
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        stem = f"eval-{split}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        record = {"checkpoints": [str(p) for p in paths], "split": split, "values": values}
        files.append(write_atomic(out / f"{stem}.json", json.dumps(record, indent=2) + "\n"))
        pictures = out / stem
        pictures.mkdir(parents=True, exist_ok=True)
        task.report(pictures, metric, data)
        if any(pictures.iterdir()):
            files.append(pictures)
        else:
            pictures.rmdir()
    return Evaluation(values, files)
