"""Deployment: a model exported with ``torch.export`` (``.pt2``) or through the ONNX dynamo exporter (``.onnx``),
with a preprocessing JSON beside it, checked against the eager model before it is called done.

The input keeps a dynamic batch size and, where torch allows it, dynamic spatial sizes in multiples of the
network's total stride (a 1D net: any length that is a multiple of it, two at least). Where torch specialises a
size (an adaptive pool to a fixed grid, a head that needs one input size), the export keeps that size fixed and
says so in the JSON and the printed report. ``cnnapps export`` (see ``cnnapps.__main__``) runs
``export_checkpoint``; ``export_model`` exports any model the same way. ONNX needs the ``export`` extra
(onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnapps.backbones import preprocessing_from_checkpoint

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "exported": ".pt2"}
META_FORMAT = "cnnapps-export-v1"
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME = "x"


class ExportError(RuntimeError):
    """The model cannot be exported, the exported model cannot be run, or it disagrees with the eager one."""


@dataclass
class InputSpec:
    """The exported model's input: ``shape`` with ``"batch"`` / ``"R*k"`` for the dynamic axes, ``dynamic`` (axis
    name -> what it accepts), ``fixed`` (axis name -> the size it is fixed at) and ``why_fixed`` (torch's
    reason, the first line of its guard message, when a spatial size could not be kept dynamic)."""

    name: str
    shape: list[int | str]
    dtype: str
    dynamic: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    why_fixed: str = ""


@dataclass
class Parity:
    """Exported against eager on the same inputs: the largest absolute difference, the eager outputs' largest
    magnitude (``scale``), their ratio ``relative`` (what the tolerance bounds, with ``scale`` at least 1), the
    share of predicted labels (argmax over the class axis, axis 1) that agree, and the inputs' shapes."""

    max_abs_diff: float
    scale: float
    relative: float
    label_agreement: float
    labels_compared: int
    shapes: list[list[int]]
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance


@dataclass
class ExportResult:
    """What ``export_model`` / ``export_checkpoint`` wrote and measured."""

    path: Path
    meta_path: Path
    format: str
    input: InputSpec
    parity: Parity

    def summary(self) -> str:
        """A few lines for the command line."""
        dyn = ", ".join(f"{k}: {v}" for k, v in self.input.dynamic.items())
        fixed = ", ".join(f"{k} = {v}" for k, v in self.input.fixed.items())
        p = self.parity
        head = f"input {self.input.name} {self.input.shape} {self.input.dtype}; dynamic {dyn or 'none'}"
        lines = [f"wrote {self.path} ({self.format}) and {self.meta_path}",
                 head + (f"; fixed {fixed}" if fixed else "")]
        if self.input.why_fixed:
            lines.append(f"  fixed: at another size {self.input.why_fixed}")
        lines.append(f"parity on {len(p.shapes)} input(s) {p.shapes}: largest |exported - eager| = "
                     f"{p.max_abs_diff:.3g} (eager outputs up to {p.scale:.3g}; relative {p.relative:.3g}, "
                     f"tolerance {p.tolerance:g}); predicted labels agree on {p.label_agreement:.2%} of "
                     f"{p.labels_compared}")
        return "\n".join(lines)


# ---------------------------------------------------------------- exporting


def total_stride(model: nn.Module) -> int | None:
    """The largest reduction in the ``feature_info`` of ``model`` or of its ``.backbone`` (None: neither has
    one): spatial sizes stay dynamic only in multiples of it."""
    for candidate in (model, getattr(model, "backbone", None), getattr(model, "body", None)):
        info = getattr(candidate, "feature_info", None)
        if info is not None:
            return int(max(info.reduction()))
    return None


def _first_guard(exc: Exception) -> str:
    lines = [ln.strip(" -") for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "guard" in ln.lower() or "specialized" in ln.lower()]
    return (useful or lines or [type(exc).__name__])[0][:300]


def export_program(model: nn.Module, example: torch.Tensor,
                   dynamic_spatial: bool = True) -> tuple[torch.export.ExportedProgram, InputSpec]:
    """``torch.export`` of ``model`` (in eval mode) for inputs like ``example`` (batch >= 2): the batch axis
    dynamic, and every axis after the channel axis dynamic in multiples of ``total_stride(model)`` when
    ``dynamic_spatial`` and torch allows it, else fixed at the example's size (the reason recorded). Returns
    (program, input spec); ExportError when even the batch cannot be kept dynamic."""
    from torch.export import Dim

    if example.dim() < 2 or example.shape[0] < 2:
        raise ExportError(f"the example input needs a batch of at least 2, got shape {tuple(example.shape)}")
    model = model.eval()
    batch = Dim("batch", min=1, max=65536)
    stride = total_stride(model)
    spatial_axes = list(range(2, example.dim())) if example.dim() > 2 else []
    axis_names = ["length"] if len(spatial_axes) == 1 else ["height", "width", "depth"][: len(spatial_axes)]
    attempts: list[dict[int, Any]] = []
    can_grow = stride is not None and all(example.shape[a] % stride == 0 and example.shape[a] >= 2 * stride
                                          for a in spatial_axes)
    if dynamic_spatial and spatial_axes and can_grow:
        attempts.append({0: batch, **{a: stride * Dim(f"k{i}", min=2, max=65536)
                                      for i, a in enumerate(spatial_axes)}})
    attempts.append({0: batch})
    why = "" if not spatial_axes or can_grow or not dynamic_spatial else (
        f"the example's size {tuple(example.shape[2:])} is not a multiple (>= 2x) of the net's stride {stride}"
        if stride else "no feature_info gives the net's total stride")
    last_exc: Exception | None = None
    for shapes in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, (example,), dynamic_shapes=(shapes,))
            if len(shapes) > 1:
                _probe_other_size(model, program, example, list(shapes)[1:], stride)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a specialised guard
            last_exc = exc
            if len(shapes) > 1:
                why = _first_guard(exc)
                log.info("dynamic spatial export failed (%s); keeping the size fixed", why)
            continue
        spec = InputSpec(name=INPUT_NAME, shape=[], dtype=str(example.dtype).replace("torch.", ""))
        spec.dynamic["batch"] = "any size >= 1"
        for axis in range(1, example.dim()):
            name = axis_names[spatial_axes.index(axis)] if axis in spatial_axes else "channels"
            if axis in shapes:
                spec.shape.append(f"{stride}*k")
                spec.dynamic[name] = f"multiples of {stride}, from {2 * stride}"
            else:
                spec.shape.append(int(example.shape[axis]))
                if axis in spatial_axes:
                    spec.fixed[name] = int(example.shape[axis])
        spec.shape.insert(0, "batch")
        if example.dim() == 2:  # (batch, length): a waveform or feature vector with no stride to grow by
            spec.fixed["length"] = int(example.shape[1])
            why = why or "the model takes (batch, length) inputs and no feature_info says how the length may vary"
        spec.why_fixed = why if spec.fixed else ""
        return program, spec
    raise ExportError(f"torch.export failed for {type(model).__name__}: {_first_guard(last_exc)}")


def _probe_other_size(model: nn.Module, program: torch.export.ExportedProgram, example: torch.Tensor,
                      axes: list[int], stride: int) -> None:
    """torch.export may accept dynamic sizes and still guard, at run time, on the traced one (a head that needs
    one size): run the program at a bigger size and batch; raise when it refuses or disagrees in shape."""
    grown = example[:1].repeat(3, *([1] * (example.dim() - 1)))
    for axis in axes:
        grown = torch.cat([grown, grown.narrow(axis, 0, stride)], dim=axis)
    with torch.inference_mode():
        ref = model(grown)
        got = program.module()(grown)
    if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor) or ref.shape != got.shape:
        raise ExportError("the exported program gives another output shape at a new size")


def save_program(program: torch.export.ExportedProgram, fmt: str, path: str | os.PathLike,
                 optimize: bool = True, external_data: bool | None = None) -> Path:
    """Write ``program`` as ``fmt``: ``exported`` (``torch.export.save``, a .pt2 file) or ``onnx`` (the dynamo
    exporter, the graph's input named ``x`` and its output ``output``; ``optimize`` runs onnxscript's graph
    optimiser; ``external_data`` keeps the weights in ``FILE.data`` beside it, by default only where protobuf's
    2 GB limit needs it). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "exported":
        torch.export.save(program, path)
        return path
    if fmt != "onnx":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _require_onnx()
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every optimiser pass
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, f=None, dynamo=True, optimize=optimize, verbose=False,
                                         input_names=[INPUT_NAME], output_names=["output"])
        if external_data is None:
            external_data = sum(t.numel() * t.element_size() for t in program.state_dict.values()) > 1.8e9
        onnx_program.save(str(path), external_data=external_data)
    return path


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'cnnapps[export]'")


# ---------------------------------------------------------------- running exported models


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU behind an ``nn.Module`` face, so code written for the eager
    model (a task's ``predict``) runs it unchanged: tensor in (moved to the CPU, float32), tensor out.
    ``prepare`` (uint8 images to normalised floats) exists when ``mean`` / ``std`` are given."""

    def __init__(self, path: str | os.PathLike, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, threads: int = 0) -> None:
        super().__init__()
        _require_onnx()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # ORT's constant-folding notes are not the user's business
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ExportError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0][:200]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)
        self._norm = None if mean is None or std is None else (
            torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) (or float in [0, 1]) -> float (B, C, H, W) normalised with the saved mean/std."""
        if self._norm is None:
            raise ExportError(f"{self.path}: its preprocessing has no mean/std to prepare images with")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        return (x - self._norm[0]) / self._norm[1]


def load_exported(path: str | os.PathLike, threads: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable tensor -> tensor for an exported file: an ``OnnxModule`` for ``.onnx``, the program's module
    for ``.pt2`` (with its preprocessing's mean/std available as ``prepare`` for ONNX)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    meta = read_meta(path, required=False)
    pre = meta.get("preprocessing", {}) if meta else {}
    if path.suffix == ".onnx":
        return OnnxModule(path, pre.get("mean"), pre.get("std"), threads=threads)
    try:
        return torch.export.load(path).module()
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{path}: not a torch.export file: {str(exc).splitlines()[0][:200]}") from None


def meta_path_for(path: str | os.PathLike) -> Path:
    """The preprocessing JSON beside an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_meta(path: str | os.PathLike, required: bool = True) -> dict[str, Any]:
    """The preprocessing JSON of an exported file ({} when absent and not ``required``)."""
    meta = meta_path_for(path)
    if not meta.is_file():
        if required:
            raise ExportError(f"{meta}: missing (it is written beside the model by `cnnapps export`)")
        return {}
    try:
        doc = json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{meta}: not valid JSON: {exc}") from None
    if doc.get("format") != META_FORMAT:
        raise ExportError(f"{meta}: not a cnnapps export description (format {doc.get('format')!r})")
    return doc


# ---------------------------------------------------------------- parity


def _outputs(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = fn(x)
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the model returns {type(out).__name__}, not one tensor; only single-tensor outputs "
                          "are exported")
    return out.detach().float().cpu()


def check_parity(exported: Callable[[torch.Tensor], torch.Tensor], eager: nn.Module,
                 inputs: Sequence[torch.Tensor], tolerance: float = DEFAULT_TOLERANCE) -> Parity:
    """Run both on every tensor of ``inputs`` and compare (see ``Parity``)."""
    eager = eager.eval()
    worst, scale, agree, total, shapes = 0.0, 0.0, 0, 0, []
    for x in inputs:
        ref, got = _outputs(eager, x), _outputs(exported, x)
        if ref.shape != got.shape:
            raise ExportError(f"exported output shape {tuple(got.shape)} != eager {tuple(ref.shape)} for input "
                              f"{tuple(x.shape)}")
        worst = max(worst, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        if ref.dim() >= 2 and ref.shape[1] > 1:
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += ref.argmax(1).numel()
        shapes.append(list(x.shape))
    return Parity(max_abs_diff=worst, scale=scale, relative=worst / max(scale, 1.0),
                  label_agreement=agree / total if total else 1.0, labels_compared=total, shapes=shapes,
                  tolerance=tolerance)


def _parity_inputs(examples: torch.Tensor, spec: InputSpec, stride: int | None) -> list[torch.Tensor]:
    """The examples, and (when a spatial size is dynamic) the same examples cut to a smaller multiple of the
    stride, so the check also covers a size the export was not traced at."""
    out = [examples]
    dyn_axes = [i for i, s in enumerate(spec.shape) if isinstance(s, str) and i > 0]
    if dyn_axes and stride:
        cut = examples
        for axis in dyn_axes:
            size = examples.shape[axis]
            smaller = max(2 * stride, (size // stride - 1) * stride)
            if smaller < size:
                cut = cut.narrow(axis, 0, smaller)
        if cut.shape != examples.shape:
            out.append(cut.contiguous())
    return out


# ---------------------------------------------------------------- the whole job


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def export_model(model: nn.Module, examples: torch.Tensor, fmt: str, path: str | os.PathLike,
                 preprocessing: dict[str, Any] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                 extra: dict[str, Any] | None = None, optimize: bool = True) -> ExportResult:
    """Export ``model`` for inputs like ``examples`` (a batch; at least 2 of them), write ``fmt`` to ``path``
    and the preprocessing JSON beside it (``path`` + ``.json``: ``preprocessing`` plus the input spec and the
    parity check), then check the written file against the eager model on ``examples`` (and a smaller
    spatial size where that is dynamic). Raises ExportError, with the numbers, when the largest difference
    relative to the outputs' scale exceeds ``tolerance``; the files stay for inspection."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model = model.eval().cpu()
    examples = examples.detach().cpu()
    if examples.shape[0] < 2:
        examples = torch.cat([examples, examples])
    program, spec = export_program(model, examples[:2])
    path = save_program(program, fmt, path, optimize=optimize)
    runner = load_exported(path) if fmt == "onnx" else program.module()
    parity = check_parity(runner, model, _parity_inputs(examples, spec, total_stride(model)), tolerance)
    meta = {"format": META_FORMAT, "model_file": path.name, "model_format": fmt, "input": asdict(spec),
            "preprocessing": _plain(preprocessing or {}), "parity": {**asdict(parity), "passed": parity.passed},
            "torch": torch.__version__, **_plain(extra or {})}
    meta_path = meta_path_for(path)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    result = ExportResult(path=path, meta_path=meta_path, format=fmt, input=spec, parity=parity)
    if not parity.passed:
        raise ExportError(f"{path}: exported outputs differ from eager by {parity.max_abs_diff:.3g} (relative "
                          f"{parity.relative:.3g} > tolerance {tolerance:g}; labels agree on "
                          f"{parity.label_agreement:.2%})")
    return result


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
                      data_root: str | os.PathLike | None = None, examples: int = 8,
                      input_file: str | os.PathLike | None = None,
                      tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export a cnnapps checkpoint of any task: rebuild its model, take ``examples`` test examples of its task
    (``Task.example_inputs``, from ``data_root``) or the NumPy array in ``input_file`` (a batch in the model's
    input layout), and ``export_model`` it with the checkpoint's preprocessing (``preprocessing_from_checkpoint``
    plus ``Task.deployment_info``), its config and data state (so ``predict --onnx`` repeats the task's
    pipeline). ``out`` defaults to the checkpoint's path with the format's suffix."""
    from cnnapps.engine.checkpoint import load_checkpoint
    from cnnapps.engine.config import to_dict
    from cnnapps.engine.trainer import model_from_checkpoint
    from cnnapps.tasks import get_task

    checkpoint = Path(checkpoint)
    payload = load_checkpoint(checkpoint)
    try:
        task = get_task(str(payload.get("task")))
    except KeyError as exc:
        raise ExportError(f"{checkpoint}: {exc.args[0]}") from None
    model, cfg, state = model_from_checkpoint(task, checkpoint, "cpu")
    if input_file is not None:
        try:
            x = torch.from_numpy(np.load(input_file)).float()
        except (OSError, ValueError) as exc:
            raise ExportError(f"{input_file}: not a NumPy array file: {exc}") from None
    else:
        if data_root is None:
            raise ExportError("no input to check the export with: give --input FILE.npy or a data folder")
        data = task.build_data(cfg, Path(data_root), state=state)
        x = task.example_inputs(model, data, examples)
    pre = preprocessing_from_checkpoint(payload)
    pre.update(_plain(task.deployment_info(cfg, state)))
    out = Path(out) if out is not None else checkpoint.with_suffix(FORMATS[fmt])
    extra = {"task": task.name, "checkpoint": {"path": str(checkpoint), "epoch": payload.get("epoch"),
                                               "monitor": payload.get("monitor"),
                                               "best_value": payload.get("best_value")},
             "config": to_dict(cfg), "data_state": state}
    return export_model(model, x, fmt, out, preprocessing=pre, tolerance=tolerance, extra=extra)


def exported_for_task(task: Any, path: str | os.PathLike) -> tuple[Callable, Any, dict[str, Any]]:
    """What ``predict --onnx FILE`` runs: (the exported model as a module on the CPU, the task config and data
    state saved in its JSON), so the task's own ``predict`` reads, resamples and normalises inputs as it does
    for a checkpoint while the network runs without PyTorch's eager model (ONNX Runtime for ``.onnx``).
    ExportError when the JSON is missing or written for another task."""
    from cnnapps.engine.config import ConfigError, from_dict

    meta = read_meta(path)
    if meta.get("task") != task.name:
        raise ExportError(f"{path}: exported from a {meta.get('task')!r} checkpoint, not {task.name!r}")
    try:
        cfg = from_dict(task.Config, meta["config"])
    except (ConfigError, KeyError) as exc:
        raise ExportError(f"{meta_path_for(path)}: its config does not fit task {task.name!r}: {exc}") from None
    return load_exported(path), cfg, dict(meta.get("data_state") or {})


def load_pretrained_cfg(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing metadata of a cnnapps checkpoint, timm-style (``task``, ``classes``, ``num_classes``,
    ``mean`` / ``std``, ``input_size`` or ``sample_rate`` / ``input_samples``, other data settings under
    ``data``, ``backbone``) plus where it came from (``source``, ``sha256``, ``epoch``): what a model loaded from
    the checkpoint should carry as ``pretrained_cfg``. CheckpointError for an unreadable file."""
    from cnnapps.backbones._pretrained import file_sha256
    from cnnapps.engine.checkpoint import load_checkpoint

    payload = load_checkpoint(checkpoint)
    return {**preprocessing_from_checkpoint(payload), "source": str(checkpoint), "sha256": file_sha256(checkpoint),
            "epoch": payload.get("epoch")}
