"""Translation probe: how far a shift of the input moves each stage's features (equivariance) and the pooled
output (invariance), with zero padding and with circular padding in its place."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnapps.understand.receptive import _arg, _tuple, stage_outputs

log = logging.getLogger(__name__)

PADDINGS = ("zeros", "circular")


class CircularPadding(TorchFunctionMode):
    """Within the block every zero padding on the spatial axes becomes circular (wrap-around).

    This is what "without zero padding" means in this package: convolutions and pools keep their padding amounts,
    so every map keeps its size and a residual network still adds matching shapes, but the values read past an
    edge come from the opposite edge instead of being zeros. The network then sees its input as a torus: no
    border exists, so no unit can tell where it is from padding (the position cue Islam et al. 2020 trace to
    zero padding), and a circular shift of the input by a multiple of a stage's stride shifts that stage's map
    exactly. Affected: ``conv1d/2d`` and max/avg pools with ``padding > 0`` (including ``'same'``), and
    ``F.pad`` with constant zeros on spatial axes (asymmetric "same" convolutions); zero padding of the channel
    axis (the Hannun net's shortcut) is left alone. Removing padding altogether ("valid" convolutions) would
    instead shrink every map and break residual sums, so it is not offered.
    """

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "").lstrip("_")
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or x.dim() not in (3, 4):
            return func(*args, **kwargs)
        d = x.dim() - 2
        if name == f"conv{d}d":
            weight = _arg(args, kwargs, 1, "weight", None)
            bias = _arg(args, kwargs, 2, "bias", None)
            stride = _arg(args, kwargs, 3, "stride", 1)
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), d)
            groups = _arg(args, kwargs, 6, "groups", 1)
            kernel = tuple(weight.shape[2:])
            if padding == "valid":
                return func(*args, **kwargs)
            if padding == "same":
                pads = [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(kernel, dilation)]
            else:
                pads = [(p, p) for p in _tuple(padding, d)]
            if not any(a or b for a, b in pads):
                return func(*args, **kwargs)
            xp = F.pad(x, [v for pair in reversed(pads) for v in pair], mode="circular")
            return func(xp, weight, bias, stride, 0, _arg(args, kwargs, 5, "dilation", 1), groups)
        if name in (f"max_pool{d}d", f"max_pool{d}d_with_indices", f"avg_pool{d}d"):
            is_max = name.startswith("max")
            kernel = _tuple(_arg(args, kwargs, 1, "kernel_size", 1), d)
            stride = _tuple(_arg(args, kwargs, 2, "stride", None), d) or kernel
            padding = _tuple(_arg(args, kwargs, 3, "padding", 0), d)
            dilation = _tuple(_arg(args, kwargs, 4, "dilation", 1), d) if is_max else (1,) * d
            ceil_mode = bool(_arg(args, kwargs, 5 if is_max else 4, "ceil_mode", False))
            extra = [0] * d
            if ceil_mode:  # a window past the end (Caffe-style rounding up) wraps around too
                for a in range(d):
                    n, k, st, p, dl = x.shape[2 + a], kernel[a], stride[a], padding[a], dilation[a]
                    out = -(-(n + 2 * p - dl * (k - 1) - 1) // st) + 1
                    if (out - 1) * st >= n + p:
                        out -= 1
                    extra[a] = max(0, (out - 1) * st + dl * (k - 1) + 1 - (n + 2 * p))
            if not any(padding) and not any(extra):
                return func(*args, **kwargs)
            pads = [v for a in reversed(range(d)) for v in (padding[a], padding[a] + extra[a])]
            xp = F.pad(x, pads, mode="circular")
            if is_max:
                ret = {"return_indices": kwargs["return_indices"]} if "return_indices" in kwargs else {}
                return func(xp, kernel, stride, 0, dilation, False, **ret)
            return func(xp, kernel, stride, 0, False, True)
        if name == "pad":
            pad = tuple(_arg(args, kwargs, 1, "pad", ()))
            mode = _arg(args, kwargs, 2, "mode", "constant")
            value = _arg(args, kwargs, 3, "value", None)
            spatial, other = pad[: 2 * d], pad[2 * d:]
            if mode == "constant" and not value and any(spatial) and not any(other) and min(spatial) >= 0:
                return F.pad(x, list(spatial), mode="circular")
        return func(*args, **kwargs)


def padding_context(padding: str) -> Any:
    """A context manager that runs a network with ``zeros`` (as built) or ``circular`` padding."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return CircularPadding() if padding == "circular" else nullcontext()


class WithPadding(nn.Module):
    """A backbone that always runs under ``padding`` (train and eval alike): ``forward``, ``forward_intermediates``
    and ``feature_info`` pass through. Used to train and probe "VGG-16 without zero padding"."""

    def __init__(self, inner: nn.Module, padding: str = "circular") -> None:
        super().__init__()
        padding_context(padding)  # validates
        self.inner = inner
        self.padding = padding

    @property
    def feature_info(self) -> Any:
        return self.inner.feature_info

    @property
    def features_only(self) -> bool:
        return getattr(self.inner, "features_only", False)

    def forward(self, x: torch.Tensor) -> Any:
        with padding_context(self.padding):
            return self.inner(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The inner backbone's ``forward_intermediates`` (timm's signature) under this padding."""
        with padding_context(self.padding):
            return self.inner.forward_intermediates(x, *args, **kwargs)


# ---------------------------------------------------------------- the probe


@dataclass
class StageShift:
    """One stage under one input shift: ``error`` = |F(shift x) - shift(F x)| / |F x| over the batch (0 = exactly
    equivariant), with the map shifted by ``shift / reduction`` units; None when the shift is not a multiple of
    the stage's stride (no integer shift of the map corresponds)."""

    stage: int
    reduction: int
    shift: int
    error: float | None


@dataclass
class ShiftProbe:
    """Translation probe of one backbone with one padding: per stage and shift the equivariance error, and per
    shift the invariance of the globally pooled last stage (relative change and cosine similarity) and, when a
    classifier was given, the share of examples whose top-1 class is unchanged."""

    name: str
    padding: str
    axis: str
    shifts: list[int]
    stages: list[StageShift] = field(default_factory=list)
    pooled_change: dict[int, float] = field(default_factory=dict)
    pooled_cosine: dict[int, float] = field(default_factory=dict)
    top1_kept: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten().norm() / b.flatten().norm().clamp_min(1e-12))


def translation_probe(backbone: nn.Module, x: torch.Tensor, shifts: Sequence[int] = (1, 2, 4, 8, 16, 32),
                      padding: str = "zeros", name: str = "", head: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> ShiftProbe:
    """Shift ``x`` (B, C, *L) circularly along its last axis (width for images, time for signals) by each of
    ``shifts`` samples and compare every stage map with the unshifted map shifted by ``shift / reduction`` units.

    A circular shift (``torch.roll``) moves content without losing any, so with ``padding='circular'`` a stage
    is exactly equivariant to shifts that are multiples of its stride (error ~1e-7), and every remaining error with
    zero padding comes from the borders. Shifts that are not multiples of a stage's stride have no integer
    counterpart on its map; their effect shows in the invariance of the pooled output, which subsampling breaks
    (Azulay & Weiss 2019; Zhang 2019). ``head`` (last stage map -> logits) adds the top-1 agreement. The
    backbone runs in eval mode, restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), padding_context(padding):
            base = stage_outputs(backbone, x)
            base_pool = base[-1].flatten(2).mean(-1)
            base_top = head(base[-1]).argmax(1) if head is not None else None
            reductions = [int(r) for r in backbone.feature_info.reduction()]
            probe = ShiftProbe(name or type(backbone).__name__, padding, "time" if x.dim() == 3 else "width",
                               list(shifts))
            for s in shifts:
                moved = stage_outputs(backbone, torch.roll(x, s, dims=-1))
                for k, (f0, f1, r) in enumerate(zip(base, moved, reductions)):
                    err = _rel(f1, torch.roll(f0, s // r, dims=-1)) if s % r == 0 else None
                    probe.stages.append(StageShift(k, r, s, err))
                pool = moved[-1].flatten(2).mean(-1)
                probe.pooled_change[s] = _rel(pool, base_pool)
                probe.pooled_cosine[s] = float(F.cosine_similarity(pool, base_pool, dim=1).mean())
                if head is not None:
                    probe.top1_kept[s] = float((head(moved[-1]).argmax(1) == base_top).float().mean())
    finally:
        backbone.train(was_training)
    return probe


def format_probe(probes: Sequence[ShiftProbe]) -> str:
    """Markdown: one row per (backbone, padding, stage), one column per shift: the equivariance error (``-``
    where the shift is not a multiple of the stage's stride), then the pooled output's relative change. Probes
    with different shift lists get separate tables."""
    groups: dict[tuple[int, ...], list[ShiftProbe]] = {}
    for p in probes:
        groups.setdefault(tuple(p.shifts), []).append(p)
    tables = []
    for shifts, group in groups.items():
        head = "| backbone | padding | stage (stride) | " + " | ".join(f"shift {s}" for s in shifts) + " |"
        lines = [head, "|" + "---|" * (3 + len(shifts))]
        for p in group:
            for k in sorted({st.stage for st in p.stages}):
                row = {st.shift: st for st in p.stages if st.stage == k}
                cells = ["-" if row[s].error is None else f"{row[s].error:.3f}" for s in shifts]
                lines.append(f"| {p.name} | {p.padding} | {k} (/{row[shifts[0]].reduction}) | " + " | ".join(cells)
                             + " |")
            cells = [f"{p.pooled_change[s]:.3f}" for s in shifts]
            lines.append(f"| {p.name} | {p.padding} | pooled output: relative change | " + " | ".join(cells) + " |")
            if p.top1_kept:
                cells = [f"{p.top1_kept[s]:.2f}" for s in shifts]
                lines.append(f"| {p.name} | {p.padding} | top-1 unchanged | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
