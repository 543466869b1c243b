"""What units respond to: first-layer filters (images, or waveforms with frequency response), activation
maximisation with jitter/blur/L2, and the top-k patches of a data set that most excite a channel."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cnnapps.engine.plots import save_figure  # noqa: E402
from cnnapps.understand.attribution import stage_module, target_scores  # noqa: E402

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- first-layer filters


def first_conv(model: nn.Module) -> tuple[str, nn.modules.conv._ConvNd]:
    """(name, module) of the first convolution registered in ``model`` (the zoo registers modules in forward
    order, so this is the layer that sees the input). ValueError if there is none."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return name, m
    raise ValueError(f"{type(model).__name__} has no Conv1d/Conv2d layer")


def filter_tiles(weight: torch.Tensor) -> np.ndarray:
    """2D conv weights (out, in, kh, kw) -> (out, kh, kw, 3) images in [0, 1], each filter scaled by its own
    largest |weight| around grey 0.5 (so sign is visible: dark = negative). RGB filters stay colour; any other
    input count is shown as the mean over input channels."""
    w = weight.detach().float().cpu()
    if w.dim() != 4:
        raise ValueError(f"expected 2D conv weights (out, in, kh, kw), got {tuple(w.shape)}")
    w = w if w.shape[1] == 3 else w.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    peak = w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (0.5 + 0.5 * w / peak).permute(0, 2, 3, 1).numpy()


def frequency_response(weight: torch.Tensor, fs: float, n_fft: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """1D conv weights (out, in, k) -> (frequencies (n_fft/2+1,) in Hz, |H(f)| in dB (out, n_fft/2+1)): the
    magnitude of each filter's DFT (summed over input channels), zero-padded to ``n_fft``, 0 dB at its peak."""
    w = weight.detach().double().cpu()
    if w.dim() != 3:
        raise ValueError(f"expected 1D conv weights (out, in, k), got {tuple(w.shape)}")
    spec = torch.fft.rfft(w, n=max(n_fft, w.shape[-1]), dim=-1).abs().sum(1)  # (out, F)
    db = 20 * torch.log10(spec / spec.amax(1, keepdim=True).clamp_min(1e-12) + 1e-12)
    freqs = np.fft.rfftfreq(max(n_fft, w.shape[-1]), d=1.0 / fs)
    return freqs, db.numpy()


def plot_filters(weight: torch.Tensor, out_png: Path, title: str = "", fs: float | None = None,
                 max_filters: int = 64) -> Path:
    """Picture of first-layer filters: a grid of images for 2D weights (out, in, kh, kw); for 1D weights
    (out, in, k) one row per filter with its waveform and its frequency response (``fs`` in Hz, else cycles per
    sample). Returns ``out_png``."""
    if weight.dim() == 4:
        tiles = filter_tiles(weight)[:max_filters]
        cols = min(8, len(tiles))
        rows = math.ceil(len(tiles) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.4), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, tile in zip(axes.flat, tiles):
            ax.imshow(tile, interpolation="nearest")
    else:
        n = min(len(weight), max_filters, 16)
        freqs, db = frequency_response(weight[:n], fs or 1.0)
        w = weight[:n].detach().float().cpu().sum(1).numpy()
        fig, axes = plt.subplots(n, 2, figsize=(8, 0.75 * n + 0.8), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 1.4]})
        for i in range(n):
            axes[i, 0].plot(np.arange(w.shape[1]), w[i], color="black", lw=1, marker=".", ms=3)
            axes[i, 0].axhline(0, color="grey", lw=0.5)
            axes[i, 1].plot(freqs, db[i], color="tab:blue", lw=1)
            axes[i, 1].set_ylim(-40, 2)
            for ax in axes[i]:
                ax.tick_params(labelsize=6)
                if i < n - 1:
                    ax.set_xticklabels([])
        axes[0, 0].set_title("weights (summed over input channels)", fontsize=8)
        axes[0, 1].set_title("|H(f)| (dB, 0 at each filter's peak)", fontsize=8)
        axes[-1, 0].set_xlabel("tap", fontsize=8)
        axes[-1, 1].set_xlabel("frequency (Hz)" if fs else "cycles / sample", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png, dpi=120)


# ---------------------------------------------------------------- activation maximisation


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *L) along every spatial axis (reflect padding), same shape."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for axis in range(2, x.dim()):
        shape = [1] * (x.dim() - 2)
        shape[axis - 2] = len(k)
        kern = k.view(1, 1, *shape).repeat(c, 1, *([1] * (x.dim() - 2)))
        pad = [0, 0] * (x.dim() - 2)
        pad[2 * (x.dim() - 1 - axis)] = pad[2 * (x.dim() - 1 - axis) + 1] = radius
        xp = F.pad(x, pad, mode="reflect") if x.shape[axis] > radius else F.pad(x, pad, mode="replicate")
        x = (F.conv1d if x.dim() == 3 else F.conv2d)(xp, kern, groups=c)
    return x


@dataclass
class MaximizeResult:
    """Inputs (B, C, *L) found by gradient ascent and their objective values (B,) at the end."""

    inputs: torch.Tensor
    scores: torch.Tensor


def class_objective(model: nn.Module, classes: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Objective for ``maximize``: the logit of ``classes[b]`` for example ``b`` (summed over time for per-step
    outputs)."""
    idx = torch.as_tensor(list(classes))
    return lambda x: target_scores(model(x), idx.to(x.device))


def channel_objective(model: nn.Module, stage: int | str, channel: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Objective for ``maximize``: the mean activation of ``channel`` of a stage (a backbone stage index or a
    module name) over positions, per example."""
    _, module = stage_module(model, stage)

    def objective(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            model(x)
        finally:
            handle.remove()
        act = seen[0]
        if not 0 <= channel < act.shape[1]:
            raise ValueError(f"channel {channel} out of range: stage {stage} has {act.shape[1]} channels")
        return act[:, channel].flatten(1).mean(1)

    return objective


def maximize(objective: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int], batch: int = 1,
             steps: int = 128, lr: float = 0.05, jitter: int = 2, blur_every: int = 4, blur_sigma: float = 0.5,
             l2: float = 1e-3, bounds: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
             device: torch.device | str = "cpu") -> MaximizeResult:
    """Activation maximisation by gradient ascent on the input (Erhan et al. 2009; Simonyan et al. 2014;
    regularisers after Yosinski et al. 2015): start from small noise, maximise ``objective(x)`` (B,) minus
    ``l2 * |x|^2`` with Adam, jittering the input by a random circular shift of up to ``jitter`` samples per
    axis each step (robustness to translation, fewer high-frequency artefacts) and Gaussian-blurring it every
    ``blur_every`` steps. ``bounds`` (low, high), broadcastable to x, keep the input in the data's range
    (e.g. normalised [0, 1] pixels). Returns the inputs (B, *input_shape) and their final scores."""
    g = torch.Generator().manual_seed(seed)
    x = (0.01 * torch.randn(batch, *input_shape, generator=g)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    dims = tuple(range(2, 2 + len(input_shape) - 1))
    for i in range(steps):
        shifts = tuple(int(s) for s in torch.randint(-jitter, jitter + 1, (len(dims),), generator=g)) if jitter \
            else (0,) * len(dims)
        with torch.enable_grad():
            xin = torch.roll(x, shifts, dims) if jitter else x
            score = objective(xin)
            loss = -(score.sum() - l2 * x.pow(2).sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        with torch.no_grad():
            if blur_every and (i + 1) % blur_every == 0 and i < steps - 1:
                x.copy_(gaussian_blur(x, blur_sigma))
            if bounds is not None:
                x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
    with torch.no_grad():
        final = objective(x)
    return MaximizeResult(x.detach(), final.detach())


def plot_maximized(result: MaximizeResult, labels: Sequence[str], out_png: Path, title: str = "",
                   mean: torch.Tensor | None = None, std: torch.Tensor | None = None, fs: float | None = None,
                   image_like: bool = True) -> Path:
    """Grid of maximising inputs: images (undoing ``mean``/``std`` normalisation) or spectrograms (2D), or
    traces (1D, time axis in seconds when ``fs`` is given)."""
    x = result.inputs.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * std.view(1, -1, *([1] * (x.dim() - 2))) + mean.view(1, -1, *([1] * (x.dim() - 2)))
    n = len(x)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, (2.0 if x.dim() == 4 else 1.4) * rows + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, ax in enumerate(axes.flat[:n]):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        if x.dim() == 4:
            img = x[k]
            if image_like:
                img = img.clamp(0, 1) if mean is not None else (img - img.min()) / (img.max() - img.min() + 1e-12)
                shown = img.permute(1, 2, 0).numpy()
                ax.imshow(shown[..., 0] if shown.shape[2] == 1 else shown[..., :3], cmap="gray",
                          interpolation="nearest")
            else:
                ax.imshow(img[0].numpy(), origin="lower", aspect="auto", cmap="magma")
        else:
            sig = x[k, 0].numpy()
            t = np.arange(len(sig)) / fs if fs else np.arange(len(sig))
            ax.plot(t, sig, color="black", lw=0.6)
        ax.set_title(f"{labels[k]} ({float(result.scores[k]):.1f})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png)


# ---------------------------------------------------------------- top-k patches


@dataclass
class Patch:
    """One of the strongest responses of a channel: its value, the example, the unit's position in the stage map,
    the input box the unit sees ((first, last) per axis, clipped to the input) and that part of the example."""

    score: float
    index: int
    unit: tuple[int, ...]
    box: tuple[tuple[int, int], ...]
    display: np.ndarray


def top_k_patches(model: nn.Module, backbone: nn.Module, examples: Iterable[tuple[int, torch.Tensor, np.ndarray]],
                  stage: int, channel: int, k: int = 16) -> list[Patch]:
    """The ``k`` examples whose strongest unit of ``channel`` in ``stage`` is highest (one patch per example),
    with the input region that unit sees, from the analytic receptive field (``cnnapps.understand.receptive``).

    ``model`` maps each example's x (1, C, *L) to its output and contains ``backbone`` (whose stage is hooked);
    ``examples`` yields (index, x, display) with display in x's spatial coordinates ((H, W, 3), (T,) or
    (bins, frames))."""
    from cnnapps.understand.receptive import stage_receptive_fields

    _, module = stage_module(model, stage)
    geometry = None
    best: list[Patch] = []
    for index, x, display in examples:
        if geometry is None:
            geometry = stage_receptive_fields(backbone, tuple(x.shape[1:]))[stage].axes
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        act = seen[0][0]
        if not 0 <= channel < act.shape[0]:
            raise ValueError(f"channel {channel} out of range: stage {stage} has {act.shape[0]} channels")
        a = act[channel]
        flat = int(a.argmax())
        unit = tuple(int(v) for v in np.unravel_index(flat, tuple(a.shape)))
        score = float(a.flatten()[flat])
        if len(best) == k and score <= best[-1].score:
            continue
        box = tuple(ax.span(u, int(n)) for ax, u, n in zip(geometry, unit, x.shape[2:]))
        sl = tuple(slice(lo, hi + 1) for lo, hi in box)
        best.append(Patch(score, index, unit, box, np.array(display[sl])))
        best.sort(key=lambda p: -p.score)
        del best[k:]
    return best


def plot_patches(patches: Sequence[Patch], out_png: Path, title: str = "", fs: float | None = None) -> Path:
    """Grid of top-k patches: image crops, spectrogram crops, or signal snippets ((T,) or (T, C) displays; ``fs``
    given for signals), each titled with its activation and example index."""
    n = max(1, len(patches))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    one_d = bool(patches) and (patches[0].display.ndim == 1 or fs is not None)  # fs: signals, (T,) or (T, C)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols if not one_d else 2.4 * cols, 1.7 * rows + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, patches):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        if one_d:
            t = (np.arange(len(p.display)) + p.box[0][0]) / (fs or 1.0)
            traces = p.display if p.display.ndim == 1 else p.display - 1.1 * np.ptp(p.display) * np.arange(
                p.display.shape[1])[None, :]  # several channels, stacked
            ax.plot(t, traces, color="black", lw=0.7)
        elif p.display.ndim == 3:
            ax.imshow(np.clip(p.display, 0, 1), interpolation="nearest")
        else:
            ax.imshow(p.display, origin="lower", aspect="auto", cmap="magma")
        ax.set_title(f"#{p.index}: {p.score:.2f}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png)
