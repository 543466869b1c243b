"""Pictures of attributions: image overlays, ECG/waveform strips coloured by attribution, spectrogram overlays."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnapps.engine.plots import save_figure  # noqa: E402

ROW_SECONDS = 10.0  # ECG strips: one row per 10 s, like a printed rhythm strip


def normalise_heat(heat: np.ndarray, signed: bool = False) -> np.ndarray:
    """Scale a map to [0, 1] by its largest magnitude ([-1, 1] when ``signed``); an all-zero map stays 0."""
    heat = np.asarray(heat, dtype=np.float64)
    peak = float(np.abs(heat).max()) if heat.size else 0.0
    if peak == 0.0:
        return np.zeros_like(heat)
    return heat / peak if signed else np.abs(heat) / peak


def plot_image_attribution(image: np.ndarray, heat: np.ndarray, out_png: Path, title: str = "",
                           signed: bool = False) -> Path:
    """The input image (H, W, 3) in [0, 1] beside the same image overlaid with ``heat`` (H, W); signed maps
    (integrated gradients) use a diverging colour map, others ``jet``. Returns ``out_png``."""
    h = normalise_heat(heat, signed)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(image.mean(2), cmap="gray", interpolation="nearest")
    axes[1].imshow(h, cmap="RdBu_r" if signed else "jet", alpha=0.55, vmin=-1 if signed else 0, vmax=1,
                   interpolation="bilinear")
    axes[1].set_title("attribution", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png, dpi=120)


def smooth(heat: np.ndarray, width: int) -> np.ndarray:
    """Moving average of a (T,) map over ``width`` samples (display only: sample-level attributions of an ECG
    are spikes a few samples wide, invisible at strip scale)."""
    if width <= 1:
        return np.asarray(heat, dtype=np.float64)
    return np.convolve(np.asarray(heat, dtype=np.float64), np.ones(width) / width, mode="same")


def plot_signal_attribution(signal: np.ndarray, fs: float, heats: Mapping[str, np.ndarray], out_png: Path,
                            title: str = "", signed: bool = False, steps: np.ndarray | None = None,
                            step: int = 256, smooth_s: float = 0.04,
                            channel_names: Sequence[str] | None = None) -> Path:
    """A 1D signal (T,) at ``fs``, or several (T, C) stacked top to bottom (ECG leads, named by
    ``channel_names``), drawn once per entry of ``heats`` ({label: (T,) attribution}), in 10 s rows, in black
    over a background coloured by the attribution at each moment (moving average over ``smooth_s`` seconds),
    i.e. an ECG strip per predicted rhythm. ``steps`` (per-step class names, optional) are written under each
    row where the predicted label changes. Returns ``out_png``."""
    signal = np.asarray(signal, dtype=np.float64)
    traces = signal[:, None] if signal.ndim == 1 else signal  # (T, C)
    n_ch = traces.shape[1]
    seconds = len(traces) / fs
    rows_per = max(1, math.ceil(seconds / ROW_SECONDS))
    n_rows = rows_per * max(1, len(heats))
    fig, axes = plt.subplots(n_rows, 1, figsize=(12, (1.5 + 0.9 * (n_ch - 1)) * n_rows + 0.8), squeeze=False)
    lo, hi = np.percentile(traces, [0.5, 99.5]) if len(traces) else (-1.0, 1.0)
    gap = 1.1 * (hi - lo + 1e-6)  # one channel's band; channel k is drawn k bands lower
    traces = traces - gap * np.arange(n_ch)[None, :]
    lo -= gap * (n_ch - 1)
    pad = 0.15 * (hi - lo + 1e-6) / n_ch
    t = np.arange(len(traces)) / fs
    for k, (label, heat) in enumerate(heats.items()):
        h = normalise_heat(smooth(heat, int(round(smooth_s * fs))), signed)
        for r in range(rows_per):
            ax = axes[k * rows_per + r, 0]
            a, b = r * ROW_SECONDS, min(seconds, (r + 1) * ROW_SECONDS)
            i0, i1 = int(a * fs), int(b * fs)
            ax.imshow(h[None, i0:i1], extent=(a, b, lo - pad, hi + pad), aspect="auto", interpolation="nearest",
                      cmap="RdBu_r" if signed else "Reds", vmin=-1 if signed else 0, vmax=1, alpha=0.8)
            ax.plot(t[i0:i1], traces[i0:i1], color="black", lw=0.6)
            if n_ch > 1 and channel_names:
                for c, name in enumerate(channel_names[:n_ch]):
                    ax.text(a + 0.05, hi - gap * c, str(name), fontsize=7, color="dimgray", va="top")
            ax.set_xlim(a, a + ROW_SECONDS)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_yticks([])
            ax.tick_params(axis="x", labelsize=7)
            if r == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if steps is not None:
                prev = None
                for j, name in enumerate(steps):
                    s0 = j * step / fs
                    if a <= s0 < b and name != prev:
                        ax.text(s0, lo - pad * 0.8, str(name), fontsize=6, color="dimgray")
                    prev = name
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png)


def plot_spectrogram_attribution(spec: np.ndarray, heat: np.ndarray, frames_per_s: float, out_png: Path,
                                 title: str = "", signed: bool = False) -> Path:
    """A spectrogram (bins, frames) beside its attribution (bins, frames) over time and frequency bin."""
    h = normalise_heat(heat, signed)
    extent = (0.0, spec.shape[1] / frames_per_s, 0, spec.shape[0])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=extent)
    axes[0].set_title("log-mel (dB)", fontsize=9)
    axes[1].imshow(spec, origin="lower", aspect="auto", cmap="gray", extent=extent)
    axes[1].imshow(h, origin="lower", aspect="auto", cmap="RdBu_r" if signed else "jet", alpha=0.55,
                   vmin=-1 if signed else 0, vmax=1, extent=extent)
    axes[1].set_title("attribution", fontsize=9)
    for ax in axes:
        ax.set_xlabel("time (s)", fontsize=8)
        ax.set_ylabel("mel bin", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png)
