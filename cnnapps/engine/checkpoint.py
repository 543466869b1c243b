"""Checkpoints: written atomically (temp file, fsync, rename) and read back with ``weights_only=True``."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnapps.engine.runfolder import fsync_dir

FORMAT = "cnnapps-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, from another task, or does not fit the model."""


def to_safe(obj: Any) -> Any:
    """Convert NumPy values into tensors and Python scalars so ``torch.load(weights_only=True)`` accepts them."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    return obj


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` so that a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    payload = {"format": FORMAT, **to_safe(payload)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; a checkpoint is an ordinary run file
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself must survive a power cut
    except OSError as exc:  # a full disk: one line naming the file
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_weights_file(path: Path, what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)``; CheckpointError naming the file when it is unreadable, or when it
    holds Python objects other than tensors and plain containers (refused, never unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        culprit = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
        # "Unsupported operand": bytes that are no pickle at all (a corrupt file), not a pickle of foreign objects
        if "Weights only load failed" in text and "Unsupported operand" not in culprit:
            raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors, which are not "
                                  f"loaded from files ({culprit.rstrip('.')})" if culprit else
                                  f"{path}: refused: it holds Python objects other than tensors") from None
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?): {reason}") from None


def load_checkpoint(path: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """Read a cnnapps checkpoint safely (no arbitrary unpickling). Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = read_weights_file(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cnnapps checkpoint (no '{FORMAT}' marker)")
    if task is not None and payload.get("task") != task:
        raise CheckpointError(f"{path}: written by task {payload.get('task')!r}, not {task!r}")
    return payload


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load a full state dict into ``model``; a missing, unexpected or mis-shaped tensor is a CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source}: the checkpoint does not fit this model"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            lines.append("  shape mismatch: " + "; ".join(shapes[:8]))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def load_matching_weights(model: nn.Module, path: str | os.PathLike,
                          skip_names: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Transfer learning: copy every tensor of a cnnapps checkpoint or a raw ``state_dict`` file (torchvision
    weights) whose name and shape match ``model``, except ``skip_names``. Returns (loaded, skipped) names."""
    path = Path(path)
    raw = read_weights_file(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state_dict of tensors")
    own = model.state_dict()
    # Task models hold the zoo network as `.backbone`; accept files saved from a bare backbone too.
    if not (set(state) & set(own)) and any(k.startswith("backbone.") for k in own):
        state = {f"backbone.{k}": v for k, v in state.items()}
    loaded, skipped = [], []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape and k not in skip_names:
            own[k] = v
            loaded.append(k)
        else:
            skipped.append(k)
    if not loaded:
        raise CheckpointError(f"{path}: no tensor matches this model by name and shape")
    model.load_state_dict(own)
    return loaded, skipped


def init_facts(init_checkpoint: str, freeze_stages: int = 0) -> dict[str, Any]:
    """Where a run's starting weights came from, for results files: ``{"init": "from scratch"}``, or the
    checkpoint's path and hash, the stages frozen, and (for a checkpoint of this suite) its task, backbone, epoch
    and best validation value, so that a fine-tuned number can be traced to its pretraining run."""
    import hashlib

    if not init_checkpoint:
        return {"init": "from scratch"}
    path = Path(init_checkpoint)
    facts: dict[str, Any] = {"init": "transferred", "init_checkpoint": str(path),
                             "init_checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
                             "freeze_stages": freeze_stages}
    try:
        ck = load_checkpoint(path)
    except CheckpointError:  # a raw state_dict (a torchvision weights file): nothing more to say about it
        return facts
    src = ck.get("config", {})
    facts.update({"init_task": ck.get("task"), "init_backbone": src.get("model", {}).get("backbone"),
                  "init_epoch": ck.get("epoch"), f"init_val_{ck.get('monitor')}": ck.get("best_value")})
    return facts
