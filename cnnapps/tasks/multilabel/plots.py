"""Multi-label pictures: per-class AP/F1 bars for a run's report, and one image with its predicted labels."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnapps.engine.plots import save_figure  # noqa: E402


def plot_ap_per_class(names: Sequence[str], ap: Sequence[float], f1: Sequence[float], m_ap: float,
                      baseline: float, out_png: Path) -> Path:
    """Horizontal bars of AP and F1 per class, the mAP and the constant-score baseline as lines."""
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.6))
    ax.barh(y - 0.2, ap, height=0.4, label="AP", color="tab:blue")
    ax.barh(y + 0.2, f1, height=0.4, label="F1 at its threshold", color="tab:orange")
    ax.axvline(m_ap, color="tab:blue", ls="--", lw=1, label=f"mAP {m_ap:.3f}")
    ax.axvline(baseline, color="grey", ls=":", lw=1, label=f"constant-score mAP {baseline:.3f}")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("test split: per-class average precision and F1")
    return save_figure(fig, out_png)


def draw_prediction(image: np.ndarray, names: Sequence[str], prob: np.ndarray, thresholds: np.ndarray,
                    out_png: Path, top: int = 8) -> Path:
    """The image (H, W, 3) uint8 beside the ``top`` class probabilities; bars at or above their class threshold
    (black tick) are green and listed in the title."""
    order = np.argsort(-prob)[:top]
    above = [f"{names[i]} {prob[i]:.2f}" for i in np.argsort(-prob) if prob[i] >= thresholds[i]]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    a0.imshow(image)
    a0.axis("off")
    a0.set_title(", ".join(above) if above else "no label above its threshold", fontsize=10)
    y = np.arange(len(order))
    colors = ["tab:green" if prob[i] >= thresholds[i] else "lightgrey" for i in order]
    a1.barh(y, prob[order], color=colors)
    a1.scatter(thresholds[order], y, marker="|", s=200, color="black", label="threshold")
    a1.set_yticks(y, [names[i] for i in order])
    a1.invert_yaxis()
    a1.set_xlim(0, 1)
    a1.set_xlabel("probability")
    a1.legend(loc="lower right", fontsize=8)
    return save_figure(fig, out_png, dpi=100)
