"""Plots the engine draws for every run: training curves from metrics.jsonl, and a confusion-matrix helper."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: plt.Figure, out_png: Path | str, dpi: int = 110) -> Path:
    """Lay ``fig`` out tightly, write it as ``out_png`` (creating its folder) and close it; returns the path.
    Every picture the suite draws ends here, so figures never pile up in a long run."""
    out_png = Path(out_png)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def plot_curves(history: Sequence[dict], steps: Sequence[Sequence[float]], steps_per_epoch: int, out_png: Path,
                monitor: str) -> Path | None:
    """Three panels: the training loss per optimiser step (thin) with its epoch means and the validation loss;
    the monitored validation metric per epoch; the learning rate per optimiser step. The x axis is in epochs
    with integer ticks (steps are placed at step / steps_per_epoch). ``steps`` rows are [global step, lr, loss].
    Returns the path, or None if nothing was logged."""
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    per = max(1, steps_per_epoch)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if steps:
        xs = [s[0] / per for s in steps]
        axes[0].plot(xs, [s[2] for s in steps], color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        axes[2].plot(xs, [s[1] for s in steps], color="tab:orange")
    else:  # a run from before per-step logging: the learning rate at each epoch's end
        axes[2].plot(epochs, [r.get("lr") for r in history], marker="o", color="tab:orange")
    axes[0].plot(epochs, [r.get("train_loss") for r in history], marker="o", color="tab:blue", label="train (epoch)")
    val = [(r["epoch"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        axes[0].plot(*zip(*val), marker="o", color="tab:red", label="validation")
    losses = [s[2] for s in steps] + [r.get("train_loss", 0) for r in history] + [v for _, v in val]
    if losses and min(losses) > 0:  # the first steps' loss would flatten everything after them
        axes[0].set_yscale("log")
    axes[0].set_title("loss")
    axes[0].legend(fontsize=8)
    key = f"val_{monitor}"
    pts = [(r["epoch"], r[key]) for r in history if key in r]
    if pts:
        axes[1].plot(*zip(*pts), marker="o", color="tab:green")
    axes[1].set_title(key)
    axes[2].set_title("learning rate (per step)" if steps else "learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return save_figure(fig, out_png)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], out_png: Path, title: str = "") -> Path:
    """A confusion matrix (rows: true, columns: predicted), counts annotated, rows coloured by recall."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, out_png)
