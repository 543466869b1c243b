"""What a task hands to ``cnnapps explain``, ``visualize`` and ``understand-report``: the types of the explain hooks
of ``cnnapps.engine.task.Task`` and a few helpers for writing them.

This module is the floor of ``cnnapps.understand``: it imports no task and nothing else of the package, so a task
(built-in or third-party) imports it to implement its hooks without an import cycle. A task that implements
``explain_view`` and ``explain_input`` can be explained; ``explain_examples`` adds ``visualize --what topk`` and
``explain_samples`` a place in ``understand-report``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# What the input is: it picks the pictures, the occlusion window and the report's probes.
# image: (C, H, W) pictures; biosignal: (leads, T) physiological records (ECG, EEG, ...), shown as strips;
# spectrogram: (1, bins, frames) time-frequency maps; waveform: (1, T) sound as samples.
KINDS = ("image", "biosignal", "spectrogram", "waveform")


@dataclass
class LoadedInput:
    """One input ready for attribution.

    ``x``: what ``ExplainView.model`` takes, (1, C, H, W) or (1, C, T), on the CPU. ``display``: what a picture
    shows, indexed like ``x``'s spatial axes: an (H, W, 3) image in [0, 1], a signal (T,) or several (T, C), or a
    spectrogram (bins, frames). ``fs``: samples per second along time (signals) or frames per second
    (spectrograms). ``valid``: the samples of ``x`` along time that are data, not padding added to complete the
    model's last output step (None: all). ``info``: task facts written into the explain row (``channels``: the
    names of the signals read, e.g. ECG leads; ``start_s``; ...).
    """

    path: str
    x: torch.Tensor
    display: np.ndarray
    fs: float | None = None
    valid: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExplainView:
    """A task model as attribution sees it.

    ``model`` maps ``x`` (B, C, *L) to logits (B, K), or to one row of logits per output step (B, K, T') when
    ``output_step`` is set (input samples per step; inputs are then padded to whole steps). ``backbone`` is the
    zoo network inside ``model`` (its stages and first conv are what ``visualize`` draws). ``kind``: one of
    KINDS. ``input_shape``: one example of x without the batch axis, as the model was trained on. ``fs``: samples
    (or spectrogram frames) per second. ``frontend``: a module run before ``model`` (audio: waveform -> features).
    ``mean``/``std``: images only, the normalisation ``x = (x01 - mean) / std`` of [0, 1] pixels (per channel).
    ``channel_names``: the signals of a biosignal (leads). ``about``: a few words on the network for captions
    (e.g. its backbone's name). ``extra``: whatever the task's own ``explain_input`` needs (its preprocessing
    parameters); nothing outside the task reads it.
    """

    task: str
    kind: str
    model: nn.Module
    backbone: nn.Module
    class_names: list[str]
    state: dict
    cfg: Any
    input_shape: tuple[int, ...]
    fs: float | None = None
    frontend: nn.Module | None = None
    output_step: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    channel_names: list[str] = field(default_factory=list)
    about: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.task!r}: explain view kind {self.kind!r} is not one of {', '.join(KINDS)}")
        self.input_shape = tuple(int(n) for n in self.input_shape)

    @property
    def one_d(self) -> bool:
        """True for models of (C, T) inputs (signals), False for (C, H, W) ones (images, spectrograms)."""
        return len(self.input_shape) == 2


@dataclass
class ExplainSamples:
    """A few input files of a task's own data for ``understand-report``.

    ``inputs``: paths that ``explain_input`` reads (pictures and command timings use the first ones); ``about``:
    what they are, for captions (e.g. "MNIST test digits"); ``captions``: optionally one per input (e.g. "CinC
    2017, label A"); ``smoke``: config overrides (``key=value``) that, beside one epoch of five steps, make the
    task's ci config a run of seconds for ``understand-report --quick`` (e.g. a smaller subset of the data).
    """

    inputs: list[str]
    about: str = ""
    captions: list[str] = field(default_factory=list)
    smoke: list[str] = field(default_factory=list)


def split_dataset(view: ExplainView, data: Any, split: str) -> Any:
    """The ``split`` ("train", "val" or "test") dataset of a task's ``DataSplits``; ValueError when there is none."""
    dataset = getattr(data, split, None) if split in ("train", "val", "test") else None
    if dataset is None:
        raise ValueError(f"task {view.task!r} has no {split!r} split here")
    return dataset


def pad_to_steps(signal: np.ndarray, step: int) -> np.ndarray:
    """A signal (C, T) zero-padded at the end to a whole number of ``step``-sample steps: (C, ceil(T/step)*step),
    float32 (a model with per-step outputs needs whole steps)."""
    signal = np.asarray(signal, dtype=np.float32)
    padded = np.zeros((signal.shape[0], -(-signal.shape[1] // step) * step), dtype=np.float32)
    padded[:, :signal.shape[1]] = signal
    return padded


def image_display(x01: torch.Tensor) -> np.ndarray:
    """One image (C, H, W) in [0, 1] as an (H, W, 3) picture: grey repeated, channels past three dropped."""
    shown = x01.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown[..., :3]
