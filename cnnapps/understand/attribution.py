"""Attribution for any model and 1D/2D input: saliency, guided backprop, Grad-CAM, occlusion, integrated gradients."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# What to explain: a class index (one for all examples, or one per example), a callable mapping the model's
# output to one score per example, or None for each example's predicted class.
Target = int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None

METHODS = ("saliency", "guided-backprop", "gradcam", "occlusion", "integrated-gradients")


def _logits(output: Any) -> torch.Tensor:
    # GoogLeNet with aux heads in training returns a tuple; the first entry is the main output.
    return output[0] if isinstance(output, (tuple, list)) else output


def predicted_class(output: torch.Tensor) -> torch.Tensor:
    """(B, K) or (B, K, *L) -> (B,) class with the highest logit (averaged over any trailing axes first)."""
    out = _logits(output)
    pooled = out.flatten(2).mean(-1) if out.dim() > 2 else out
    return pooled.argmax(1)


def target_scores(output: torch.Tensor, target: Target) -> torch.Tensor:
    """One score per example, (B,): the logit of the target class, summed over trailing axes for per-position
    outputs such as the ECG model's (B, K, T) (so a class is explained over the whole record)."""
    out = _logits(output)
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(out)
        if scores.dim() != 1 or scores.shape[0] != out.shape[0]:
            raise ValueError(f"a target callable must return one score per example ({out.shape[0]},), got "
                             f"{tuple(scores.shape)}")
        return scores
    if target is None:
        idx = predicted_class(out)
    else:
        idx = torch.as_tensor(target, device=out.device).long().flatten()
        if idx.numel() == 1:
            idx = idx.expand(out.shape[0])
        if idx.numel() != out.shape[0]:
            raise ValueError(f"{idx.numel()} targets for a batch of {out.shape[0]}")
    if int(idx.max()) >= out.shape[1] or int(idx.min()) < 0:
        raise ValueError(f"target class {idx.tolist()} out of range for {out.shape[1]} outputs")
    picked = out[torch.arange(out.shape[0], device=out.device), idx]  # (B,) or (B, *L)
    return picked.flatten(1).sum(1) if picked.dim() > 1 else picked


def _resolve_target(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor | Callable:
    """A callable as is; otherwise one class index per example, (B,) (the predicted class where None)."""
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    if target is None:
        with torch.no_grad():
            return predicted_class(model(x))
    idx = torch.as_tensor(target, device=x.device).long().flatten()
    return idx.expand(x.shape[0]) if idx.numel() == 1 else idx


def _for_example(target: torch.Tensor | Callable, b: int, n: int) -> torch.Tensor | Callable:
    """Example ``b``'s target for a batch of ``n`` variants of it (occluded copies, points on a path)."""
    return target if callable(target) and not isinstance(target, torch.Tensor) else target[b].expand(n)


def _input_gradient(model: nn.Module, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = target_scores(model(x), target)
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad, scores.detach()


def saliency(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Vanilla gradient (Simonyan, Vedaldi, Zisserman 2014): d score / d input, same shape as ``x`` (B, C, *L).
    Use ``reduce_channels(..., "absmax")`` for the paper's map (max over channels of |gradient|)."""
    return _input_gradient(model, x, target)[0]


class _GuidedReLUFn(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients at positive inputs (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


class _GuidedReLUs(TorchFunctionMode):
    """Every ReLU the model calls (``nn.ReLU`` modules, ``F.relu``, ``torch.relu_``) becomes a guided ReLU."""

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("relu", "relu_") and args and isinstance(args[0], torch.Tensor):
            return _GuidedReLUFn.apply(args[0])
        return func(*args, **kwargs)


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Guided backpropagation (Springenberg, Dosovitskiy, Brox, Riedmiller 2015): the gradient with every ReLU's
    backward pass clamped to positive signals; same shape as ``x``. The forward pass is unchanged (a guided ReLU
    computes the same values), so the explained score is the model's own. Networks without ReLUs (LeNet-5's
    tanh) get the plain gradient."""
    with _GuidedReLUs():
        return _input_gradient(model, x, target)[0]


def stage_module(model: nn.Module, stage: int | str = -1) -> tuple[str, nn.Module]:
    """(dotted name, module) of a backbone stage of ``model``: an index into the zoo backbone's ``feature_info``
    (``model.backbone`` for task models that hold one, else ``model`` itself), or any module name of ``model``."""
    if isinstance(stage, str):
        try:
            return stage, model.get_submodule(stage)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {stage!r}") from None
    backbone = getattr(model, "backbone", model)
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no feature_info; name a module for Grad-CAM instead of a stage")
    if not -len(info) <= stage < len(info):
        raise ValueError(f"stage {stage} out of range: the backbone has {len(info)} stages (0..{len(info) - 1})")
    name = info.module_name(stage)
    prefix = "backbone." if backbone is not model else ""
    return prefix + name, backbone.get_submodule(name)


def grad_cam(model: nn.Module, x: torch.Tensor, target: Target = None, stage: int | str = -1) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on a stage: ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of
    d score / d A_k. Returns (B, *L_stage): the stage's own spatial size (``upsample_to`` brings it to the
    input's). ``stage``: backbone stage index (default: the last) or a module name."""
    _, module = stage_module(model, stage)
    captured: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)  # a leaf so the graph exists even with frozen weights
            scores = target_scores(model(xx), target)
            if not captured:
                raise RuntimeError(f"stage {stage!r} did not run in the forward pass")
            act = captured[0]
            (grad,) = torch.autograd.grad(scores.sum(), act)
    finally:
        handle.remove()
    if act.dim() < 3:
        raise ValueError(f"stage {stage!r} output {tuple(act.shape)} has no spatial axes")
    weights = grad.flatten(2).mean(-1)  # (B, K)
    cam = (weights.view(*weights.shape, *([1] * (act.dim() - 2))) * act.detach()).sum(1)
    return cam.clamp(min=0)


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = None, window: int | Sequence[int] = 8,
              stride: int | Sequence[int] | None = None, baseline: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """Occlusion sensitivity (Zeiler & Fergus 2014): slide a ``window`` of ``baseline`` values over the input and
    record the drop of the target score, score(x) - score(occluded x). Returns (B, *L): per position, the mean
    drop over the windows covering it (windows are placed every ``stride`` samples, default window // 2, and the
    last one flush with the end, so every position is covered). A region the model ignores gets exactly 0.

    The target class is fixed from the unoccluded input when None."""
    dims = x.dim() - 2
    if dims not in (1, 2):
        raise ValueError(f"occlusion needs (B, C, T) or (B, C, H, W) inputs, got {tuple(x.shape)}")
    size = tuple(x.shape[2:])
    win = (window,) * dims if isinstance(window, int) else tuple(window)
    step = tuple(max(w // 2, 1) for w in win) if stride is None else ((stride,) * dims if isinstance(stride, int)
                                                                      else tuple(stride))
    win = tuple(min(w, n) for w, n in zip(win, size))
    starts_per_axis = []
    for n, w, s in zip(size, win, step):
        starts = list(range(0, n - w + 1, s))
        if starts[-1] != n - w:
            starts.append(n - w)
        starts_per_axis.append(starts)
    boxes = [(a,) for a in starts_per_axis[0]] if dims == 1 else \
        [(a, b) for a in starts_per_axis[0] for b in starts_per_axis[1]]
    target = _resolve_target(model, x, target)
    heat = torch.zeros(x.shape[0], *size, dtype=torch.float64, device=x.device)
    count = torch.zeros(*size, dtype=torch.float64, device=x.device)
    for start in boxes:
        count[tuple(slice(s0, s0 + w) for s0, w in zip(start, win))] += 1
    with torch.no_grad():
        base = target_scores(model(x), target)  # (B,)
        for b in range(x.shape[0]):
            for i in range(0, len(boxes), batch_size):
                chunk = boxes[i:i + batch_size]
                occluded = x[b:b + 1].repeat(len(chunk), *([1] * (x.dim() - 1)))
                slices = [tuple(slice(s0, s0 + w) for s0, w in zip(start, win)) for start in chunk]
                for k, sl in enumerate(slices):
                    occluded[(k, slice(None), *sl)] = baseline
                drop = base[b] - target_scores(model(occluded), _for_example(target, b, len(chunk)))
                for k, sl in enumerate(slices):
                    heat[(b, *sl)] += float(drop[k])
    return (heat / count).to(x.dtype)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = None,
                         baseline: torch.Tensor | float = 0.0, steps: int = 32, batch_size: int = 16,
                         return_delta: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients (Sundararajan, Taly, Yan 2017): (x - baseline) times the mean gradient along the
    straight path from ``baseline`` to ``x`` (midpoint rule, ``steps`` points). Same shape as ``x``.

    Completeness: the attributions of an example sum to score(x) - score(baseline) up to the quadrature error;
    ``return_delta=True`` also returns that error per example, (B,)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = torch.full_like(x, float(baseline)) if not isinstance(baseline, torch.Tensor) else baseline.expand_as(x)
    target = _resolve_target(model, x, target)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for i in range(0, steps, batch_size):
            a = alphas[i:i + batch_size].view(-1, *([1] * (x.dim() - 1)))
            path = base[b:b + 1] + a * (x[b:b + 1] - base[b:b + 1])
            grad, _ = _input_gradient(model, path, _for_example(target, b, len(a)))
            total[b] += grad.sum(0)
    attr = (x - base) * total / steps
    if not return_delta:
        return attr
    with torch.no_grad():
        diff = target_scores(model(x), target) - target_scores(model(base), target)
    return attr, diff - attr.flatten(1).sum(1)


def attribute(method: str, model: nn.Module, x: torch.Tensor, target: Target = None, **kw: Any) -> torch.Tensor:
    """Dispatch on a method name of ``METHODS``; returns the method's own output (input-shaped for the gradient
    methods, (B, *L) maps for Grad-CAM and occlusion)."""
    fns: dict[str, Callable[..., Any]] = {"saliency": saliency, "guided-backprop": guided_backprop,
                                          "gradcam": grad_cam, "occlusion": occlusion,
                                          "integrated-gradients": integrated_gradients}
    if method not in fns:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    return fns[method](model, x, target, **kw)


def reduce_channels(attr: torch.Tensor, how: str = "absmax") -> torch.Tensor:
    """(B, C, *L) -> (B, *L): ``absmax`` (Simonyan's saliency map), ``abssum`` or ``sum`` (signed, for integrated
    gradients); a (B, *L) map passes through."""
    if how == "absmax":
        return attr.abs().amax(1)
    if how == "abssum":
        return attr.abs().sum(1)
    if how == "sum":
        return attr.sum(1)
    raise ValueError(f"unknown channel reduction {how!r} (absmax, abssum, sum)")


def to_map(method: str, attr: torch.Tensor) -> torch.Tensor:
    """The (B, *L) picture of a method's output: Grad-CAM and occlusion are maps already; gradients are reduced over
    channels (max |.| for saliency and guided backprop, signed sum for integrated gradients)."""
    if method in ("gradcam", "occlusion"):
        return attr
    return reduce_channels(attr, "sum" if method == "integrated-gradients" else "absmax")


def upsample_to(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, *l) map -> (B, *size) by (bi)linear interpolation, e.g. a Grad-CAM map onto its input."""
    mode = "linear" if cam.dim() == 2 else "bilinear"
    return F.interpolate(cam[:, None].float(), size=tuple(size), mode=mode, align_corners=False)[:, 0]
