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
# ECG paper: 25 mm/s and 10 mm/mV, a 1 mm grid with a heavier line every 5 mm
MM_SECONDS, MM_MV = 1 / 25, 1 / 10
GRID_MINOR, GRID_MAJOR = "#f6c9c9", "#e58a8a"


def class_colour(index: int) -> Any:
    return plt.get_cmap("tab10")(index % 10)


def _paper_grid(ax: Any, x0: float, x1: float, y0: float, y1: float, paper: bool) -> None:
    """ECG paper behind the trace: 1 mm (0.04 s, 0.1 mV) and 5 mm (0.2 s, 0.5 mV) lines when ``paper``; a plain
    light grid at 0.2 s and 1 SD otherwise."""
    if not paper:
        ax.set_xticks(np.arange(math.floor(x0), x1 + 1e-9, 1.0))
        ax.grid(True, color="#dddddd", lw=0.5)
        return
    for step, colour, lw in ((1, GRID_MINOR, 0.3), (5, GRID_MAJOR, 0.6)):
        xs = np.arange(math.ceil(x0 / (step * MM_SECONDS)), math.floor(x1 / (step * MM_SECONDS)) + 1) * step * MM_SECONDS
        ys = np.arange(math.ceil(y0 / (step * MM_MV)), math.floor(y1 / (step * MM_MV)) + 1) * step * MM_MV
        ax.vlines(xs, y0, y1, colors=colour, lw=lw, zorder=0)
        ax.hlines(ys, x0, x1, colors=colour, lw=lw, zorder=0)
    ax.set_xticks(np.arange(math.ceil(x0), x1 + 1e-9, 1.0))
    ax.set_yticks(np.arange(math.ceil(y0 / 0.5), math.floor(y1 / 0.5) + 1) * 0.5)


def plot_ecg_strip(signal: np.ndarray, fs: float, steps: np.ndarray, classes: Sequence[str], out_png: Path,
                   step: int = 256, truth: np.ndarray | None = None, title: str = "", start_s: float = 0.0,
                   seconds: float = 60.0, units: str = "mV") -> Path:
    """Draw ``signal`` (time,) at ``fs`` from ``start_s`` for at most ``seconds``, in 10 s rows. With ``units``
    "mV" the rows are ECG paper at 25 mm/s and 10 mm/mV (1 mm and 5 mm grid, amplitude axis in mV, equal mm in
    both directions); other units (e.g. "SD" for a normalised signal) get a plain grid. Each step is tinted by its
    predicted class ``steps`` (steps,), also drawn as a band along the top of its row; ``truth`` (steps,),
    -100 = unknown, is a band along the bottom. Returns ``out_png``."""
    signal = np.asarray(signal, dtype=np.float32)
    paper = units == "mV"
    total = len(signal) / fs
    start_s = max(0.0, min(start_s, total))
    end_s = min(total, start_s + seconds)
    n_rows = max(1, math.ceil((end_s - start_s) / ROW_SECONDS))
    lo, hi = np.percentile(signal, [0.2, 99.8]) if len(signal) else (-1.0, 1.0)
    pad = 0.15 * (hi - lo + 1e-6)
    lo, hi = lo - pad, hi + pad
    if paper:  # whole 5 mm squares, at least 2 mV tall
        lo, hi = math.floor(lo / 0.5) * 0.5, math.ceil(hi / 0.5) * 0.5
        if hi - lo < 2.0:
            lo, hi = lo - (2.0 - (hi - lo)) / 2, hi + (2.0 - (hi - lo)) / 2
    # on paper a row is 250 mm wide and (hi - lo) * 10 mm tall: keep that shape
    row_h = min(4.0, max(1.2, 12.0 * (hi - lo) * 10 / 250)) if paper else 1.7
    fig, axes = plt.subplots(n_rows, 1, figsize=(12, row_h * n_rows + 0.9), squeeze=False)
    pred_segments = merge_segments(steps, step / fs)
    truth_segments = merge_segments(truth, step / fs) if truth is not None else []
    used: set[int] = set()
    for row, ax in enumerate(axes[:, 0]):
        a = start_s + row * ROW_SECONDS
        b = min(end_s, a + ROW_SECONDS)
        _paper_grid(ax, a, a + ROW_SECONDS, lo, hi, paper)
        for s0, s1, c in pred_segments:
            if s1 > a and s0 < b:
                ax.axvspan(max(s0, a), min(s1, b), color=class_colour(c), alpha=0.12, lw=0, zorder=1)
                ax.axvspan(max(s0, a), min(s1, b), ymin=0.93, ymax=1.0, color=class_colour(c), alpha=0.9, lw=0,
                           zorder=2)
                used.add(c)
        for s0, s1, c in truth_segments:
            if c != IGNORE and s1 > a and s0 < b:
                ax.axvspan(max(s0, a), min(s1, b), ymin=0, ymax=0.07, color=class_colour(c), alpha=0.9, lw=0,
                           zorder=2)
                used.add(c)
        i0, i1 = int(a * fs), int(b * fs)
        ax.plot(np.arange(i0, i1) / fs, signal[i0:i1], color="black", lw=0.7, zorder=3)
        ax.set_xlim(a, a + ROW_SECONDS)
        ax.set_ylim(lo, hi)
        if paper:  # 1 mV is 10 mm, 1 s is 25 mm
            ax.set_aspect(MM_SECONDS / MM_MV, adjustable="box")
        ax.set_ylabel(units, fontsize=7)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time (s)" + ("; paper 25 mm/s, 10 mm/mV, 1 mm and 5 mm grid" if paper else ""),
                           fontsize=8)
    handles = [Patch(color=class_colour(c), alpha=0.6, label=classes[c]) for c in sorted(used)]
    if handles:
        fig.legend(handles=handles, loc="upper right", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    bands = "top band and tint: predicted" + ("; bottom band: truth" if truth is not None else "")
    fig.suptitle((title + "  " if title else "") + f"({bands})", fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97 if n_rows > 2 else 0.9))
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
    signal, units = record_in_millivolts(dataset.cache, record)
    truth = dataset.labeler(record, 0, len(signal), n_steps(len(signal), step))
    pred = artifacts["record_steps"][record]
    marks = np.flatnonzero((truth > 0) | (pred[: len(truth)] > 0))
    start_s = float(max(0, math.floor(marks[0] * step / fs) - 10)) if len(marks) else 0.0
    name = dataset.cache.records[record].name
    return plot_ecg_strip(signal, fs, pred, classes, out_png, step=step, truth=truth, start_s=start_s,
                          title=f"record {name}", units=units)


def record_in_millivolts(cache: Any, record: int) -> tuple[np.ndarray, str]:
    """A cache record's lead in physical units (mV), read again from its WFDB file and resampled as preparation
    does, with its baseline (median) removed: ((time,) at the cache's fs, "mV"). The cache holds normalised
    samples only; where the file cannot be read any more (moved, damaged) those are returned with "SD"."""
    from cnnapps.tasks.ecg.prepare import RecordSkip, read_lead

    info = cache.records[record]
    normalised = np.asarray(cache.signal(record))
    try:
        raw, fs_in, _ = read_lead(Path(cache.index["record_dir"]) / info.name, info.lead)
    except (RecordSkip, KeyError, OSError):
        return normalised, "SD"
    return signal_in_millivolts(raw, fs_in, cache.fs, normalised)


def signal_in_millivolts(raw: np.ndarray, fs_in: float, fs: int, normalised: np.ndarray) -> tuple[np.ndarray, str]:
    """``raw`` (physical units, mV, at ``fs_in``) resampled to ``fs`` as preparation does, its median baseline
    removed, for drawing on ECG paper: ((time,), "mV"); ``normalised`` with "SD" if the two disagree in length
    (the record changed) or the raw samples hold gaps."""
    from cnnapps.tasks.ecg.prepare import resample

    raw = np.asarray(raw, dtype=np.float64)
    if not np.isfinite(raw).all():
        return np.asarray(normalised), "SD"
    x = resample(raw, fs_in, fs)
    if len(x) != len(normalised):
        return np.asarray(normalised), "SD"
    return (x - np.median(x)).astype(np.float32), "mV"
