"""Segmentation pictures: a mask overlay on a photo, the ground truth beside the prediction (predict), and image /
truth / prediction rows (report)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cnnapps.engine.plots import save_figure  # noqa: E402
from cnnapps.metrics.segmentation import IGNORE_INDEX  # noqa: E402


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: background black, then red, green, blue, ... from matplotlib's tab10."""
    tab = (np.array(plt.get_cmap("tab10").colors) * 255).astype(np.uint8)
    first = np.array([[0, 0, 0], [230, 25, 25]], dtype=np.uint8)
    return np.concatenate([first, tab])[:num_classes] if num_classes <= 12 else \
        (plt.get_cmap("hsv")(np.linspace(0, 1, num_classes))[:, :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an image: (H, W, 3) uint8 and (H, W) class ids -> (H, W, 3) uint8; background
    (class 0) and ignored pixels are left as they are."""
    colours = class_colours(num_classes)
    out = image.astype(np.float32)
    fg = (labels > 0) & (labels != IGNORE_INDEX)
    ids = np.where(fg, labels, 0)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[ids[fg]].astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, out_png: Path, alpha: float = 0.5) -> Path:
    """Write the overlay of ``labels`` (H, W) on ``image`` (H, W, 3) as a PNG at the image's own size."""
    Image.fromarray(overlay(image, labels, num_classes, alpha)).save(out_png)
    return out_png


def save_comparison(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                    out_png: Path, alpha: float = 0.5, iou: dict[str, float] | None = None) -> Path:
    """The ground truth (H, W) and the prediction (H, W) of one image (H, W, 3) uint8, each overlaid on it, side
    by side, with a legend of the class colours and, in the prediction's title, its per-class IoU (``iou``)."""
    k = len(class_names)
    h, w = truth.shape
    panel = 4.8
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel, panel * h / w + 0.5))
    scores = ", ".join(f"{n} IoU {v:.2f}" for n, v in (iou or {}).items() if np.isfinite(v))
    for ax, labels, title in ((axes[0], truth, "ground truth"),
                              (axes[1], pred, "prediction" + (f" ({scores})" if scores else ""))):
        ax.imshow(overlay(image, labels, k, alpha))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    colours = class_colours(k)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i] / 255) for i in range(1, k)]
    axes[0].legend(handles, list(class_names[1:]), loc="upper right", fontsize=8, framealpha=0.8)
    return save_figure(fig, out_png, dpi=100)


def plot_examples(examples: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray]], class_names: Sequence[str],
                  out_png: Path) -> Path | None:
    """One row per example: image, true mask overlay, predicted overlay; None when there is nothing to draw."""
    if not examples:
        return None
    k = len(class_names)
    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 2.6 * len(examples)), squeeze=False)
    for row, (img, truth, pred) in zip(axes, examples):
        base = img if img is not None else np.zeros((*truth.shape, 3), np.uint8)
        for ax, pic, title in zip(row, (base, overlay(base, truth, k), overlay(base, pred, k)),
                                  ("image", "truth", "prediction")):
            ax.imshow(pic)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    return save_figure(fig, out_png, dpi=100)
