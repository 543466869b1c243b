"""Typed configs: dataclasses read from TOML, overridden by ``--set section.key=value``, written back as TOML."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override names an unknown key, or gives a value of the wrong type or out of range."""


def option(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A config field that says what it means and which values it takes: ``help`` is printed by
    ``cnnapps <task> config``; ``choices`` and the bounds (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <) are checked
    when a config loads, element by element for lists. Floats must also be finite."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def allowed(f: dataclasses.Field) -> str:
    """The allowed values of field ``f`` in words (``one of sgd, adam``, ``>= 1``), or "" when unconstrained."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    bounds = [f"{op} {m[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if m.get(k) is not None]
    return " and ".join(bounds)


def _check_value(f: dataclasses.Field, value: Any, key: str) -> None:
    """ConfigError naming ``key``, its value and what is allowed, if ``value`` breaks ``f``'s metadata."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(f, v, f"{key}[{i}]")
        return
    m = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value}: must be a finite number")
    choices = m.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(map(str, choices))}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for k, ok in (("ge", lambda b: value >= b), ("gt", lambda b: value > b), ("le", lambda b: value <= b),
                      ("lt", lambda b: value < b)):
            if m.get(k) is not None and not ok(m[k]):
                raise ConfigError(f"{key} = {value!r}: must be {allowed(f)}")


def check_backbone(name: str, key: str = "model.backbone", dim: int | None = None) -> None:
    """ConfigError naming ``key`` when ``name`` is no registered backbone (with the closest names), or not of
    dimension ``dim`` (1 or 2) where a task needs one."""
    from cnnapps.backbones import backbone_info, list_backbones

    names = list_backbones()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `cnnapps list` shows them all"
        raise ConfigError(f"{key} = {name!r}: no such backbone{hint}")
    if dim is not None and backbone_info(name).dim != dim:
        matching = [n for n in names if backbone_info(n).dim == dim]
        raise ConfigError(f"{key} = {name!r}: a {backbone_info(name).dim}D backbone, this task needs a {dim}D one "
                          f"({', '.join(matching[:6])}, ...)")


@dataclass
class TrainConfig:
    """The engine's section, identical for every task (``[train]`` in a task's TOML)."""

    epochs: int = option(10, help="passes over the training split", ge=1)
    batch_size: int = option(64, help="examples per optimiser step (all processes and micro-batches together)",
                             ge=1)
    eval_batch_size: int = option(0, help="examples per evaluation batch; 0: batch_size", ge=0)
    max_steps_per_epoch: int = option(0, help="cap on optimiser steps per epoch (smoke runs); 0: the whole split",
                                      ge=0)
    optimizer: str = option("sgd", help="optimiser", choices=("sgd", "adam", "adamw", "rmsprop"))
    lr: float = option(0.01, help="learning rate (the peak of onecycle)", gt=0)
    momentum: float = option(0.9, help="SGD and RMSProp momentum", ge=0, lt=1)
    nesterov: bool = option(False, help="Nesterov momentum (SGD)")
    weight_decay: float = option(0.0, help="L2 penalty (decoupled for adamw)", ge=0)
    schedule: str = option("cosine", help="learning-rate schedule, stepped per optimiser step (plateau: per "
                           "validation)", choices=("none", "step", "cosine", "onecycle", "plateau"))
    warmup_epochs: float = option(0.0, help="linear warm-up in epochs (none, cosine and step)", ge=0)
    step_size: int = option(10, help="step schedule: epochs between decays", ge=1)
    gamma: float = option(0.1, help="step and plateau: decay factor", gt=0, le=1)
    plateau_patience: int = option(2, help="plateau: validations without improvement before a decay", ge=0)
    grad_clip: float = option(0.0, help="largest global gradient norm; 0: no clipping", ge=0)
    grad_accum: int = option(1, help="micro-batches per optimiser step (the global batch stays batch_size)", ge=1)
    label_smoothing: float = option(0.0, help="label smoothing of cross-entropy losses", ge=0, lt=1)
    precision: str = option("fp32", help="autocast precision (fp16 adds a gradient scaler)",
                            choices=("fp32", "bf16", "fp16"))
    device: str = option("auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    channels_last: bool = option(False, help="4D inputs and weights in channels_last memory format")
    compile: bool = option(False, help="torch.compile the training model")
    monitor: str = option("", help="validation metric that picks best.pt and drives early stopping and plateau; "
                          "\"\": the task's default")
    early_stop_patience: int = option(0, help="validations without improvement of monitor before stopping; 0: off",
                                      ge=0)
    ema_decay: float = option(0.0, help="Polyak (EMA) average of the weights, also validated; 0: off", ge=0, lt=1)
    num_workers: int = option(-1, help="DataLoader worker processes; -1: chosen for the device", ge=-1)
    threads: int = option(0, help="torch intra-op threads; 0: torch's default", ge=0)
    seed: int = option(0, help="seed of weights, shuffling and augmentation")
    deterministic: bool = option(True, help="deterministic algorithms (a resumed CPU run equals an uninterrupted one)")
    eval_every: int = option(1, help="epochs between validation passes (the last epoch is always validated)", ge=1)
    init_checkpoint: str = option("", help="start from these weights: a cnnapps checkpoint or a state_dict file "
                                  "(transfer learning); \"\": from scratch")
    freeze_stages: int = option(0, help="freeze the backbone's first N feature stages (stem included); -1: all but "
                                "the head", ge=-1)
    reset_head: bool = option(True, help="with init_checkpoint: keep the head freshly initialised (new classes)")
    backbone_lr_mult: float = option(1.0, help="learning rate of backbone parameters relative to lr", ge=0)
    sync_bn: bool = option(False, help="SyncBatchNorm under torch.distributed")
    loggers: list[str] = option(help="where metrics go besides the console: jsonl (metrics.jsonl, always "
                                "written), tensorboard (events under tensorboard/), csv (metrics.csv)",
                                choices=("jsonl", "tensorboard", "csv"), default_factory=lambda: ["jsonl"])

    def check(self) -> None:
        """Rules between fields and of free text, checked when a config loads."""
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"train.device = {self.device!r}: must be auto, cpu, cuda or cuda:N")


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
        if isinstance(value, str):  # --set: a TOML array (["a", "b"]), else comma-separated bare items (a,b)
            # (record names such as [100, 101] stay text for a list of strings)
            parsed = literal(value) if value.lstrip().startswith("[") else value
            typed = isinstance(parsed, list) and not (inner is str and any(not isinstance(v, str) for v in parsed))
            value = parsed if typed else [v for v in (p.strip() for p in value.strip("[]()").split(",")) if v]
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
        return {k: literal(v) for k, v in value.items()}
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
            # --set model.backbone='"vgg11"' (a TOML string literal) means the text inside the quotes
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"
            text = literal(value) if quoted else value
            return text if isinstance(text, str) else value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def literal(value: Any) -> Any:
    """A ``--set`` value as a TOML literal (``8`` -> 8, ``true`` -> True, ``[1, 2]``, ``"x"``), else the text as
    it is (``resnet18``): the one rule for every command's ``--set``."""
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
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            _check_value(f, kwargs[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


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


def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None


def config_names(search: Path | None) -> list[str]:
    """The config names (file stems) a task ships in the folder ``search``, sorted; ``default`` is always one."""
    names = {"default"}
    if search is not None and search.is_dir():
        names |= {f.stem for f in search.glob("*.toml")}
    return sorted(names)


def find_config(config: str | os.PathLike, search: Path | None = None) -> Path | None:
    """The file a ``--config`` value names: an existing path as it is, else ``<search>/<name>.toml`` (a task's
    shipped configs). ``default`` without such a file means the task's built-in defaults: None.
    ConfigError naming the value and the choices when neither exists."""
    path = Path(config)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".toml") else path.name
    if search is not None and path.parent == Path(".") and (search / f"{stem}.toml").is_file():
        return search / f"{stem}.toml"
    if str(config) in ("default", "default.toml"):
        return None
    raise ConfigError(f"config {str(config)!r} not found: no such file, and no shipped config of that name "
                      f"(shipped: {', '.join(config_names(search))})")


def config_label(config: str | os.PathLike | None, search: Path | None = None) -> str:
    """How results name a config: a shipped config by its name (``ci``), a user's file by its path, none by
    ``default``."""
    found = find_config(config, search) if config is not None else None
    if found is None:
        return "default"
    if search is not None and found.resolve().parent == search.resolve():
        return found.stem
    return str(config)


def read_config(config: str | os.PathLike | None, search: Path | None = None, _seen: tuple[str, ...] = ()) -> dict:
    """The values a config file sets, over those of its ``base`` (a config name or a path: beside the file first,
    then among the shipped configs in ``search``), key by key. None or ``default``: {} (the dataclass defaults)."""
    found = find_config(config, search) if config is not None else None
    if found is None:
        return {}
    where = str(found)
    if where in _seen:
        raise ConfigError(f"{where}: base chain loops: {' -> '.join(_seen + (where,))}")
    values = _read_toml(found.read_text(), where)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base must be a config name or path, got {base!r}")
    # a base is looked up beside the file (a sibling's name or a relative path), then among the task's shipped
    # configs, so a user's own file can start from `base = "ci"`
    beside = [found.parent / base, found.parent / f"{base}.toml"]
    ref = next((b for b in beside if b.is_file()), None)
    return _merge(read_config(ref if ref is not None else base, search, _seen + (where,)), values)


def nest(flat: Mapping[str, Any]) -> dict:
    """``{"train.lr": 0.1}`` -> ``{"train": {"lr": 0.1}}``."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, last = str(key).split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return nested


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | None = None, search: Path | None = None) -> Any:
    """Defaults of ``cls``, then the config ``path`` names (a file, or a shipped name looked up in ``search``;
    its ``base`` first), then ``overrides`` (``--set`` strings, or a mapping of dotted keys to typed values);
    returns a validated ``cls`` instance."""
    values = read_config(path, search)
    if overrides:
        values = _merge(values, nest(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides)))
    try:
        return from_dict(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


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


def _comment(text: str, width: int = 110) -> list[str]:
    import textwrap

    return ["# " + line for line in textwrap.wrap(text, width - 2)] if text else []


def dumps_documented(cfg: Any, _prefix: str = "") -> str:
    """A config dataclass as TOML with every field's meaning and allowed values as comments above it (from the
    fields' ``option`` metadata): what ``cnnapps <task> config`` prints. The text loads back to the same config."""
    plain, tables = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{_prefix}.{f.name}" if _prefix else f.name
        about = f.metadata.get("help", "")
        rule = allowed(f)
        note = f"{about} [{rule}]" if about and rule else about or (f"[{rule}]" if rule else "")
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            if doc.startswith(type(value).__name__ + "("):  # the signature dataclasses write, not a description
                doc = ""
            tables += ["", f"[{name}]", *_comment(doc), dumps_documented(value, name).rstrip()]
        elif isinstance(value, dict):
            tables += ["", f"[{name}]", *_comment(note), dumps_toml(value, name).rstrip() if value else ""]
        else:
            plain += [*_comment(note), f"{f.name} = {_toml_value(value)}"]
    return "\n".join(line for line in [*plain, *tables]).strip() + "\n"
