"""Typed configs: dataclasses read from TOML, overridden by ``--set section.key=value``, written back as TOML."""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass
class TrainConfig:
    """The engine's section, identical for every task (``[train]`` in a task's TOML)."""

    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 0  # 0: same as batch_size
    max_steps_per_epoch: int = 0  # 0: the whole training split (smoke tests use a few)
    optimizer: str = "sgd"  # sgd | adam | adamw | rmsprop
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"  # none | step | cosine | onecycle | plateau
    warmup_epochs: float = 0.0  # linear warm-up (cosine and step)
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step and plateau: decay factor
    plateau_patience: int = 2
    grad_clip: float = 0.0  # max global grad norm; 0: off
    grad_accum: int = 1  # micro-batches per optimiser step
    label_smoothing: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = False
    compile: bool = False
    monitor: str = ""  # metric picking best.pt; "": the task's default
    early_stop_patience: int = 0  # epochs without improvement of `monitor`; 0: off
    ema_decay: float = 0.0  # Polyak averaging of weights; 0: off
    num_workers: int = -1  # -1: chosen for the device
    threads: int = 0  # torch intra-op threads; 0: leave torch's default
    seed: int = 0
    deterministic: bool = True  # repeatable CPU runs (resume equals an uninterrupted run)
    eval_every: int = 1  # epochs between validation passes
    init_checkpoint: str = ""  # start from these weights (transfer learning)
    freeze_stages: int = 0  # freeze the first N feature stages of the backbone (stem included); -1: all but the head
    reset_head: bool = True  # with init_checkpoint: leave the head freshly initialised (new classes)
    backbone_lr_mult: float = 1.0  # learning rate of pretrained backbone parameters relative to lr
    sync_bn: bool = False  # SyncBatchNorm under torch.distributed


# ---------------------------------------------------------------- reading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from TOML or a ``--set`` string) to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} fits none of {', '.join(_type_name(a) for a in args)}")
    if origin in (list, tuple):
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.strip("[]()").split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        # Free-form tables (e.g. backbone keyword arguments): TOML values as they are; --set strings parsed
        # as TOML literals ("8" -> 8, "true" -> True, "[1, 2]" -> [1, 2]), else kept as text.
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {k: _literal(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _literal(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(types_)}")
    kwargs = {name: _coerce(v, types_[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict update (tables merge key by key, other values replace)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    """A config dataclass as nested plain dicts (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: dict) -> Any:
    """Build ``cls`` from nested dicts over its defaults; unknown keys and wrong types raise ConfigError."""
    return _build(cls, _merge(to_dict(cls()), values))


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=0.1", "model.backbone=resnet18"]`` -> nested dict of raw strings (typed later)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value.strip()
    return nested


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults of ``cls``, then the TOML file at ``path``, then ``overrides``; returns a ``cls`` instance."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if overrides:
        values = _merge(values, parse_overrides(overrides))
    try:
        return from_dict(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


# ---------------------------------------------------------------- writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '"none"'
    raise TypeError(f"cannot write {v!r} to TOML")


def dumps_toml(values: dict, _prefix: str = "") -> str:
    """Nested dicts of scalars and lists as TOML text (tables after plain keys)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for k, v in values.items():
        if isinstance(v, dict):
            name = f"{_prefix}.{k}" if _prefix else k
            lines += ["", f"[{name}]", dumps_toml(v, name)]
    return "\n".join(lines).strip() + "\n"
