"""Optimisers and learning-rate schedules named in TrainConfig."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from cnnapps.engine.config import ConfigError, TrainConfig


def build_optimizer(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam, AdamW or RMSProp over ``params`` (tensors or parameter groups)."""
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer: unknown {cfg.optimizer!r} (sgd, adam, adamw, rmsprop)")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> LRScheduler | ReduceLROnPlateau | None:
    """The schedule; all but ``plateau`` step once per optimiser step, ``plateau`` once per evaluation."""
    name = cfg.schedule.lower()
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if name == "none":
        return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    if name == "cosine":
        def cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return LambdaLR(optimizer, cosine)
    if name == "step":
        def stepwise(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return cfg.gamma ** ((step // steps_per_epoch) // max(1, cfg.step_size))
        return LambdaLR(optimizer, stepwise)
    if name == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total)
    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=cfg.plateau_patience)
    raise ConfigError(f"train.schedule: unknown {cfg.schedule!r} (none, step, cosine, onecycle, plateau)")
