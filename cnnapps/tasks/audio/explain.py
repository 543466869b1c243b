"""The audio task's explain hooks (``cnnapps explain``, ``visualize``, ``understand-report``): the backbone after the
front end as the explained model, files read, centred and cut to the training clip as in evaluation."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnapps.tasks.audio.data import fix_length, read_audio
from cnnapps.understand.views import ExplainSamples, ExplainView, LoadedInput, split_dataset


class AudioExplain:
    """Mixed into the audio task: the explain hooks of ``cnnapps.engine.task.Task``. Attribution runs on the front
    end's output (normalised log-mel, MFCC or waveform), which ``explain_input`` computes in eval mode."""

    name: str

    def explain_view(self, model: nn.Module, cfg: Any, state: dict) -> ExplainView:
        frontend = model.frontend
        shape = tuple(frontend.output_shape(int(state["clip_samples"])))
        sr = float(state["sample_rate"])
        kind = "waveform" if frontend.kind == "waveform" else "spectrogram"
        return ExplainView(self.name, kind, model.backbone, model.backbone, list(state["classes"]), state, cfg,
                           shape, fs=sr if kind == "waveform" else sr / frontend.hop_length, frontend=frontend,
                           about=str(getattr(cfg.model, "backbone", "")))

    def explain_input(self, view: ExplainView, path: str, **options: Any) -> LoadedInput:
        """An audio file (any format soundfile reads) at the model's rate, centred and cut or padded to the
        training clip. ValueError (AudioReadError) naming the file when it cannot be decoded."""
        wave = read_audio(path, int(view.state["sample_rate"]))
        return _features(view, path, torch.from_numpy(fix_length(wave, int(view.state["clip_samples"])))[None])

    def explain_examples(self, view: ExplainView, data: Any, split: str, max_examples: int) -> Iterator[LoadedInput]:
        dataset = split_dataset(view, data, split)
        for i in range(min(len(dataset), max_examples)):
            item = dataset[i]
            yield _features(view, str(item.get("file", f"{split}[{i}]")), item["wave"][None])

    def explain_samples(self, data_root: Path, out_dir: Path) -> ExplainSamples:
        """Two FSDD recordings of different digits and speakers."""
        files = [Path(data_root) / "fsdd" / "recordings" / f for f in ("3_theo_0.wav", "7_jackson_1.wav")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"FSDD recordings not found: {', '.join(missing)}")
        return ExplainSamples([str(f) for f in files], "FSDD recordings", smoke=["data.max_per_class=4"])


def _features(view: ExplainView, path: str, wave: torch.Tensor) -> LoadedInput:
    """(1, samples) waveform -> the front end's output in eval mode (no augmentation) as ``x``; ``display``: the
    unnormalised features (bins, frames), or the normalised waveform (samples,)."""
    frontend = view.frontend.eval()
    device = next(iter(frontend.buffers()), torch.empty(0)).device
    wave = wave.float().to(device)
    with torch.no_grad():
        x = frontend(wave).cpu()
        if view.kind == "waveform":
            return LoadedInput(path, x, x[0, 0].numpy(), view.fs)
        return LoadedInput(path, x, frontend.features(frontend.prepare(wave))[0, 0].cpu().numpy(), view.fs)
