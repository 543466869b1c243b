"""The audio-classification task plugin: config, data, model (front end + backbone), step, metrics, report,
predict."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.engine.config import ConfigError, TrainConfig
from cnnapps.tasks.audio.data import (AudioReadError, ClipDataset, SplitLists, build_clip_datasets, fix_length,
                                      iter_audio_blocks, limit_per_class, list_any, list_class_folders, list_fsdd,
                                      split_fsdd_speaker, split_fsdd_usual, split_stratified)
from cnnapps.tasks.audio.explain import AudioExplain
from cnnapps.tasks.audio.features import AudioFrontEnd, fit_normalisation
from cnnapps.tasks.audio.metrics import AudioMetrics
from cnnapps.engine.task import DataSplits, Task, TaskConfig

log = logging.getLogger(__name__)

INPUTS = ("spectrogram", "waveform")


# ---------------------------------------------------------------- config


@dataclass
class AudioDataConfig:
    """``[data]``: which files, how they are split, and how clips are cut."""

    dataset: str = "fsdd"  # fsdd | folder (<class>/*.wav)
    path: str = "fsdd"  # relative to the data root, or absolute
    split: str = "usual"  # fsdd: usual | speaker; folder: always a seeded stratified split
    test_speakers: list[str] = field(default_factory=lambda: ["theo"])  # split = "speaker"
    val_speakers: list[str] = field(default_factory=list)  # split = "speaker"; empty: val_indices of the others
    val_indices: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])  # fsdd: recordings used for validation
    val_fraction: float = 0.1  # folder
    test_fraction: float = 0.2  # folder
    max_per_class: int = 0  # keep at most N files per class in each split (CI); 0: all
    seed: int = 0  # folder split and max_per_class choice
    sample_rate: int = 8000  # every file is resampled to this rate
    clip_seconds: float = 1.0  # fixed input length: pad or crop (centred at evaluation)
    time_shift: float = 0.15  # training: random placement within +-this many seconds of the centre


@dataclass
class AudioModelConfig:
    """``[model]``: the on-device front end, its augmentation, and the backbone."""

    input: str = "spectrogram"  # spectrogram (2D backbone) | waveform (1D backbone)
    backbone: str = "resnet18"
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the backbone
    features: str = "logmel"  # logmel | mfcc (input = spectrogram)
    n_fft: int = 256
    hop_length: int = 128
    n_mels: int = 64
    n_mfcc: int = 40
    f_min: float = 20.0
    f_max: float = 0.0  # 0: sample_rate / 2
    top_db: float = 80.0
    peak_normalize: bool = True  # scale each clip to peak 1 (FSDD speakers differ by 20 dB in level)
    gain_db: float = 6.0  # training: random gain in +-gain_db
    noise_prob: float = 0.3  # training: share of clips that get white noise
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 40.0])  # SNR range of that noise
    freq_mask: int = 8  # SpecAugment: widest frequency mask (bins); 0: off
    time_mask: int = 8  # SpecAugment: widest time mask (frames); 0: off
    num_freq_masks: int = 2
    num_time_masks: int = 2
    mixup_alpha: float = 0.0  # mixup of waveforms and targets in training, Beta(alpha, alpha); 0: off


@dataclass
class AudioConfig(TaskConfig):
    """The audio task's config. The defaults are FSDD spoken digits, usual split (recordings 0-4 of every
    speaker and digit = test, 5-9 = validation, 10-49 = train): ResNet-18 on 64-bin log-mel images of 1-s clips
    (64 x 63) with SpecAugment, gain and noise; goal >= 98% test accuracy within 10 minutes of CPU training."""

    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    model: AudioModelConfig = field(default_factory=AudioModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=8, batch_size=64, optimizer="adamw", lr=0.002, weight_decay=0.01, schedule="onecycle",
        label_smoothing=0.05, threads=2))


# ---------------------------------------------------------------- model


class AudioModel(nn.Module):
    """Waveforms (batch, samples) -> logits (batch, classes).

    ``frontend`` (AudioFrontEnd: features, fitted normalisation, augmentation in training) feeds ``backbone``, a
    zoo network whose own classifier is the head: 2D on (batch, 1, bins, frames) or 1D on (batch, 1, samples)."""

    def __init__(self, frontend: AudioFrontEnd, backbone: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.backbone = backbone

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # Features in float32 even under autocast: dB values of a bf16 power spectrum lose the quiet bins.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            x = self.frontend(wave.float())
        return self.backbone(x)


def make_frontend(m: AudioModelConfig, sample_rate: int) -> AudioFrontEnd:
    """The front end a config describes (normalisation buffers still at 0 mean / 1 std)."""
    if m.input not in INPUTS:
        raise ConfigError(f"model.input: unknown {m.input!r}; choose one of {', '.join(INPUTS)}")
    if m.input == "spectrogram" and m.features not in ("logmel", "mfcc"):
        raise ConfigError(f"model.features: unknown {m.features!r}; choose logmel or mfcc")
    if len(m.noise_snr_db) != 2:
        raise ConfigError(f"model.noise_snr_db: expected [low, high], got {m.noise_snr_db}")
    kind = "waveform" if m.input == "waveform" else m.features
    return AudioFrontEnd(sample_rate=sample_rate, kind=kind, n_fft=m.n_fft, hop_length=m.hop_length,
                         n_mels=m.n_mels, n_mfcc=m.n_mfcc, f_min=m.f_min, f_max=m.f_max, top_db=m.top_db,
                         peak_normalize=m.peak_normalize, gain_db=m.gain_db, noise_prob=m.noise_prob,
                         noise_snr_db=(m.noise_snr_db[0], m.noise_snr_db[1]), freq_mask=m.freq_mask,
                         time_mask=m.time_mask, num_freq_masks=m.num_freq_masks, num_time_masks=m.num_time_masks)


def _resolve(data_root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_root / p


def _split_lists(cfg: AudioConfig, data_root: Path, skipped: Counter) -> SplitLists:
    d = cfg.data
    folder = _resolve(data_root, d.path)
    if d.dataset == "fsdd":
        entries = list_fsdd(folder, skipped)
        if d.split == "usual":
            return split_fsdd_usual(entries, d.val_indices)
        if d.split == "speaker":
            try:
                return split_fsdd_speaker(entries, d.test_speakers, d.val_speakers, d.val_indices)
            except ValueError as exc:
                raise ConfigError(f"{folder}: {exc}") from None
        raise ConfigError(f"data.split: unknown {d.split!r} for fsdd (usual, speaker)")
    if d.dataset == "folder":
        try:
            return split_stratified(list_class_folders(folder), d.val_fraction, d.test_fraction, d.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    raise ConfigError(f"data.dataset: unknown {d.dataset!r} (fsdd, folder)")


def _fit_stats(frontend: AudioFrontEnd, train: ClipDataset, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin feature statistics of the training clips, centred as at evaluation (no augmentation)."""
    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(train), batch):
            rows = train.rows[start:start + batch]
            yield torch.from_numpy(np.stack([fix_length(train.decoded.signal(int(r)), train.clip_samples)
                                             for r in rows]))
    with torch.inference_mode():
        return fit_normalisation(frontend, batches())


# ---------------------------------------------------------------- the task


class AudioTask(AudioExplain, Task):  # explain hooks: tasks/audio/explain.py
    """Sound classification on log-mel/MFCC images with 2D CNNs or on raw waveforms with 1D CNNs.

    Batches are ``{"wave": (batch, samples) float32, "y": (batch,) int64, "index": (batch,), "file": [str]}``."""

    name = "audio"
    Config = AudioConfig
    monitor = "accuracy"

    def build_data(self, cfg: AudioConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        data_root = Path(data_root)
        d = cfg.data
        sample_rate = int(state["sample_rate"]) if state else d.sample_rate
        clip = int(state["clip_samples"]) if state else int(round(d.clip_seconds * sample_rate))
        if sample_rate <= 0 or clip <= 0:
            raise ConfigError(f"data.sample_rate ({sample_rate}) and data.clip_seconds ({d.clip_seconds}) must be "
                              f"positive")
        classes = [str(c) for c in state["classes"]] if state else None
        skipped: Counter = Counter()
        if split == "all":  # every file of the folder, FSDD-named or <class>/*.wav
            lists = SplitLists(test=list_any(data_root, skipped))
        else:
            lists = _split_lists(cfg, data_root, skipped)
            if d.max_per_class:
                lists = SplitLists(*(limit_per_class(x, d.max_per_class, d.seed + i)
                                     for i, x in enumerate((lists.train, lists.val, lists.test))))
        # With a state we serve a finished model (evaluate): every split, train included, is cut as at evaluation.
        built = build_clip_datasets(lists, classes, sample_rate, clip, int(round(d.time_shift * sample_rate)),
                                    skipped, random_train_crops=state is None)
        if split != "all" and (built.train is None or len(built.train) == 0):
            raise ConfigError(f"{_resolve(data_root, d.path)}: no usable training files for this split")

        frontend = make_frontend(cfg.model, sample_rate)
        if state and "norm_mean" in state:
            mean, std = torch.as_tensor(state["norm_mean"]), torch.as_tensor(state["norm_std"])
        elif built.train is not None:
            mean, std = _fit_stats(frontend, built.train)
        else:
            raise ConfigError("build_data needs a training split or a state with fitted normalisation")
        new_state = {
            "classes": built.classes, "sample_rate": sample_rate, "clip_samples": clip,
            "input": cfg.model.input, "features": frontend.kind,
            "feature_params": {"n_fft": cfg.model.n_fft, "hop_length": cfg.model.hop_length,
                               "n_mels": cfg.model.n_mels, "n_mfcc": cfg.model.n_mfcc},
            "norm_mean": [float(v) for v in mean], "norm_std": [float(v) for v in std],
            "speakers": built.speakers,
        }
        counts = {k: len(v) if v is not None else 0 for k, v in (("train", built.train), ("val", built.val),
                                                                  ("test", built.test))}
        log.info("audio data: %s (%s), train %d / val %d / test %d files, %d classes, %d Hz, clip %d samples",
                 d.dataset if split != "all" else data_root, d.split if split != "all" else "all",
                 counts["train"], counts["val"], counts["test"], len(built.classes), sample_rate, clip)
        return DataSplits(train=built.train, val=built.val, test=built.test, state=new_state,
                          skipped=built.skipped)

    def build_model(self, cfg: AudioConfig, data: DataSplits) -> AudioModel:
        from cnnapps.backbones import backbone_info, create_backbone

        state = data.state
        m = cfg.model
        frontend = make_frontend(m, int(state["sample_rate"]))
        if frontend.bins:
            frontend.set_normalisation(torch.as_tensor(state["norm_mean"]), torch.as_tensor(state["norm_std"]))
        try:
            info = backbone_info(m.backbone)
        except KeyError as exc:
            raise ConfigError(f"model.backbone: {exc.args[0]}") from None
        want = 1 if m.input == "waveform" else 2
        if info.dim != want:
            raise ConfigError(f"model.backbone {m.backbone!r} is {info.dim}D but model.input = {m.input!r} needs a "
                              f"{want}D backbone")
        shape = frontend.output_shape(int(state["clip_samples"]))
        if info.min_input is not None and any(have < need for have, need in zip(shape[1:], info.min_input[1:])):
            raise ConfigError(f"model.backbone {m.backbone!r} needs inputs of at least "
                              f"{'x'.join(map(str, info.min_input[1:]))}; the front end gives "
                              f"{'x'.join(map(str, shape[1:]))} (raise model.n_mels or data.clip_seconds, or lower "
                              f"model.hop_length)")
        backbone = create_backbone(m.backbone, num_classes=len(state["classes"]), in_chans=1, **m.kwargs)
        return AudioModel(frontend, backbone)

    def step(self, model: nn.Module, batch: Any, cfg: AudioConfig) -> dict[str, Any]:
        wave, y = batch["wave"], batch["y"]
        smoothing = cfg.train.label_smoothing
        alpha = cfg.model.mixup_alpha
        targets = [(y, 1.0)]
        if model.training and alpha > 0:
            # Mixup (Zhang et al. 2018) on waveforms: the front end then sees the mixed sound.
            lam = float(np.random.beta(alpha, alpha))
            perm = torch.randperm(wave.shape[0], device=wave.device)
            wave = lam * wave + (1 - lam) * wave[perm]
            targets = [(y, lam), (y[perm], 1 - lam)]
        out = model(wave)
        # GoogLeNet with aux_logits returns (logits, aux1, aux2) in training; the paper weights the aux losses 0.3.
        logits, aux = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        loss = sum(w * F.cross_entropy(logits, t, label_smoothing=smoothing) for t, w in targets)
        for a in aux:
            loss = loss + 0.3 * sum(w * F.cross_entropy(a, t, label_smoothing=smoothing) for t, w in targets)
        return {"loss": loss, "output": logits}

    def metrics(self, cfg: AudioConfig, data: DataSplits) -> AudioMetrics:
        return AudioMetrics(data.state["classes"])

    def report(self, run_dir: Path, metric: AudioMetrics, data: DataSplits) -> dict[str, str]:
        from cnnapps.engine.plots import plot_confusion
        from cnnapps.tasks.audio.plots import plot_examples

        run_dir = Path(run_dir)
        art = metric.artifacts()
        out = {}
        if len(art["confusion"]):
            plot_confusion(art["confusion"], art["class_names"], run_dir / "confusion.png", "test confusion matrix")
            out["confusion matrix"] = "confusion.png"
        fp = data.state.get("feature_params", {})
        if plot_examples(art.get("examples", []), run_dir / "examples.png", int(data.state["sample_rate"]),
                         n_fft=int(fp.get("n_fft", 256)), hop_length=int(fp.get("hop_length", 128)),
                         n_mels=int(fp.get("n_mels", 64)), title="example test clips (log-mel, dB)"):
            out["example spectrograms"] = "examples.png"
        return out

    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=0,
                            help="clips per forward pass for long files (default: the config's eval batch size)")
        parser.add_argument("--top-k", type=int, default=3, help="classes listed in 'top'")

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: AudioConfig,
                device: torch.device, batch_size: int = 0, top_k: int = 3, **kw: Any) -> Iterator[dict]:
        """One dict per file: ``{"file", "label", "probability", "top": [[label, p], ...], "clips", "seconds"}``
        (plus ``"warning"`` for a silent file), or ``{"file", "error"}`` for a file that cannot be read; the
        other files go on.

        A file up to the clip length is centred and padded, as in evaluation. A longer file is read block by
        block and cut into consecutive clip-length windows, the last one aligned to the file's end (so it
        overlaps its neighbour unless the length is a multiple of the clip); the windows run through the model
        in mini-batches of at most ``batch_size`` and the file's probabilities are the mean of theirs (suited
        to a file holding one kind of sound; a recording of several words gets a blend)."""
        bs = batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
        if bs < 1:
            raise ValueError(f"predict batch size must be positive, got {bs}")
        names = [str(c) for c in state["classes"]]
        model.eval()
        for path in inputs:
            try:
                prob, clips, samples, peak = _predict_file(model, Path(path), int(state["sample_rate"]),
                                                           int(state["clip_samples"]), bs, device)
            except AudioReadError as exc:
                log.warning("%s", exc)
                yield {"file": str(path), "error": str(exc)}
                continue
            top = prob.topk(min(max(top_k, 1), len(names)))
            row = {"file": str(path), "label": names[int(top.indices[0])],
                   "probability": round(float(top.values[0]), 4),
                   "top": [[names[int(i)], round(float(p), 4)] for p, i in zip(top.values, top.indices)],
                   "clips": clips, "seconds": round(samples / int(state["sample_rate"]), 3)}
            if peak == 0:
                row["warning"] = "silent: every sample is zero, the prediction is meaningless"
            yield row


    def bench_extra(self, cfg: AudioConfig, data_root: Path) -> dict[str, float]:
        """Spectrograms per second of the front end on the CPU (batches of 64 clips of the config's length)."""
        from cnnapps.tasks.audio.bench import frontend_throughput

        clip = int(round(cfg.data.clip_seconds * cfg.data.sample_rate))
        fe = frontend_throughput(make_frontend(cfg.model, cfg.data.sample_rate), clip)
        return {"frontend_spectrograms_per_s": round(float(fe["spectrograms_per_s"]), 1),
                "frontend_threads": fe["threads"],
                "frontend": f"{fe['features']} {fe['output_shape']} per clip, batch {fe['batch_size']}"}

    def speed_measurements(self, data_root: Path | None) -> dict[str, Any]:
        """The front end's spectrograms/s with the default config (no data needed)."""
        return self.bench_extra(self.Config(), data_root or Path("."))


@torch.inference_mode()
def _predict_file(model: nn.Module, path: Path, sample_rate: int, clip: int, batch_size: int,
                  device: torch.device) -> tuple[torch.Tensor, int, int, float]:
    """Mean class probabilities (classes,) over a file's windows, the number of windows, the file's length in
    samples at ``sample_rate`` and its peak |sample|; see ``AudioTask.predict`` for the windowing."""
    prob_sum: torch.Tensor | None = None
    windows: list[np.ndarray] = []
    n_windows = 0

    def flush() -> None:
        nonlocal prob_sum, n_windows
        if not windows:
            return
        logits = model(torch.from_numpy(np.stack(windows)).to(device))
        p = logits.float().softmax(1).sum(0).cpu()
        prob_sum = p if prob_sum is None else prob_sum + p
        n_windows += len(windows)
        windows.clear()

    pending = np.zeros(0, dtype=np.float32)  # samples not yet in a window
    last = np.zeros(0, dtype=np.float32)  # the file's latest `clip` samples, for the end-aligned window
    total, peak = 0, 0.0
    for block in iter_audio_blocks(path, sample_rate, batch_size * clip):
        total += len(block)
        peak = max(peak, float(np.abs(block).max()))
        pending = np.concatenate([pending, block])
        last = np.concatenate([last, block])[-clip:]
        full = len(pending) // clip
        for i in range(full):
            windows.append(pending[i * clip:(i + 1) * clip])
            if len(windows) == batch_size:
                flush()
        pending = pending[full * clip:].copy()
    if len(pending):
        windows.append(last if total > clip else fix_length(pending, clip))
    flush()
    if prob_sum is None:  # iter_audio_blocks raises for an empty file; this guards a future change there
        raise AudioReadError(f"{path}: no audio to classify")
    return prob_sum / n_windows, n_windows, total, peak
