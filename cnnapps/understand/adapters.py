"""Task checkpoints seen as tensor-in, logits-out models: input loading with each task's own preprocessing."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("image", "ecg", "spectrogram", "waveform")


@dataclass
class LoadedInput:
    """One input ready for attribution.

    ``x``: what ``ExplainView.model`` takes, (1, C, H, W) or (1, C, T). ``display``: what a picture shows, in
    ``x``'s spatial coordinates: an (H, W, 3) image in [0, 1], an ECG/waveform (T,), or a spectrogram
    (bins, frames). ``fs``: samples per second along time (ECG, waveform) or frames per second (spectrogram).
    """

    path: str
    x: torch.Tensor
    display: np.ndarray
    fs: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExplainView:
    """A task model as attribution sees it: ``model`` maps ``x`` (B, C, *L) to logits (B, K) or (B, K, T');
    ``backbone`` is the zoo network inside it (stages, first conv); ``kind`` one of KINDS."""

    task: str
    kind: str
    model: nn.Module
    backbone: nn.Module
    class_names: list[str]
    state: dict
    cfg: Any
    input_shape: tuple[int, ...]  # one example of x without the batch axis, as the model was trained on
    fs: float | None = None
    frontend: nn.Module | None = None  # audio: waveform (B, samples) -> x, run before ``model``


class _Backbone(nn.Module):
    """The audio model without its front end: normalised features (B, 1, bins, frames) or (B, 1, T) -> logits."""

    def __init__(self, audio_model: nn.Module) -> None:
        super().__init__()
        self.backbone = audio_model.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def load_view(checkpoint: str | Path, device: torch.device | str = "cpu") -> ExplainView:
    """Rebuild the model of a task checkpoint (whichever task wrote it) as an ``ExplainView``, in eval mode."""
    from cnnapps.engine.checkpoint import load_checkpoint
    from cnnapps.engine.trainer import model_from_checkpoint
    from cnnapps.tasks import get_task

    task_name = load_checkpoint(checkpoint).get("task")
    if not task_name:
        raise ValueError(f"{checkpoint}: the checkpoint does not say which task wrote it")
    task = get_task(task_name)
    model, cfg, state = model_from_checkpoint(task, checkpoint, device)
    model.eval()
    if task_name == "classify":
        size, chans = int(state["image_size"]), int(state["in_chans"])
        return ExplainView(task_name, "image", model, model, list(state["class_names"]), state, cfg,
                           (chans, size, size))
    if task_name == "ecg":
        window = int(state.get("window") or 2048)
        return ExplainView(task_name, "ecg", model, model.backbone, list(state["classes"]), state, cfg,
                           (int(state.get("in_chans", 1)), window), fs=float(state["fs"]))
    if task_name == "audio":
        frontend = model.frontend
        shape = tuple(frontend.output_shape(int(state["clip_samples"])))
        kind = "waveform" if frontend.kind == "waveform" else "spectrogram"
        fs = float(state["sample_rate"]) if kind == "waveform" else float(state["sample_rate"]) / frontend.hop_length
        return ExplainView(task_name, kind, _Backbone(model).eval(), model.backbone, list(state["classes"]), state,
                           cfg, shape, fs=fs, frontend=frontend)
    raise ValueError(f"task {task_name!r} has no explain adapter yet (known: classify, ecg, audio); it needs a way "
                     "to turn an input file into the model's input tensor")


# ---------------------------------------------------------------- reading inputs


def load_input(view: ExplainView, path: str | Path, *, start_s: float = 0.0, max_seconds: float = 30.0,
               lead: str | None = None) -> LoadedInput:
    """Read ``path`` with the task's own preprocessing. ECG records are cut to ``max_seconds`` from ``start_s``
    (attribution over a half-hour record would take minutes); audio files are centred and cut to the training
    clip, as in evaluation. Raises ValueError naming the file when it cannot be read."""
    if view.kind == "image":
        return _load_image(view, Path(path))
    if view.kind == "ecg":
        return _load_ecg(view, str(path), start_s, max_seconds, lead)
    return _load_audio(view, Path(path))


def _load_image(view: ExplainView, path: Path) -> LoadedInput:
    from cnnapps.tasks.classify.data import _read_image_file, fit_to_size, to_float_chw

    s = view.state
    size, chans = int(s["image_size"]), int(s["in_chans"])
    img = _read_image_file(path, 0)  # raises ValueError naming the file
    x01 = fit_to_size(to_float_chw(img[None], chans), size)  # (1, C, S, S) in [0, 1]
    mean = torch.as_tensor(s["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(s["std"], dtype=torch.float32).view(1, -1, 1, 1)
    shown = x01[0].permute(1, 2, 0).numpy()
    shown = np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown[..., :3]
    return LoadedInput(str(path), (x01 - mean) / std, np.clip(shown, 0, 1))


def _load_ecg(view: ExplainView, path: str, start_s: float, max_seconds: float, lead: str | None) -> LoadedInput:
    from cnnapps.tasks.ecg.prepare import RecordSkip, prepare_signal, read_lead
    from cnnapps.tasks.ecg.task import _lead_in_record, _params

    s = view.state
    record = str(Path(path).with_suffix("")) if Path(path).suffix in (".hea", ".dat", ".mat") else path
    try:
        wanted = lead if lead else _lead_in_record(record, s.get("lead", ""))
        raw, fs_in, lead_name = read_lead(Path(record), wanted)
        x, _ = prepare_signal(raw, fs_in, _params(s), record)
    except RecordSkip as exc:
        raise ValueError(f"{path}: {exc.reason}: {exc}") from None
    fs, step = int(s["fs"]), int(s["step"])
    a = int(round(start_s * fs))
    b = len(x) if max_seconds <= 0 else min(len(x), a + int(round(max_seconds * fs)))
    if a >= b:
        raise ValueError(f"{path}: --start {start_s} s is past the record's end ({len(x) / fs:.1f} s)")
    piece = x[a:b]
    padded = np.zeros(-(-len(piece) // step) * step, dtype=np.float32)  # the model needs whole steps
    padded[:len(piece)] = piece
    return LoadedInput(path, torch.from_numpy(padded)[None, None], padded, float(fs),
                       {"lead": lead_name, "start_s": start_s, "samples": len(piece), "fs_in": fs_in})


def _load_audio(view: ExplainView, path: Path) -> LoadedInput:
    from cnnapps.tasks.audio.data import AudioReadError, fix_length, read_audio

    s = view.state
    try:
        wave = read_audio(path, int(s["sample_rate"]))
    except AudioReadError as exc:
        raise ValueError(str(exc)) from None
    clip = torch.from_numpy(fix_length(wave, int(s["clip_samples"])))[None]
    return _audio_input(view, str(path), clip)


def _audio_input(view: ExplainView, path: str, wave: torch.Tensor) -> LoadedInput:
    """(1, samples) waveform -> the front end's output, in eval mode (no augmentation)."""
    frontend = view.frontend
    if frontend is None:
        raise ValueError(f"task {view.task!r} has no audio front end")
    with torch.no_grad():
        x = frontend.eval()(wave.float())
    if view.kind == "waveform":
        return LoadedInput(path, x, x[0, 0].numpy(), view.fs)
    return LoadedInput(path, x, frontend.features(frontend.prepare(wave.float()))[0, 0].numpy(), view.fs)


# ---------------------------------------------------------------- a task's data, example by example


def iter_examples(view: ExplainView, data_root: Path, split: str = "val",
                  max_examples: int = 512) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(index, x (1, C, *L) as ``view.model`` takes it, display array) for the examples of one split of the task's
    own data, rebuilt with the checkpoint's preprocessing; at most ``max_examples``."""
    from cnnapps.tasks import get_task

    task = get_task(view.task)
    data = task.build_data(view.cfg, Path(data_root), state=view.state)
    dataset = {"train": data.train, "val": data.val, "test": data.test}.get(split)
    if dataset is None:
        raise ValueError(f"task {view.task!r} has no {split!r} split here")
    mean = std = None
    if view.kind == "image":
        mean = torch.as_tensor(view.state["mean"]).view(-1, 1, 1)
        std = torch.as_tensor(view.state["std"]).view(-1, 1, 1)
    for i in range(min(len(dataset), max_examples)):
        item = dataset[i]
        if view.kind == "image":
            x = item[0][None]
            shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            yield i, x, (np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown[..., :3])
        elif view.kind == "ecg":
            sig = item["x"][0, : int(item["length"])].numpy()
            step = int(view.state["step"])
            padded = np.zeros(-(-len(sig) // step) * step, dtype=np.float32)
            padded[: len(sig)] = sig
            yield i, torch.from_numpy(padded)[None, None], padded
        else:
            loaded = _audio_input(view, str(item.get("file", i)), item["wave"][None])
            yield i, loaded.x, loaded.display
