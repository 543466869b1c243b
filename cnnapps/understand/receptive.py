"""Receptive field, effective stride and activation memory of every layer of a 1D or 2D network, traced analytically."""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ATTR = "_cnnapps_rf"  # where a traced tensor carries its geometry (a tuple of AxisRF, one per spatial axis)


@dataclass(frozen=True)
class AxisRF:
    """Geometry of one spatial axis of a feature map, in input samples.

    Unit ``i`` of the map sees input samples ``start + i * stride`` .. ``start + i * stride + size - 1``; indices
    below 0 or past the input lie in padding (the classic receptive-field size counts them, as published tables
    do). ``stride`` is the effective stride (input samples between neighbouring units), ``length`` the number of
    units. ``whole``: every unit depends on the whole input axis (after a global pool, a flatten, a linear layer,
    or an operation whose geometry the tracer does not model, which it then treats conservatively).
    """

    size: int
    stride: int
    start: int
    length: int
    whole: bool = False

    def span(self, unit: int, input_len: int | None = None) -> tuple[int, int]:
        """First and last input index that unit ``unit`` sees, clipped to ``0..input_len-1`` when given."""
        if self.whole:
            return 0, (input_len - 1 if input_len is not None else self.size - 1)
        lo, hi = self.start + unit * self.stride, self.start + unit * self.stride + self.size - 1
        if input_len is not None:
            lo, hi = max(lo, 0), min(hi, input_len - 1)
        return lo, hi


Geometry = tuple[AxisRF, ...]


def _whole(input_len: int) -> AxisRF:
    return AxisRF(size=input_len, stride=input_len, start=0, length=1, whole=True)


def geometry_of(t: Any) -> Geometry | None:
    """The traced geometry of a tensor produced inside ``trace_receptive_fields`` (None for untraced tensors)."""
    return getattr(t, _ATTR, None) if isinstance(t, torch.Tensor) else None


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _iter_tensors(item)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1 and n > 1:
        return value * n
    return value


def _arg(args: Sequence[Any], kwargs: dict, pos: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


class _Tracer(TorchFunctionMode):
    """Annotates every tensor computed from a traced input with its per-axis receptive-field geometry.

    Works at the level of torch functions, so residual sums, concatenations and padding inside a block's
    ``forward`` are followed exactly as they run (no assumption that a network is a chain of layers)."""

    def __init__(self, dim: int, input_len: Sequence[int]) -> None:
        super().__init__()
        self.dim = dim
        self.input_len = tuple(input_len)

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._annotate(func, args, kwargs, out)
        except Exception as exc:  # noqa: BLE001 - geometry is a by-product; never break the forward pass
            log.debug("receptive-field tracer skipped %s: %s", getattr(func, "__name__", func), exc)
        return out

    # ---- rules
    def _annotate(self, func: Callable, args: Sequence[Any], kwargs: dict, out: Any) -> None:
        outs = [t for t in _iter_tensors(out)]
        if not outs:
            return
        traced = [t for t in _iter_tensors((args, kwargs)) if geometry_of(t) is not None]
        if not traced:
            return
        name = getattr(func, "__name__", "").lstrip("_")
        d = self.dim
        main = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input")
        geo: Geometry | None = None
        if geometry_of(main) is not None and outs[0].dim() == d + 2 and main.dim() == d + 2:
            if name in (f"conv{d}d",):
                geo = self._conv(main, outs[0], args, kwargs)
            elif name in (f"max_pool{d}d", f"max_pool{d}d_with_indices", f"avg_pool{d}d", f"lp_pool{d}d"):
                geo = self._pool(name, main, outs[0], args, kwargs)
            elif name == "pad":
                geo = self._pad(main, outs[0], args, kwargs)
            elif name in (f"adaptive_avg_pool{d}d", f"adaptive_max_pool{d}d"):
                geo = self._adaptive(main, outs[0])
        if geo is None:
            geo = self._pointwise(traced, outs[0])
        for t in outs:
            if t.is_floating_point() or t.dtype in (torch.int64,):  # max-pool indices share the geometry
                setattr(t, _ATTR, geo)

    def _conv(self, x: torch.Tensor, y: torch.Tensor, args: Sequence[Any], kwargs: dict) -> Geometry:
        d = self.dim
        weight = _arg(args, kwargs, 1, "weight", None)
        kernel = tuple(weight.shape[2:])
        stride = _tuple(_arg(args, kwargs, 3, "stride", 1), d)
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), d)
        if padding == "valid":
            left = (0,) * d
        elif padding == "same":
            left = tuple(dl * (k - 1) // 2 for k, dl in zip(kernel, dilation))
        else:
            left = _tuple(padding, d)
        return self._window(x, y, kernel, stride, left, dilation)

    def _pool(self, name: str, x: torch.Tensor, y: torch.Tensor, args: Sequence[Any], kwargs: dict) -> Geometry:
        d = self.dim
        if name.startswith("lp_pool"):  # lp_pool(input, norm_type, kernel_size, stride, ceil_mode)
            kernel = _tuple(_arg(args, kwargs, 2, "kernel_size", 1), d)
            stride = _tuple(_arg(args, kwargs, 3, "stride", None), d) or kernel
            return self._window(x, y, kernel, stride, (0,) * d, (1,) * d)
        kernel = _tuple(_arg(args, kwargs, 1, "kernel_size", 1), d)
        stride = _tuple(_arg(args, kwargs, 2, "stride", None), d) or kernel  # None or [] mean "= kernel"
        padding = _tuple(_arg(args, kwargs, 3, "padding", 0), d)
        dilation = _tuple(_arg(args, kwargs, 4, "dilation", 1), d) if name.startswith("max") else (1,) * d
        return self._window(x, y, kernel, stride, padding, dilation)

    def _window(self, x: torch.Tensor, y: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
                left: Sequence[int], dilation: Sequence[int]) -> Geometry:
        axes = []
        for a, ax in enumerate(geometry_of(x)):
            n = int(y.shape[2 + a])
            if ax.whole:
                axes.append(AxisRF(ax.size, ax.stride, ax.start, n, True))
                continue
            axes.append(AxisRF(size=ax.size + (kernel[a] - 1) * dilation[a] * ax.stride, stride=ax.stride * stride[a],
                               start=ax.start - left[a] * ax.stride, length=n))
        return tuple(axes)

    def _pad(self, x: torch.Tensor, y: torch.Tensor, args: Sequence[Any], kwargs: dict) -> Geometry:
        pad = tuple(_arg(args, kwargs, 1, "pad", ()))
        axes = []
        for a, ax in enumerate(geometry_of(x)):
            pair = self.dim - 1 - a  # F.pad lists the last axis first
            left = int(pad[2 * pair]) if len(pad) > 2 * pair else 0
            n = int(y.shape[2 + a])
            axes.append(AxisRF(ax.size, ax.stride, ax.start, n, True) if ax.whole else
                        AxisRF(ax.size, ax.stride, ax.start - left * ax.stride, n))
        return tuple(axes)

    def _adaptive(self, x: torch.Tensor, y: torch.Tensor) -> Geometry:
        axes = []
        for a, ax in enumerate(geometry_of(x)):
            n_in, n_out = int(x.shape[2 + a]), int(y.shape[2 + a])
            if n_out == n_in:
                axes.append(ax)
            elif not ax.whole and n_out < n_in and n_in % n_out == 0 and n_out > 1:
                k = n_in // n_out  # uniform bins: an ordinary pool with kernel = stride = k
                axes.append(AxisRF(ax.size + (k - 1) * ax.stride, ax.stride * k, ax.start, n_out))
            else:  # global pooling, or uneven bins: every unit counted as seeing the whole axis
                axes.append(_whole(self.input_len[a]))
        return tuple(axes)

    def _pointwise(self, traced: list[torch.Tensor], y: torch.Tensor) -> Geometry:
        """Same-size maps combine (residual sums, concatenation on channels, activations, norms): the union of the
        inputs' fields. A broadcast input (SE's (B, C, 1, 1) gate) or any change of the spatial shape that no rule
        above models (flatten, reductions, interpolation) makes the axis ``whole``."""
        d = self.dim
        if y.dim() != d + 2:
            return tuple(_whole(n) for n in self.input_len)
        axes = []
        for a in range(d):
            n = int(y.shape[2 + a])
            parts = []
            whole = False
            for t in traced:
                if t.dim() != d + 2:
                    whole = True
                    continue
                ax = geometry_of(t)[a]
                if int(t.shape[2 + a]) != n or ax.whole:
                    whole = True
                else:
                    parts.append(ax)
            if whole or not parts or len({p.stride for p in parts}) > 1:
                axes.append(_whole(self.input_len[a]))
                continue
            lo = min(p.start for p in parts)
            hi = max(p.start + p.size for p in parts)
            axes.append(AxisRF(hi - lo, parts[0].stride, lo, n))
        return tuple(axes)


def mark_input(x: torch.Tensor) -> torch.Tensor:
    """Give a network input (B, C, *L) its identity geometry (each sample sees itself) and return it."""
    setattr(x, _ATTR, tuple(AxisRF(1, 1, 0, int(n)) for n in x.shape[2:]))
    return x


@contextmanager
def trace_receptive_fields(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Within the block, every tensor computed from ``x`` (B, C, *L) carries its geometry (``geometry_of``).

    >>> with trace_receptive_fields(x) as x:
    ...     y = model(x)
    >>> geometry_of(y)  # one AxisRF per spatial axis
    """
    if x.dim() < 3:
        raise ValueError(f"receptive fields need (batch, channels, *spatial) inputs, got shape {tuple(x.shape)}")
    mark_input(x)
    with _Tracer(x.dim() - 2, tuple(x.shape[2:])):
        yield x


# ---------------------------------------------------------------- per stage / per layer


@dataclass(frozen=True)
class StageRF:
    """Receptive field of one backbone stage: the module that produces it and one AxisRF per spatial axis."""

    index: int
    module: str
    axes: Geometry

    @property
    def size(self) -> tuple[int, ...]:
        """Receptive-field size per axis (input samples)."""
        return tuple(a.size for a in self.axes)

    @property
    def stride(self) -> tuple[int, ...]:
        """Effective stride per axis."""
        return tuple(a.stride for a in self.axes)


def stage_outputs(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The stage maps that ``backbone.feature_info`` describes, shallow to deep: the forward output of a
    ``features_only`` backbone (only its ``out_indices``), else ``forward_intermediates`` (every stage)."""
    if getattr(backbone, "features_only", False):
        return list(backbone(x))
    if not hasattr(backbone, "forward_intermediates"):
        raise TypeError(f"{type(backbone).__name__} has no forward_intermediates; pass a zoo backbone")
    return backbone.forward_intermediates(x, intermediates_only=True)


def _example_input(model: nn.Module, input_shape: Sequence[int], device: torch.device | str,
                   dtype: torch.dtype = torch.float32, batch: int = 1) -> torch.Tensor:
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be positive sizes without the batch axis, got {tuple(input_shape)}")
    return torch.zeros(batch, *input_shape, device=device, dtype=dtype)


def stage_receptive_fields(backbone: nn.Module, input_shape: Sequence[int]) -> list[StageRF]:
    """Analytic receptive field and effective stride of every stage of a zoo ``backbone`` (anything with
    ``forward_intermediates`` and ``feature_info``) for one input of ``input_shape`` (no batch axis).

    Runs on the device of the backbone's parameters (``"meta"`` costs no compute), in eval mode, restored after.
    """
    if not hasattr(backbone, "forward_intermediates"):
        raise TypeError(f"{type(backbone).__name__} has no forward_intermediates; pass a zoo backbone")
    first = next(backbone.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = _example_input(backbone, input_shape, device)
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad(), trace_receptive_fields(x) as x:
            outs = stage_outputs(backbone, x)
    finally:
        backbone.train(was_training)
    names = backbone.feature_info.module_name()
    return [StageRF(i, names[i], geometry_of(o)) for i, o in enumerate(outs)]


def stage_receptive_fields_by_name(name: str, input_shape: Sequence[int] | None = None, **kw: Any) -> list[StageRF]:
    """``stage_receptive_fields`` of registered backbone ``name`` built on the meta device (milliseconds even for
    VGG-16 at 224x224); ``input_shape`` defaults to the registry's ``default_input``."""
    from cnnapps.backbones import backbone_info, create_backbone

    info = backbone_info(name)
    shape = tuple(input_shape or info.default_input)
    kw.setdefault("in_chans", shape[0])
    with torch.device("meta"):
        model = create_backbone(name, **kw)
    return stage_receptive_fields(model, shape)


def layer_receptive_fields(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, Geometry | None]]:
    """(module name, geometry of its output) for every module call, in the order calls finish; any model whose
    input is (C, *L). Runs like ``stage_receptive_fields`` (eval mode, no gradients, parameters' device)."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = _example_input(model, input_shape, device)
    rows: list[tuple[str, Geometry | None]] = []

    def hook(_mod: nn.Module, _inputs: Any, out: Any, q: str) -> None:
        rows.append((q, geometry_of(next(_iter_tensors(out), None))))

    handles = [m.register_forward_hook(lambda mod, i, o, q=q: hook(mod, i, o, q))
               for q, m in model.named_modules() if q]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), trace_receptive_fields(x) as x:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


# ---------------------------------------------------------------- activation memory


def saved_activation_bytes(model: nn.Module, input_shape: Sequence[int],
                           batch: int = 2) -> tuple[dict[tuple[str, int], int], int]:
    """Bytes autograd keeps for the backward pass, per sample: ``({(leaf module name, call number): bytes}, total)``.

    Measured with ``torch.autograd.graph.saved_tensors_hooks`` during one training-mode forward pass on the
    ``meta`` device (the model's own parameters are swapped for meta copies with ``functional_call``, so nothing
    is computed, no memory is allocated and no running statistic of the model changes). Parameters and buffers
    are not activations and are not counted; a tensor saved by several operations (an input read by a block's
    two branches) counts once, for the first leaf module that saved it. Tensors saved by operations between leaf
    modules (a residual multiplication in a parent's ``forward``) count only in the total. ``batch`` samples are
    run (2, so batch norm accepts 1x1 maps in training mode) and the bytes divided by it.
    """
    from torch.func import functional_call

    replacements = {k: torch.empty_like(v, device="meta") for k, v in model.named_parameters()}
    replacements.update({k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()})
    state_ids = {id(v) for v in replacements.values()}
    x = torch.zeros(batch, *input_shape, device="meta", requires_grad=True)
    stack: list[tuple[str, int]] = []
    calls: dict[str, int] = {}
    per_call: dict[tuple[str, int], int] = {}
    seen: dict[int, torch.Tensor] = {}
    total = 0
    leaves = {m: q for q, m in model.named_modules() if q and not any(True for _ in m.children())}

    def pre(mod: nn.Module, _inputs: Any) -> None:
        q = leaves[mod]
        n = calls.get(q, 0)
        calls[q] = n + 1
        stack.append((q, n))
        per_call.setdefault((q, n), 0)

    def post(mod: nn.Module, _inputs: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t  # Linear saves ``weight.t()``, a view of a parameter
        if id(t) in state_ids or id(base) in state_ids or id(t) in seen:
            return t
        seen[id(t)] = t  # keep it alive so the id is not reused by another tensor
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if stack:
            per_call[stack[-1]] += nbytes
        return t

    handles = []
    for m in leaves:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    try:
        model.train()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(model, replacements, (x,))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v // batch for k, v in per_call.items()}, total // batch


def output_bytes(t: torch.Tensor | None) -> int:
    """Bytes of one sample of an output tensor (B, ...): its forward activation memory per sample."""
    if t is None or t.dim() == 0:
        return 0
    return (t.numel() // max(int(t.shape[0]), 1)) * t.element_size()


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_axes(values: Sequence[int] | None, whole: bool = False) -> str:
    """``(196, 196)`` -> ``196``; ``(3, 7)`` -> ``3x7``; a whole-input field -> ``all``; None -> ``-``."""
    if whole:
        return "all"
    if not values:
        return "-"
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


# ---------------------------------------------------------------- the empirical check: gradient support


class _MaxToAvg(TorchFunctionMode):
    """Max pooling routes the gradient to one input per window; for a support check every input of the window must
    get gradient, so max pools run as average pools of the same geometry."""

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "").lstrip("_")
        for d, avg in ((1, F.avg_pool1d), (2, F.avg_pool2d)):
            if name in (f"max_pool{d}d", f"max_pool{d}d_with_indices"):
                x = args[0]
                kernel = _arg(args, kwargs, 1, "kernel_size", 1)
                stride = _arg(args, kwargs, 2, "stride", None)
                padding = _arg(args, kwargs, 3, "padding", 0)
                dilation = _tuple(_arg(args, kwargs, 4, "dilation", 1), d)
                ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
                if any(v != 1 for v in dilation) or kwargs.get("return_indices"):
                    raise NotImplementedError("gradient support: dilated max pools or pools returning indices")
                return avg(x, kernel, stride if stride else kernel, padding, ceil_mode, True)
        return func(*args, **kwargs)


def linearized_copy(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy in which every path through the geometric receptive field carries gradient:
    conv/linear weights all ``1 / fan_in`` and biases 0, batch norm an identity, so with a positive input every
    activation is positive (ReLUs pass gradient everywhere). Used with average-for-max pooling by
    ``gradient_support``; the weights of ``model`` are untouched."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.running_mean is not None:
                    mod.running_mean.zero_()
                    mod.running_var.fill_(1.0)
                if mod.affine:
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
    return m


def gradient_support(model: nn.Module, input_shape: Sequence[int], stage: int | Sequence[int] | None = None,
                     unit: Sequence[int] | None = None) -> Any:
    """The input box whose samples change one output unit: per spatial axis, the first and last input index where
    the gradient of that unit (summed over channels) is non-zero. The empirical counterpart of the analytic field.

    ``stage``: a backbone stage index (into ``stage_outputs``), or a list of them (one forward pass, a box per
    stage: a list of boxes is returned); None: the model's output (B, C, *L'). ``unit``: the unit's position in
    the map (default: its centre). The gradient is taken in ``linearized_copy(model)`` with max pools run as
    average pools and an all-ones input, because a trained network's gradient support is only a subset of its
    receptive field (max pools pick one input, dead ReLUs block paths); here every path of the field contributes,
    so the support is exactly the field within the input. Returns ``((first, last), ...)`` per axis.
    """
    lin = linearized_copy(model)
    x = torch.ones(1, *input_shape, dtype=torch.float64, requires_grad=True)
    stages = [stage] if stage is None or isinstance(stage, int) else list(stage)
    with _MaxToAvg():
        if stages == [None]:
            outs = [lin(x)]
        else:
            inter = stage_outputs(lin, x)
            outs = [inter[i] for i in stages]
    boxes_per_stage = []
    for k, out in enumerate(outs):
        if isinstance(out, (list, tuple)):
            out = out[0]
        if out.dim() < 3:
            raise ValueError(f"the selected output has no spatial axes (shape {tuple(out.shape)})")
        pos = tuple(unit) if unit is not None else tuple(n // 2 for n in out.shape[2:])
        (grad,) = torch.autograd.grad(out[(0, slice(None), *pos)].sum(), x, retain_graph=k < len(outs) - 1)
        g = grad[0].abs().sum(0)  # (*L)
        boxes = []
        for a in range(g.dim()):
            other = tuple(i for i in range(g.dim()) if i != a)
            line = g.amax(dim=other) if other else g
            nz = torch.nonzero(line > 0).flatten()
            if not len(nz):
                raise RuntimeError("the selected unit has no gradient at all; is it connected to the input?")
            boxes.append((int(nz[0]), int(nz[-1])))
        boxes_per_stage.append(tuple(boxes))
    return boxes_per_stage if isinstance(stage, (list, tuple)) else boxes_per_stage[0]


def analytic_support(axes: Geometry, input_shape: Sequence[int],
                     unit: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """The analytic counterpart of ``gradient_support``: the span of ``unit`` (default: the map's centre) per axis,
    clipped to the input ``input_shape`` (C, *L)."""
    lengths = input_shape[1:]
    pos = tuple(unit) if unit is not None else tuple(a.length // 2 for a in axes)
    return tuple(a.span(p, n) for a, p, n in zip(axes, pos, lengths))


def describe_rf(axes: Geometry | None) -> tuple[str, str]:
    """(receptive field, effective stride) as short strings for tables: ``("196", "16")``, ``("all", "-")``."""
    if axes is None:
        return "-", "-"
    if any(a.whole for a in axes):
        return "all", "-"
    return format_axes([a.size for a in axes]), format_axes([a.stride for a in axes])


def receptive_field_formula(layers: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Textbook recursion for a chain of (kernel, stride) layers: ``r_l = r_{l-1} + (k_l - 1) * j_{l-1}``,
    ``j_l = j_{l-1} * s_l`` (Araujo, Norris, Sim, "Computing Receptive Fields of Convolutional Neural Networks",
    Distill 2019). Returns (r_l, j_l) after each layer; used by the tests as an independent reference."""
    r, j, out = 1, 1, []
    for k, s in layers:
        r, j = r + (k - 1) * j, j * s
        out.append((r, j))
    return out

