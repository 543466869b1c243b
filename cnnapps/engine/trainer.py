"""The one training loop: devices, precision, optimiser and schedule, checkpoints, resume, progress, early
stopping, EMA, logging, plots and torch.distributed. Tasks say what a step is; this module says when."""
from __future__ import annotations

import contextlib
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
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from cnnapps.engine.checkpoint import (CheckpointError, load_checkpoint, load_matching_weights, load_model_state,
                                       save_checkpoint)
from cnnapps.engine.config import ConfigError, dumps_toml, from_dict, to_dict
from cnnapps.engine.optim import build_optimizer, build_scheduler
from cnnapps.engine.plots import plot_curves
from cnnapps.engine.runinfo import load_average, run_facts
from cnnapps.engine.sampling import EpochShardSampler
from cnnapps.engine.seeding import epoch_seed, rng_states, seed_everything, seed_worker, set_rng_states
from cnnapps.metrics.base import Metric, headline
from cnnapps.engine.task import DataSplits, Task, TaskConfig

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class FitResult:
    """What ``fit`` returns: where the run lives and its final numbers."""

    run_dir: Path
    test_metrics: dict[str, float]
    best_epoch: int
    best_value: float | None
    epochs_run: int
    train_seconds: float
    history: list[dict] = field(default_factory=list)


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


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _stage_boundary(model: nn.Module, n_stages: int) -> tuple[list[str], list[str]]:
    """Split parameter names into (body, head): body = the parameters of every module registered up to the end
    of the backbone's first ``n_stages`` feature stages (all stages when n_stages < 0), stem included. A task
    model holds its zoo network as ``.backbone``; anything outside the backbone counts as head."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ConfigError("freeze_stages / backbone_lr_mult need a backbone with feature_info")
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


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Runs one task: ``Trainer(task, cfg, run_dir, data_root).fit()``; ``evaluate`` for a finished model."""

    def __init__(self, task: Task, cfg: TaskConfig, run_dir: str | os.PathLike, data_root: str | os.PathLike,
                 quiet: bool = False) -> None:
        self.task, self.cfg, self.tc = task, cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.data_root = Path(data_root)
        self.quiet = quiet
        self.monitor = self.tc.monitor or task.monitor
        self.mode = task.monitor_mode if not self.tc.monitor or self.tc.monitor == task.monitor else "max"
        if self.monitor.endswith("loss"):
            self.mode = "min"
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1

    # ---- setup
    def _setup_process(self) -> torch.device:
        device = resolve_device(self.tc.device)
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            if device.type == "cuda":
                torch.cuda.set_device(device)
        if self.tc.threads > 0:
            torch.set_num_threads(self.tc.threads)
        seed_everything(self.tc.seed, self.tc.deterministic)
        return device

    def _loader(self, dataset: Dataset, data: DataSplits, train: bool, epoch: int, device: torch.device) -> DataLoader:
        tc = self.tc
        workers = tc.num_workers if tc.num_workers >= 0 else (min(4, os.cpu_count() or 1) if device.type == "cuda" else 0)
        g = torch.Generator()
        g.manual_seed(epoch_seed(tc.seed, epoch))
        world = dist.get_world_size() if self.distributed else 1
        if train:
            if tc.batch_size % (world * tc.grad_accum):
                raise ConfigError(f"train.batch_size {tc.batch_size} must be divisible by world size {world} "
                                  f"x grad_accum {tc.grad_accum}")
            bs = tc.batch_size // (world * tc.grad_accum)
            sampler = EpochShardSampler(len(dataset), tc.batch_size, epoch_seed(tc.seed, epoch),
                                        rank=dist.get_rank() if self.distributed else 0, world=world,
                                        weights=data.sample_weights, drop_last=world > 1)
        else:
            bs = tc.eval_batch_size or tc.batch_size
            sampler = SequentialSampler(dataset)
        return DataLoader(dataset, batch_size=bs, sampler=sampler, collate_fn=data.collate_fn, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=False,
                          worker_init_fn=seed_worker, generator=g, drop_last=False)

    def _apply_transfer(self, model: nn.Module) -> list[dict] | None:
        tc = self.tc
        if tc.init_checkpoint:
            head = _stage_boundary(model, -1)[1] if tc.reset_head else []
            loaded, skipped = load_matching_weights(model, tc.init_checkpoint, skip_names=tuple(head))
            log.info("init_checkpoint %s: loaded %d tensors, kept %d fresh (%s%s)", tc.init_checkpoint, len(loaded),
                     len(skipped), ", ".join(skipped[:4]), " ..." if len(skipped) > 4 else "")
        if tc.freeze_stages:
            frozen, _ = _stage_boundary(model, tc.freeze_stages)
            params = dict(model.named_parameters())
            for name in frozen:
                params[name].requires_grad_(False)
            log.info("froze %d parameter tensors (freeze_stages=%d)", len(frozen), tc.freeze_stages)
        groups = self.task.param_groups(model, self.cfg)
        if groups is None and tc.backbone_lr_mult != 1.0:
            body, head = _stage_boundary(model, -1)
            params = dict(model.named_parameters())
            groups = [{"params": [params[n] for n in body if params[n].requires_grad],
                       "lr": tc.lr * tc.backbone_lr_mult},
                      {"params": [params[n] for n in head if params[n].requires_grad], "lr": tc.lr}]
            groups = [g for g in groups if g["params"]]
        return groups

    # ---- one pass over a split
    def run_eval(self, model: nn.Module, loader: DataLoader, metric: Metric, device: torch.device,
                 desc: str = "eval") -> dict[str, float]:
        """Evaluate ``model`` on every batch of ``loader``: metric values plus ``loss`` (mean per example)."""
        model.eval()
        metric.reset()
        total, n = 0.0, 0
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False, disable=self._no_bar()):
                batch = to_device(batch, device, self.tc.channels_last)
                with autocast(device, self.tc.precision):
                    out = self.task.step(model, batch, self.cfg)
                bs = batch_size_of(batch)
                total += float(out["loss"]) * bs
                n += bs
                metric.update(detach_output(out["output"]), batch)
        values = metric.compute()
        values["loss"] = total / max(n, 1)
        return values

    def _finish_run_facts(self, wall: float, resumed: bool) -> None:
        """Add the end of the run to run.json (load, wall time of this process's fit, data building and test
        evaluation included), so that ``bench --from-run`` can report them."""
        path = self.run_dir / "run.json"
        facts = json.loads(path.read_text()) if path.is_file() else {}
        facts.update({"load_at_end": load_average(), "wall_seconds": round(wall, 2), "resumed": bool(resumed),
                      "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        path.write_text(json.dumps(facts, indent=2))

    def _no_bar(self) -> bool:
        return self.quiet or not sys.stderr.isatty() or not is_rank0()

    # ---- training
    def fit(self, resume: bool = False) -> FitResult:
        """Train, validate each epoch, keep last.pt/best.pt, then evaluate best weights on the test split."""
        tc, task = self.tc, self.task
        t_fit = time.perf_counter()
        device = self._setup_process()
        rank0 = is_rank0()
        ckpt_dir = self.run_dir / "checkpoints"
        if rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(dumps_toml(to_dict(self.cfg)))
            if not resume or not (self.run_dir / "run.json").is_file():
                (self.run_dir / "run.json").write_text(json.dumps({"task": task.name, **run_facts(device)}, indent=2))

        data = task.build_data(self.cfg, self.data_root)
        for reason, count in data.skipped.items():
            log.warning("skipped %d example(s): %s", count, reason)
        model = task.build_model(self.cfg, data)
        groups = self._apply_transfer(model)
        if self.distributed and tc.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(groups if groups is not None else
                                    [p for p in model.parameters() if p.requires_grad], tc)
        steps_per_epoch = self._steps_per_epoch(data, device)
        scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True) \
            if tc.ema_decay > 0 else None

        start_epoch, best_value, best_epoch, history = 1, None, 0, []
        last_path = ckpt_dir / "last.pt"
        if resume:
            if not last_path.is_file():
                raise CheckpointError(f"--resume: no {last_path} to resume from")
            state = load_checkpoint(last_path, task=task.name)
            load_model_state(model, state["model"], last_path)
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler"):
                scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            set_rng_states(state["rng"])
            start_epoch, best_value, best_epoch = state["epoch"] + 1, state["best_value"], state["best_epoch"]
            history = list(state.get("history", []))
            log.info("resumed %s at epoch %d", last_path, start_epoch)

        train_model: nn.Module = model
        if tc.compile:
            train_model = torch.compile(model)
        if self.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)

        metric = task.metrics(self.cfg, data)
        bad_epochs = 0
        t_train = sum(h.get("seconds", 0.0) for h in history)
        for epoch in range(start_epoch, tc.epochs + 1):
            row = self._train_epoch(train_model, model, optimizer, scheduler, scaler, ema, data, device, epoch,
                                    steps_per_epoch)
            t_train += row["seconds"]
            if data.val is not None and (epoch % tc.eval_every == 0 or epoch == tc.epochs):
                if rank0:
                    vals = self.run_eval(model, self._loader(data.val, data, False, epoch, device), metric, device,
                                         desc="val")
                    row.update({f"val_{k}": v for k, v in vals.items()})
                    if ema is not None:
                        evals = self.run_eval(ema.module, self._loader(data.val, data, False, epoch, device),
                                              metric, device, desc="val ema")
                        row.update({f"val_ema_{k}": v for k, v in evals.items()})
                value = self._broadcast(row.get(f"val_{self.monitor}"), device)
                if value is None:
                    raise ConfigError(f"monitor metric {self.monitor!r} not among the task's metrics: "
                                      f"{', '.join(k[4:] for k in row if k.startswith('val_'))}")
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(value if self.mode == "max" else -value)
                improved = best_value is None or (value > best_value if self.mode == "max" else value < best_value)
                if improved:
                    best_value, best_epoch, bad_epochs = value, epoch, 0
                else:
                    bad_epochs += 1
            else:
                improved = data.val is None  # without a validation split the latest weights are the best
                if improved:
                    best_epoch = epoch
            history.append(row)
            if rank0:
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                payload = self._payload(model, optimizer, scheduler, scaler, ema, data, epoch, best_value,
                                        best_epoch, history)
                save_checkpoint(payload, last_path)
                if improved:
                    save_checkpoint(payload, ckpt_dir / "best.pt")
                self._log_epoch(row)
            if tc.early_stop_patience and bad_epochs >= tc.early_stop_patience:
                log.info("early stop: %s did not improve for %d epochs", self.monitor, bad_epochs)
                break

        test_metrics: dict[str, float] = {}
        if rank0:
            best_path = ckpt_dir / "best.pt"
            if best_path.is_file():
                load_model_state(model, load_checkpoint(best_path, task=task.name)["model"], best_path)
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png", self.monitor) \
                if (self.run_dir / "metrics.jsonl").is_file() else None
            if data.test is not None:
                test_metrics = self.run_eval(model, self._loader(data.test, data, False, 0, device), metric, device,
                                             desc="test")
                task.report(self.run_dir, metric, data)
            test_metrics.update({"best_epoch": best_epoch, "train_seconds": round(t_train, 2)})
            (self.run_dir / "metrics.json").write_text(json.dumps(test_metrics, indent=2) + "\n")
            self._finish_run_facts(time.perf_counter() - t_fit, resume)
        if self.distributed:
            dist.barrier()
        return FitResult(self.run_dir, test_metrics, best_epoch, best_value, len(history), t_train, history)

    def _steps_per_epoch(self, data: DataSplits, device: torch.device) -> int:
        n = math.ceil(len(self._loader(data.train, data, True, 0, device)) / self.tc.grad_accum)
        return min(n, self.tc.max_steps_per_epoch) if self.tc.max_steps_per_epoch else n

    def _broadcast(self, value: float | None, device: torch.device) -> float | None:
        if not self.distributed:
            return value
        t = torch.tensor([math.nan if value is None else value], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, 0)
        return None if math.isnan(t.item()) else t.item()

    def _train_epoch(self, train_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, scaler: torch.amp.GradScaler, ema: AveragedModel | None, data: DataSplits,
                     device: torch.device, epoch: int, steps_per_epoch: int) -> dict:
        tc = self.tc
        # Every epoch re-seeds from (seed, epoch): a resumed run shuffles and augments exactly as the original.
        seed_everything(epoch_seed(tc.seed, epoch), tc.deterministic)
        loader = self._loader(data.train, data, True, epoch, device)
        train_model.train()
        t0, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{tc.epochs}", disable=self._no_bar(), leave=False)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            batch = to_device(batch, device, tc.channels_last)
            with autocast(device, tc.precision):
                out = self.task.step(train_model, batch, self.cfg)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss ({loss.item()}) at epoch {epoch}, step {steps + 1}; "
                                       f"the last good checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'}")
            scaler.scale(loss / tc.grad_accum).backward()
            bs = batch_size_of(batch)
            seen += bs
            loss_sum += loss.item() * bs
            if (i + 1) % tc.grad_accum:
                continue
            if tc.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", ips=f"{seen / (time.perf_counter() - t0):.0f}/s")
            if steps >= steps_per_epoch:
                break
        bar.close()
        seconds = time.perf_counter() - t0
        return {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[-1]["lr"],
                "seconds": round(seconds, 3), "samples_per_s": round(seen / max(seconds, 1e-9), 2), "steps": steps}

    def _payload(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, ema: AveragedModel | None, data: DataSplits, epoch: int,
                 best_value: float | None, best_epoch: int, history: list[dict]) -> dict:
        return {"task": self.task.name, "config": to_dict(self.cfg), "data_state": data.state,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch, "best_value": best_value, "best_epoch": best_epoch, "monitor": self.monitor,
                "rng": rng_states(), "history": history}

    def _log_epoch(self, row: dict) -> None:
        vals = ", ".join(f"{k}={v:.4f}" for k, v in headline(row).items()
                         if k.startswith("val_") and isinstance(v, float) and "ema" not in k)
        log.info("epoch %d: train_loss=%.4f %s (%.1fs, %.0f samples/s)", row["epoch"], row["train_loss"], vals,
                 row["seconds"], row["samples_per_s"])


# ---------------------------------------------------------------- using finished checkpoints


def fit(task: Task, cfg: TaskConfig, run_dir: str | os.PathLike, data_root: str | os.PathLike,
        resume: bool = False, quiet: bool = False) -> FitResult:
    """Train ``task`` with ``cfg``; see ``Trainer.fit``."""
    return Trainer(task, cfg, run_dir, data_root, quiet=quiet).fit(resume=resume)


def model_from_checkpoint(task: Task, path: str | os.PathLike, device: torch.device | str = "cpu",
                          overrides: dict | None = None) -> tuple[nn.Module, TaskConfig, dict]:
    """Rebuild the model a checkpoint was trained as, with its weights: (model in eval mode, config, data state)."""
    state = load_checkpoint(path, task=task.name)
    try:
        cfg = from_dict(task.Config, state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its config does not fit this version of task {task.name!r}: {exc}") from None
    data_state = state.get("data_state", {})
    model = task.build_model(cfg, DataSplits(train=None, val=None, test=None, state=data_state))
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
    trainer = Trainer(task, cfg, Path("."), Path("."), quiet=quiet)
    metric = task.metrics(cfg, data)
    loader = trainer._loader(split_dataset(data, split, task), data, False, 0, device)
    return trainer.run_eval(model, loader, metric, device, desc=split), metric


def load_for_evaluation(task: Task, paths: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                        split: str = "test") -> tuple[list[nn.Module], list[TaskConfig], DataSplits]:
    """Models of ``paths`` (on the auto device), the config each was trained with, and the data built with the
    first checkpoint's config and preprocessing."""
    device = resolve_device("auto")
    loaded = [model_from_checkpoint(task, p, device) for p in paths]
    _, cfg, data_state = loaded[0]
    data = task.build_data(cfg, Path(data_root), state=data_state, split=split)
    return [m for m, _, _ in loaded], [c for _, c, _ in loaded], data


def evaluate_checkpoints(task: Task, paths: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                         split: str = "test", out_dir: str | os.PathLike | None = None,
                         quiet: bool = False) -> dict[str, float]:
    """Evaluate one checkpoint (or the mean of several: an ensemble) on a split, with the preprocessing saved in
    the first checkpoint. ``split='all'`` evaluates every example of the folder ``data_root``."""
    models, cfgs, data = load_for_evaluation(task, paths, data_root, split)
    cfg = cfgs[0]
    model = models[0] if len(models) == 1 else MeanOfModels(models)
    values, metric = evaluate_model(task, model, cfg, data, split, quiet=quiet)
    for reason, count in data.skipped.items():
        values[f"skipped: {reason}"] = count
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(values, indent=2) + "\n")
        task.report(out, metric, data)
    return values
