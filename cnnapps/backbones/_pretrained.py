"""Pretrained weights from files: a cnnapps checkpoint or a plain state dict (such as torchvision's) loaded into a
backbone by name and shape, with a report of what was left out, and the timm-like ``pretrained_cfg`` facts
(normalisation, input size, classes, source) that go with them. Nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what torchvision's ImageNet weights (and most ImageNet training recipes) expect
IMAGENET_CFG = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
CHECKPOINT_FORMAT = "cnnapps-checkpoint-v1"  # the marker cnnapps.engine.checkpoint writes


OUTSIDE = "outside the backbone"


class PretrainedError(RuntimeError):
    """A weights file is missing, unreadable, holds no state dict, or does not fit the backbone."""


@dataclass
class LoadReport:
    """What loading a weights file into a backbone did: ``prefix`` stripped from the file's names (e.g.
    ``backbone.`` for a task model), ``loaded`` names, ``skipped`` file tensors with the reason (absent from
    the model or another shape), ``missing`` model tensors the file did not provide (left as initialised)."""

    source: str
    prefix: str = ""
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Every model tensor came from the file and every file tensor under ``prefix`` was used (a task model's
        own head, outside the backbone, does not count)."""
        return not self.missing and all(why == OUTSIDE for why in self.skipped.values())

    def summary(self) -> str:
        """One line: counts and the first names left out."""
        parts = [f"{self.source}: loaded {len(self.loaded)} tensors" + (f" under {self.prefix!r}" if self.prefix
                                                                         else "")]
        if self.skipped:
            first = ", ".join(f"{k} ({v})" for k, v in list(self.skipped.items())[:4])
            parts.append(f"skipped {len(self.skipped)} from the file: {first}{' ...' if len(self.skipped) > 4 else ''}")
        if self.missing:
            parts.append(f"{len(self.missing)} not in the file (left as initialised): {', '.join(self.missing[:4])}"
                         f"{' ...' if len(self.missing) > 4 else ''}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "prefix": self.prefix, "loaded": len(self.loaded),
                "skipped": dict(self.skipped), "missing": list(self.missing)}


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, the whole cnnapps checkpoint payload or None for a plain state dict file). Read with
    ``weights_only=True``; PretrainedError naming the file when it is missing, unreadable or holds no tensors."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise PretrainedError(f"{path}: not a readable weights file: {exc}") from None
    payload = raw if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT else None
    state = raw.get("model") if payload is not None else raw
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # files saved as {"state_dict": ...}
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: holds no state dict of tensors")
    return dict(state), payload


def _candidate_prefixes(names: list[str]) -> set[str]:
    out = {""}
    for name in names:
        parts = name.split(".")
        for depth in range(1, min(3, len(parts))):
            out.add(".".join(parts[:depth]) + ".")
    return out


def match_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> tuple[dict, LoadReport]:
    """Map the file's tensors onto ``model``'s names: the prefix (``""``, ``backbone.``, ``module.``, ...) under
    which most of them fit by name and shape is stripped. Returns (the tensors to load, the report)."""
    own = model.state_dict()
    best_prefix, best = "", -1
    for prefix in sorted(_candidate_prefixes(list(state))):
        hits = sum(1 for k, v in state.items()
                   if k.startswith(prefix) and own.get(k[len(prefix):]) is not None
                   and own[k[len(prefix):]].shape == v.shape)
        if hits > best or (hits == best and len(prefix) < len(best_prefix)):
            best_prefix, best = prefix, hits
    report = LoadReport(source=source, prefix=best_prefix)
    matched: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not k.startswith(best_prefix):
            report.skipped[k] = OUTSIDE
            continue
        name = k[len(best_prefix):]
        if name not in own:
            report.skipped[k] = "not in this model"
        elif own[name].shape != v.shape:
            report.skipped[k] = f"shape {tuple(v.shape)} vs model {tuple(own[name].shape)}"
        else:
            matched[name] = v
            report.loaded.append(name)
    report.missing = [k for k in own if k not in matched]
    return matched, report


def preprocessing_from_checkpoint(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing facts a cnnapps checkpoint's data state holds, under timm's ``pretrained_cfg`` names
    where timm has one: ``task``, ``classes``, ``num_classes``, ``mean`` / ``std`` (image normalisation),
    ``input_size`` (channels, H, W for image tasks), ``sample_rate`` and ``input_samples`` (1D tasks), plus any
    other scalar settings of the data state (lead, normalize, step, ...) under ``data``. Values are plain
    Python (lists, numbers, strings), ready for JSON; other short lists of the data state (lead names,
    thresholds) go under ``data`` too."""
    state = dict(payload.get("data_state") or {})
    out: dict[str, Any] = {"task": payload.get("task")}
    classes = state.get("class_names", state.get("classes"))
    if classes is not None:
        out["classes"] = [str(c) for c in classes]
        out["num_classes"] = len(out["classes"])
    for key in ("mean", "std"):
        if state.get(key) is not None:
            out[key] = [float(v) for v in _plain(state[key])]
    if state.get("image_size") is not None:
        size = int(state["image_size"])
        out["input_size"] = [int(state.get("in_chans", len(out.get("mean", [])) or 3)), size, size]
    rate = state.get("fs", state.get("sample_rate"))
    if rate is not None:
        out["sample_rate"] = int(rate)
    for key in ("clip_samples", "window"):
        if state.get(key):
            out["input_samples"] = int(state[key])
            break
    extra = {k: _plain(v) for k, v in state.items() if k not in out and _small(v)}
    if extra:
        out["data"] = extra
    cfg = payload.get("config") or {}
    if isinstance(cfg.get("model"), dict) and cfg["model"].get("backbone"):
        out["backbone"] = cfg["model"]["backbone"]
    return out


def _small(value: Any) -> bool:
    """A scalar, or a short flat list of scalars (lead names, per-class thresholds): worth carrying along."""
    if isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1 and value.numel() <= 64
    return isinstance(value, (list, tuple)) and len(value) <= 64 and all(
        isinstance(v, (str, int, float, bool)) for v in value)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """The first ``length`` hex digits of the file's SHA-256 (a short identity for reports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict: bool = False,
                    payload_state: tuple[dict, dict | None] | None = None) -> LoadReport:
    """Load the tensors of ``path`` that fit ``model`` by name and shape, log what was skipped, and record the
    source (and, for a cnnapps checkpoint, its preprocessing) in ``model.pretrained_cfg``. ``strict``: a
    PretrainedError unless every model tensor and every file tensor under the matched prefix was used
    (``LoadReport.exact``). Returns the report."""
    state, payload = payload_state if payload_state is not None else read_weights_file(path)
    matched, report = match_state(model, state, str(path))
    if not report.loaded:
        raise PretrainedError(f"{path}: no tensor fits {type(model).__name__} by name and shape "
                              f"(first file names: {', '.join(list(state)[:4])})")
    if strict and not report.exact:
        raise PretrainedError(f"strict loading failed: {report.summary()}")
    model.load_state_dict(matched, strict=False)
    (log.info if report.exact else log.warning)("pretrained %s", report.summary())
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update({"source": str(path), "sha256": file_sha256(path), "load": report.as_dict(),
                "file": "cnnapps checkpoint" if payload is not None else "state dict"})
    if payload is not None:
        facts = preprocessing_from_checkpoint(payload)
        facts.pop("num_classes", None)
        cfg.update(facts)
        if "classes" in cfg and getattr(model, "num_classes", None) != len(cfg["classes"]):
            cfg.pop("classes")  # the head was replaced: the file's class names no longer describe the outputs
    cfg["num_classes"] = getattr(model, "num_classes", cfg.get("num_classes"))
    model.pretrained_cfg = cfg
    return report


def default_pretrained_cfg(info: Any) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a randomly initialised backbone: its default input size and class count, the
    normalisation its family is usually trained with (``mean`` / ``std``, None when there is no convention) and
    ``source = "random init"``; the registry's ``pretrained_cfg`` entries override these."""
    cfg: dict[str, Any] = {"source": "random init", "input_size": list(info.default_input),
                           "num_classes": info.num_classes, "mean": None, "std": None, "classes": None}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in dict(info.pretrained_defaults).items()})
    return cfg


__all__ = ["IMAGENET_CFG", "IMAGENET_MEAN", "IMAGENET_STD", "LoadReport", "PretrainedError", "default_pretrained_cfg",
           "load_pretrained", "match_state", "preprocessing_from_checkpoint", "read_weights_file"]
