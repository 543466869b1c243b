"""What a fit exposes: ``FitState``, the attributes of the running Trainer that callbacks read, and
``FitResult``, what a fit returns. Both sit below the trainer and the callbacks, so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


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
    stopped_early: bool = False


class FitState(Protocol):
    """The state of a running fit, as every callback hook receives it (the Trainer is one)."""

    task: Any                      # the Task
    cfg: Any                       # the resolved TaskConfig; ``tc`` is its ``train`` section
    tc: Any
    run_dir: Path
    run: Any                       # the RunFolder (rank 0), for atomic writes: ``run.write_text(name, text)``
    device: torch.device
    is_rank0: bool                 # the process that evaluates and writes files
    resuming: bool                 # this fit continues a run from its last.pt
    data: Any                      # the task's DataSplits
    model: nn.Module               # the plain model (not wrapped by DDP or torch.compile)
    param_groups: list[dict] | None  # optimiser parameter groups (set in configure_model), None: one group
    optimizer: torch.optim.Optimizer
    scheduler: Any
    metric: Any                    # the task's Metric of the last validation or test pass
    test_metric: Any               # the same after the test pass (None without a test split)
    monitor: str                   # the validation metric that picks best.pt
    epoch: int                     # the current (or last finished) epoch, from 1
    global_step: int               # optimiser steps so far
    steps_per_epoch: int
    history: list[dict]            # one row per finished epoch (what metrics.jsonl holds)
    best_value: float | None
    best_epoch: int
    improved: bool                 # the epoch just validated is the new best
    pictures: dict[str, str]       # {what: relative path} of the pictures the report wrote

    def evaluate(self, model: nn.Module, dataset: Any, desc: str, metric: Any = None) -> dict[str, float]: ...

    def checkpoint_payload(self) -> dict[str, Any]: ...
