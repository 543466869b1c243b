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
    cols = min(4, len(examples))
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
