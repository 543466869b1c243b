"""torch.distributed for the trainer, in one place: process group, ranks, the model wrapper, broadcasts and
barriers. Under ``torchrun`` every process runs the same loop; rank 0 alone evaluates and writes the run folder."""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """True when started by ``torchrun`` (even with one process: a one-process NCCL run checks the GPU path) or
    by any launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def is_rank0() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def init(device: torch.device) -> None:
    """Join the process group once (NCCL on GPUs, gloo on CPUs) when launched with several processes."""
    if launched() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)


def prepare_model(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """Batch norms converted to SyncBatchNorm when asked (before the model moves to its device)."""
    if dist.is_initialized() and sync_bn:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model under DistributedDataParallel when several processes train it, else unchanged."""
    if not dist.is_initialized():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_value(value: float | None, device: torch.device) -> float | None:
    """Rank 0's ``value`` (None travels as NaN) on every rank, so all ranks take the same decisions."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([math.nan if value is None else value], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return None if math.isnan(t.item()) else t.item()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision (e.g. stop now) on every rank."""
    return bool(broadcast_value(1.0 if flag else 0.0, device))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
