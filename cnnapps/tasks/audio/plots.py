"""Audio report plots: log-mel spectrograms of example test clips titled with their true and predicted labels."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchaudio.transforms as TT  # noqa: E402

from cnnapps.engine.plots import save_figure  # noqa: E402


def log_mel_for_display(wave: np.ndarray, sample_rate: int, n_fft: int, hop_length: int,
                        n_mels: int) -> np.ndarray:
    """Peak-normalised log-mel power in dB of one clip (samples,) -> (n_mels, frames), for pictures only (the
    model's own features are standardised and may be MFCCs)."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    x = x / x.abs().max().clamp_min(1e-8)
    mel = TT.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)(x)
    return TT.AmplitudeToDB(stype="power", top_db=80.0)(mel).numpy()


def plot_examples(examples: Sequence[dict[str, Any]], out_png: Path, sample_rate: int, n_fft: int = 256,
                  hop_length: int = 128, n_mels: int = 64, title: str = "") -> Path | None:
    """A grid of example spectrograms. Each example is ``{"wave": (samples,), "true", "pred", "prob", "file"}``;
    wrong predictions get a red title. Returns the PNG's path, or None when there are no examples."""
    if not examples:
        return None
    cols = min(5, len(examples))
    rows = math.ceil(len(examples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    seconds = len(examples[0]["wave"]) / sample_rate
    for ax, ex in zip(axes.flat, examples):
        spec = log_mel_for_display(ex["wave"], sample_rate, n_fft, hop_length, n_mels)
        ax.axis("on")
        ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, n_mels))
        wrong = ex["true"] != ex["pred"]
        name = Path(ex.get("file", "")).name
        ax.set_title(f"true {ex['true']}  pred {ex['pred']} ({ex['prob']:.2f})\n{name}", fontsize=8,
                     color="tab:red" if wrong else "black")
        ax.set_xlabel("s", fontsize=7)
        ax.set_ylabel("mel bin", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png)


def _excerpt(path: str | Path, sample_rate: int, seconds: float) -> np.ndarray:
    """The first ``seconds`` of a file, mono at ``sample_rate`` (read block by block; the rest is not read)."""
    from cnnapps.tasks.audio.data import iter_audio_blocks

    want = int(round(seconds * sample_rate))
    parts, have = [], 0
    for block in iter_audio_blocks(path, sample_rate, min(want, 10 * sample_rate)):
        parts.append(block[:want - have])
        have += len(parts[-1])
        if have >= want:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def plot_timeline(path: str | Path, row: dict[str, Any], sample_rate: int, out_png: Path, max_seconds: float,
                  gate: Any, truth: Sequence[tuple[float, float, str]] | None = None, n_fft: int = 256,
                  hop_length: int = 80, n_mels: int = 64) -> Path:
    """A predict row drawn over its file: the log-mel spectrogram (dB) of the first ``max_seconds`` with each
    segment's span, label and confidence (grey: no digit), the true timeline above it when ``truth`` ((start_s,
    end_s, label) per event) is given, and below it the gate's level track and thresholds. Returns the PNG's
    path."""
    from cnnapps.tasks.audio.timeline import LevelTrack, gate_thresholds

    x = _excerpt(path, sample_rate, max_seconds)
    seconds = len(x) / sample_rate
    spec = log_mel_for_display(x, sample_rate, n_fft, hop_length, n_mels) if len(x) >= n_fft else \
        np.full((n_mels, 1), -80.0)
    frame = max(1, int(round(gate.frame_seconds * sample_rate)))
    n = len(x) // frame
    power = np.square(x[:n * frame], dtype=np.float64).reshape(n, frame).mean(1) if n else np.zeros(1)
    if len(power) >= 3:
        power = np.convolve(power, np.ones(3) / 3, mode="same")
    db = (10 * np.log10(power + 1e-12)).astype(np.float32)
    track = LevelTrack(db, frame, sample_rate, len(x), float(np.abs(x).max(initial=0)))
    thr = gate_thresholds(track, gate)
    hold = gate_thresholds(track, gate, gate.hold_margin_db)
    width = min(18.0, max(6.0, 0.6 * seconds + 2))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(width, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, n_mels))
    cmap = plt.get_cmap("tab10")
    for seg in row.get("segments", []):
        if seg["start_s"] >= seconds:
            break
        label = seg.get("label")
        colour = cmap(int(label) % 10) if label is not None and str(label).isdigit() else \
            cmap(hash(label) % 10) if label is not None else (0.6, 0.6, 0.6, 1.0)
        ax.axvspan(seg["start_s"], min(seg["end_s"], seconds), ymin=0.0, ymax=0.06, color=colour)
        ax.axvline(seg["start_s"], color=colour, lw=1.0, alpha=0.9)
        ax.text((seg["start_s"] + min(seg["end_s"], seconds)) / 2, n_mels * 0.9,
                f"{label if label is not None else '-'}\n{seg['confidence']:.2f}", color="white", ha="center",
                va="top", fontsize=9, fontweight="bold",
                bbox={"facecolor": colour, "alpha": 0.75, "pad": 1.5, "edgecolor": "none"})
    if truth:
        for start, end, label in truth:
            if start >= seconds:
                break
            ax.plot([start, min(end, seconds)], [n_mels * 0.99] * 2, color="white", lw=3, solid_capstyle="butt")
            ax.text(start, n_mels * 1.005, f"true {label}", color="black", fontsize=7, va="bottom", clip_on=False)
    shown = "".join(str(s) for s in row.get("sequence", []))
    total = row.get("seconds", seconds)
    more = f" (first {seconds:.0f} s of {total:.0f} s)" if total > seconds + 0.01 else ""
    want = f"  (true {''.join(t[2] for t in truth)})" if truth else ""
    ax.set_title(f"{Path(path).name}{more}: recognised {shown or '(none)'}{want}", fontsize=10, pad=14)
    ax.set_ylabel("mel bin")
    t = (np.arange(len(db)) + 0.5) * gate.frame_seconds
    ax2.plot(t, db, lw=0.8, color="black", label="frame level")
    ax2.plot(t, thr, lw=0.8, color="tab:red", label="gate: start")
    ax2.plot(t, hold, lw=0.8, color="tab:orange", ls="--", label="gate: hold")
    ax2.set_ylim(max(-100.0, float(np.min(db, initial=0)) - 5), 0)
    ax2.set_ylabel("dBFS")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="lower right", fontsize=7, ncol=3)
    ax2.set_xlim(0, max(seconds, 1e-3))
    return save_figure(fig, out_png)
