"""Per-layer summary of a model: output shapes, parameters, multiply-adds, receptive field, effective stride and
activation memory, measured with forward hooks."""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnapps.understand.receptive import (Geometry, describe_rf, format_bytes, geometry_of, output_bytes,
                                          saved_activation_bytes, trace_receptive_fields)

log = logging.getLogger(__name__)


@dataclass
class LayerRow:
    """One call of a leaf module: its dotted ``name``, class name, output shape (batch 1), the parameters it
    owns (counted at its first call only, so shared modules are not counted twice) and its multiply-adds.

    ``geometry``: receptive field of its output per spatial axis (``cnnapps.understand.receptive.AxisRF``: size,
    effective stride, offset; None where the input has no spatial axes). ``forward_bytes``: its output for one
    sample (what inference holds while the tensor lives). ``backward_bytes``: what autograd saves in this call for
    the backward pass, per sample (what training keeps until backward reaches the layer; None if not measured).
    """

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    geometry: Geometry | None = None
    forward_bytes: int = 0
    backward_bytes: int | None = None

    @property
    def receptive_field(self) -> tuple[int, ...] | None:
        """Receptive-field size per spatial axis in input samples; None when unknown or the whole input."""
        if self.geometry is None or any(a.whole for a in self.geometry):
            return None
        return tuple(a.size for a in self.geometry)

    @property
    def effective_stride(self) -> tuple[int, ...] | None:
        """Input samples between neighbouring output units, per spatial axis; None as for ``receptive_field``."""
        if self.geometry is None or any(a.whole for a in self.geometry):
            return None
        return tuple(a.stride for a in self.geometry)


@dataclass
class ModelSummary:
    """Result of ``summarize``: ``rows`` per leaf-module call in execution order and the totals.

    ``params`` / ``trainable_params`` count every parameter of the model once; ``macs`` is the sum of the rows'
    multiply-adds for one input of ``input_shape`` (no batch axis). ``forward_bytes`` sums the rows' outputs
    (an upper bound of what inference must hold at once); ``backward_bytes`` is everything autograd saves for
    the backward pass per sample (None if it could not be measured).
    """

    name: str
    input_shape: tuple[int, ...]
    rows: list[LayerRow] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0
    macs: int = 0
    forward_bytes: int = 0
    backward_bytes: int | None = None

    def format_table(self) -> str:
        """A fixed-width table of the rows followed by the totals, numbers with thousands separators. RF is the
        receptive field in input samples (``all``: the whole input), Stride the effective stride; Out and Saved
        are bytes per sample of the output and of what the backward pass keeps."""
        header = ("Layer", "Type", "Output shape", "Params", "MACs", "RF", "Stride", "Out/sample", "Saved/sample")
        body = [(r.name, r.type, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}",
                 *describe_rf(r.geometry), format_bytes(r.forward_bytes), format_bytes(r.backward_bytes))
                for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]

        def line(cells: Sequence[str]) -> str:
            left = [c.ljust(w) for c, w in zip(cells[:3], widths[:3])]
            right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:])]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(line(header))
        shape = "x".join(map(str, self.input_shape))
        lines = [f"{self.name} @ {shape}", rule, line(header), rule, *map(line, body), rule]
        lines += [
            f"Total params: {self.params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.params - self.trainable_params:,}",
            f"Total MACs: {self.macs:,} ({self.macs / 1e9:.2f} G)",
            f"Activations per sample: outputs {format_bytes(self.forward_bytes)}, "
            f"saved for backward {format_bytes(self.backward_bytes)}",
        ]
        return "\n".join(lines)


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of one call: conv (any dim, groups) = output elements x (in_channels / groups) x kernel
    volume; linear = output elements x in_features. Everything else (BN, activations, pooling, sums) counts 0."""
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def summarize(
    model_or_name: nn.Module | str,
    input_shape: tuple[int, ...],
    *,
    device: str | torch.device | None = None,
    **create_kw: Any,
) -> ModelSummary:
    """Summarise a model (or a backbone built by name with ``create_kw``) for one input of ``input_shape``
    (no batch axis, e.g. (3, 224, 224) or (1, 8192)).

    Counting convention (that of the lecture tables and torchvision's "GFLOPS" metadata): MACs are the
    multiply-accumulates of convolution and linear layers only; batch norm, activations, pooling, LRN and
    residual additions are not counted. Parameters are counted once each, whether or not a layer runs.

    A name is built on the ``"meta"`` device by default: shapes propagate without allocating weights or
    computing anything, so even vgg16 at 224x224 takes milliseconds. A given model runs (in eval mode, without
    gradients, restored afterwards) on the device of its parameters unless ``device`` says otherwise.

    Receptive fields are traced analytically through every torch function the pass calls (residual sums and
    concatenations included; see ``cnnapps.understand.receptive``); the backward bytes come from a second,
    training-mode pass on the meta device that never touches the model's weights or statistics.
    """
    if isinstance(model_or_name, str):
        from cnnapps.backbones import create_backbone

        name = model_or_name
        target = torch.device(device or "meta")
        with target:
            model = create_backbone(name, **create_kw)
    else:
        if create_kw:
            raise TypeError(f"create_kw {sorted(create_kw)} only apply when a backbone name is given")
        model, name = model_or_name, type(model_or_name).__name__
        first = next(model.parameters(), None)
        target = torch.device(device) if device else (first.device if first is not None else torch.device("cpu"))
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be positive sizes without the batch axis, got {input_shape!r}")

    rows: list[LayerRow] = []
    counted: set[int] = set()

    def hook(module: nn.Module, _inputs: Any, output: Any, *, qualname: str) -> None:
        out = _first_tensor(output)
        params = 0
        if id(module) not in counted:
            counted.add(id(module))
            params = sum(p.numel() for p in module.parameters(recurse=False))
        shape = tuple(out.shape[1:]) if out is not None else ()
        macs = _macs(module, out) if out is not None else 0
        rows.append(LayerRow(qualname, type(module).__name__, shape, params, macs, geometry_of(out), output_bytes(out)))

    handles = [
        m.register_forward_hook(lambda mod, i, o, q=qualname: hook(mod, i, o, qualname=q))
        for qualname, m in model.named_modules()
        if qualname and not any(True for _ in m.children())
    ]
    was_training = model.training
    x = torch.zeros(1, *input_shape, device=target)
    # Geometry needs (channels, *spatial) inputs; anything else (a waveform front end's (samples,)) goes untraced.
    tracing = trace_receptive_fields(x) if len(input_shape) >= 2 else contextlib.nullcontext(x)
    try:
        model.eval()
        with torch.no_grad(), tracing as x:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    saved_total = None
    try:
        per_call, saved_total = saved_activation_bytes(model, tuple(input_shape))
        calls: dict[str, int] = {}
        for r in rows:
            n = calls.get(r.name, 0)
            calls[r.name] = n + 1
            r.backward_bytes = per_call.get((r.name, n))
    except Exception as exc:  # noqa: BLE001 - e.g. an op without a meta kernel: the column shows "-"
        log.info("backward activation memory not measured for %s: %s", name, exc)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(name, tuple(input_shape), rows, params, trainable, sum(r.macs for r in rows),
                        sum(r.forward_bytes for r in rows), saved_total)
