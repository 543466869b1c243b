"""ECG pictures: a strip coloured by predicted rhythm (truth as a band beneath), and the confusion matrices."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cnnapps.engine.plots import plot_confusion  # noqa: E402
from cnnapps.tasks.ecg.data import IGNORE, merge_segments, n_steps  # noqa: E402

ROW_SECONDS = 10.0  # one row per 10 s, like a printed rhythm strip


def class_colour(index: int) -> Any:
    return plt.get_cmap("tab10")(index % 10)


def plot_ecg_strip(signal: np.ndarray, fs: float, steps: np.ndarray, classes: Sequence[str], out_png: Path,
                   step: int = 256, truth: np.ndarray | None = None, title: str = "", start_s: float = 0.0,
                   seconds: float = 60.0) -> Path:
    """Draw ``signal`` (time,) at ``fs`` from ``start_s`` for at most ``seconds``, in 10 s rows, each step's
    background coloured by its predicted class ``steps`` (steps,); ``truth`` (steps,), -100 = unknown, is drawn
    as a thin band at the bottom of each row. Returns ``out_png``."""
    signal = np.asarray(signal, dtype=np.float32)
    total = len(signal) / fs
    start_s = max(0.0, min(start_s, total))
    end_s = min(total, start_s + seconds)
    n_rows = max(1, math.ceil((end_s - start_s) / ROW_SECONDS))
    fig, axes = plt.subplots(n_rows, 1, figsize=(12, 1.7 * n_rows + 0.6), squeeze=False)
    pred_segments = merge_segments(steps, step / fs)
    truth_segments = merge_segments(truth, step / fs) if truth is not None else []
    lo, hi = np.percentile(signal, [0.5, 99.5]) if len(signal) else (-1.0, 1.0)
    pad = 0.1 * (hi - lo + 1e-6)
    used: set[int] = set()
    for row, ax in enumerate(axes[:, 0]):
        a = start_s + row * ROW_SECONDS
        b = min(end_s, a + ROW_SECONDS)
        for s0, s1, c in pred_segments:
            if s1 > a and s0 < b:
                ax.axvspan(max(s0, a), min(s1, b), color=class_colour(c), alpha=0.25, lw=0)
                used.add(c)
        for s0, s1, c in truth_segments:
            if c != IGNORE and s1 > a and s0 < b:
                ax.axvspan(max(s0, a), min(s1, b), ymin=0, ymax=0.08, color=class_colour(c), alpha=0.9, lw=0)
                used.add(c)
        i0, i1 = int(a * fs), int(b * fs)
        ax.plot(np.arange(i0, i1) / fs, signal[i0:i1], color="black", lw=0.6)
        ax.set_xlim(a, a + ROW_SECONDS)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    handles = [Patch(color=class_colour(c), alpha=0.5, label=classes[c]) for c in sorted(used)]
    if handles:
        fig.legend(handles=handles, loc="upper right", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle((title + "  " if title else "") + "(background: predicted; bottom band: truth)"
                 if truth is not None else title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97 if n_rows > 2 else 0.92))
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_confusion_matrices(artifacts: dict[str, Any], run_dir: Path, target: str) -> dict[str, str]:
    """Write the confusion matrices of a metric's ``artifacts()`` into ``run_dir``; {what: file name}."""
    run_dir = Path(run_dir)
    classes = artifacts["classes"]
    out: dict[str, str] = {}
    if target == "record":
        plot_confusion(artifacts["confusion"], classes, run_dir / "confusion.png",
                       "records (label from the mean probability)")
        out["confusion matrix (records)"] = "confusion.png"
    plot_confusion(artifacts["seq_confusion"], classes, run_dir / "confusion_steps.png", "256-sample steps")
    out["confusion matrix (steps)"] = "confusion_steps.png"
    return out


def _pick_record(artifacts: dict[str, Any], dataset: Any) -> int | None:
    """A record worth showing: the first (in record order) whose truth or prediction has a class other than the
    first (normal), preferring one predicted right at record level; else any evaluated record."""
    steps = artifacts["record_steps"]
    if not steps:
        return None
    fallback = None
    for record in sorted(steps):
        length = dataset.cache.records[record].length
        truth = dataset.labeler(record, 0, length, n_steps(length, dataset.step))
        labelled = truth[truth != IGNORE]
        pred = steps[record]
        if (labelled > 0).any() or (pred > 0).any():
            if fallback is None:
                fallback = record
            if len(labelled) and np.bincount(labelled).argmax() == np.bincount(pred).argmax() \
                    and (labelled > 0).any():
                return record
    return fallback if fallback is not None else min(steps)


def plot_example_strip(artifacts: dict[str, Any], dataset: Any, state: dict, out_png: Path) -> Path | None:
    """An evaluated record from ``dataset`` (EvalWindows) drawn with its predicted and true steps; the 60 s shown
    start 10 s before its first non-normal step. None when nothing was evaluated."""
    record = _pick_record(artifacts, dataset)
    if record is None:
        return None
    fs, step, classes = int(state["fs"]), int(state["step"]), list(state["classes"])
    signal = np.asarray(dataset.cache.signal(record))
    truth = dataset.labeler(record, 0, len(signal), n_steps(len(signal), step))
    pred = artifacts["record_steps"][record]
    marks = np.flatnonzero((truth > 0) | (pred[: len(truth)] > 0))
    start_s = float(max(0, math.floor(marks[0] * step / fs) - 10)) if len(marks) else 0.0
    name = dataset.cache.records[record].name
    return plot_ecg_strip(signal, fs, pred, classes, out_png, step=step, truth=truth, start_s=start_s,
                          title=f"record {name}")
