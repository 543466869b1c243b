"""The audio-classification task plugin: config, data, model (front end + backbone), step, metrics, report,
predict."""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.engine.config import ConfigError, TrainConfig, check_backbone, from_dict, option, to_dict
from cnnapps.tasks.audio.data import (AudioReadError, ClipDataset, SplitLists, build_clip_datasets, fix_length,
                                      iter_audio_blocks, limit_per_class, list_any, list_class_folders, list_fsdd,
                                      split_fsdd_speaker, split_fsdd_usual, split_stratified)
from cnnapps.tasks.audio.explain import AudioExplain
from cnnapps.tasks.audio.features import AudioFrontEnd, fit_normalisation
from cnnapps.tasks.audio.metrics import AudioMetrics
from cnnapps.tasks.audio.timeline import (GateSettings, level_track, no_speech_reason, predict_timeline,
                                          speech_regions)
from cnnapps.engine.task import DataSplits, Task, TaskConfig

log = logging.getLogger(__name__)

INPUTS = ("spectrogram", "waveform")
# What each ablation name switches off (model fields set to these values).
ABLATIONS: dict[str, dict[str, Any]] = {
    "speed": {"speed": 0.0}, "pitch": {"pitch": 0.0}, "filter": {"eq_db": 0.0}, "colour": {"noise_colour": "white"},
    "resample": {"resample_prob": 0.0}, "noise": {"noise_prob": 0.0}, "gain": {"gain_db": 0.0},
    "specaugment": {"freq_mask": 0, "time_mask": 0},
}


# ---------------------------------------------------------------- config


@dataclass
class AudioDataConfig:
    """``[data]``: which files, how they are split, and how clips are cut."""

    dataset: str = option("fsdd", help="fsdd (FSDD's {digit}_{speaker}_{index}.wav names) or folder "
                          "(<class>/*.wav, class = sub-folder name)", choices=("fsdd", "folder"))
    path: str = option("fsdd", help="the data folder: relative to the data root, or absolute")
    split: str = option("usual", help="fsdd: usual (recordings 0-4 of every speaker and digit are test) or speaker "
                        "(test_speakers held out); folder: always a seeded stratified split",
                        choices=("usual", "speaker"))
    test_speakers: list[str] = option(help="split = speaker: the speakers whose every recording is test",
                                      default_factory=lambda: ["theo"])
    val_speakers: list[str] = option(help="split = speaker: speakers kept for validation; empty: the val_indices "
                                     "recordings of the training speakers", default_factory=list)
    val_indices: list[int] = option(help="fsdd: recording indices used for validation (0-4 are test)",
                                    default_factory=lambda: [5, 6, 7, 8, 9], ge=0)
    val_fraction: float = option(0.1, help="folder: share of each class for validation", ge=0, lt=1)
    test_fraction: float = option(0.2, help="folder: share of each class for test", ge=0, lt=1)
    max_per_class: int = option(0, help="keep at most N files per class in each split (CI); 0: all", ge=0)
    seed: int = option(0, help="seed of the folder split and of the max_per_class choice")
    sample_rate: int = option(8000, help="every file is mixed to mono and resampled to this rate (Hz) before the "
                              "front end, in training and predict alike", gt=0)
    clip_seconds: float = option(1.0, help="the model's input length: shorter files are padded, longer ones "
                                 "cropped (centred at evaluation)", gt=0)
    time_shift: float = option(0.15, help="training: random placement within +- this many seconds of the centre",
                               ge=0)

    def check(self) -> None:
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"data.val_fraction ({self.val_fraction}) + data.test_fraction "
                              f"({self.test_fraction}) must be below 1")


@dataclass
class AudioModelConfig:
    """``[model]``: the on-device front end, its augmentation, and the backbone."""

    input: str = option("spectrogram", help="spectrogram (a 2D backbone on log-mel or MFCC images) or waveform "
                        "(a 1D backbone on samples)", choices=INPUTS)
    backbone: str = option("resnet18", help="zoo backbone name (2D for spectrogram, 1D for waveform)")
    kwargs: dict = option(help="extra keyword arguments of the backbone", default_factory=dict)
    features: str = option("logmel", help="input = spectrogram: logmel or mfcc", choices=("logmel", "mfcc"))
    n_fft: int = option(256, help="STFT size (samples)", ge=8)
    hop_length: int = option(128, help="STFT hop (samples); frames = 1 + samples // hop_length", ge=1)
    n_mels: int = option(64, help="mel bands", ge=1)
    n_mfcc: int = option(40, help="features = mfcc: coefficients kept (<= n_mels)", ge=1)
    f_min: float = option(20.0, help="lowest mel frequency (Hz)", ge=0)
    f_max: float = option(0.0, help="highest mel frequency (Hz); 0: sample_rate / 2", ge=0)
    top_db: float = option(80.0, help="dynamic range kept below each clip's loudest cell (dB)", gt=0)
    peak_normalize: bool = option(True, help="scale each clip to peak 1 (FSDD speakers differ by 20 dB in level)")
    gain_db: float = option(6.0, help="training: random gain in +- gain_db (dB); 0: off", ge=0)
    noise_prob: float = option(0.3, help="training: share of clips that get additive noise", ge=0, le=1)
    noise_snr_db: list[float] = option(help="[low, high] SNR range of that noise (dB)",
                                       default_factory=lambda: [10.0, 40.0])
    noise_colour: str = option("white", help="that noise: white, or coloured (power ~ 1/f**e, e uniform in 0..2: "
                               "white to brown, like hum and room noise)", choices=("white", "coloured"))
    speed: float = option(0.0, help="training: speed perturbation, each clip played at a rate uniform in 1 +- "
                          "speed (tempo and pitch together); 0: off", ge=0, lt=0.5)
    pitch: float = option(0.0, help="training: vocal-tract-length perturbation, each clip's frequency axis scaled "
                          "by a factor uniform in 1 +- pitch (pitch and formants, not tempo); 0: off", ge=0, lt=0.5)
    eq_db: float = option(0.0, help="training: random filtering (a smooth random gain curve over frequency of up "
                          "to +- eq_db dB, like other microphones and rooms); 0: off", ge=0)
    eq_prob: float = option(0.5, help="training: share of clips that get that filter", ge=0, le=1)
    resample_rates: list[int] = option(help="training: rates (Hz) a clip may be resampled through and back before "
                                       "the front end (a recording made or sent at that rate)",
                                       default_factory=list, gt=0)
    resample_prob: float = option(0.0, help="training: share of clips resampled through one of resample_rates",
                                  ge=0, le=1)
    freq_mask: int = option(8, help="SpecAugment: widest frequency mask (bins); 0: off", ge=0)
    time_mask: int = option(8, help="SpecAugment: widest time mask (frames); 0: off", ge=0)
    num_freq_masks: int = option(2, help="SpecAugment: frequency masks per clip", ge=0)
    num_time_masks: int = option(2, help="SpecAugment: time masks per clip", ge=0)
    mixup_alpha: float = option(0.0, help="mixup of waveforms and targets in training, Beta(alpha, alpha); 0: off",
                                ge=0)

    def check(self) -> None:
        check_backbone(self.backbone)  # the 1D/2D fit to model.input is checked with the data (build_model)
        if len(self.noise_snr_db) != 2 or self.noise_snr_db[0] > self.noise_snr_db[1]:
            raise ConfigError(f"model.noise_snr_db = {self.noise_snr_db}: expected [low, high] with low <= high")
        if self.input == "spectrogram" and self.features == "mfcc" and self.n_mfcc > self.n_mels:
            raise ConfigError(f"model.n_mfcc = {self.n_mfcc}: must be <= model.n_mels ({self.n_mels})")


@dataclass
class AudioPredictConfig:
    """``[predict]``: how ``predict`` turns a file longer than one clip into a timeline (see
    ``cnnapps.tasks.audio.timeline``), and the silence gate of every file. Read from the checkpoint's config;
    ``predict`` flags override the main ones."""

    frame_seconds: float = option(0.01, help="gate: frame length (s) of the level track", gt=0, le=0.1)
    gate_margin_db: float = option(12.0, help="gate: a stretch of sound starts where the level exceeds the "
                                   "background (the quietest level within background_seconds) by this many dB",
                                   ge=0)
    hold_margin_db: float = option(6.0, help="gate: and lasts while it exceeds the background by this many dB "
                                   "(files of one clip need only this)", ge=0)
    gate_floor_db: float = option(-70.0, help="gate: and exceeds this level (dB full scale): quieter is silence",
                                  le=0)
    background_seconds: float = option(3.0, help="gate: span (s) over which the background level is the minimum",
                                       gt=0)
    background_smooth_seconds: float = option(0.2, help="gate: the background is the minimum of the level averaged "
                                              "over this span (s), so brief dips inside words do not count", gt=0)
    min_gap_seconds: float = option(0.1, help="gate: active stretches closer than this (s) are joined (stop "
                                    "closures inside a word)", ge=0)
    min_speech_seconds: float = option(0.08, help="gate: active stretches shorter than this (s) are dropped "
                                       "(clicks)", ge=0)
    max_segment_seconds: float = option(1.0, help="gate: longer stretches are split at their quietest frame until "
                                        "every piece fits (s)", gt=0)
    pad_seconds: float = option(0.05, help="windows: a stretch's span reaches this far (s) on either side: kept "
                                "in its own windows, zeroed in its neighbours'", ge=0)
    context: str = option("background", help="windows: what surrounds a stretch in its windows: zeros (as the padding "
                          "of training clips) or background (the recording itself, other stretches zeroed)",
                          choices=("zeros", "background"))
    hop_seconds: float = option(0.05, help="windows: hop (s) between the window centres of a stretch (they lie "
                                "within +- data.time_shift of its centre)", gt=0)
    min_confidence: float = option(0.0, help="segments whose mean window probability is below this get no digit "
                                   "(label null, with the reason)", ge=0, le=1)
    batch_size: int = option(64, help="windows per forward pass (bounds memory with the reading block)", ge=1)
    picture_seconds: float = option(30.0, help="--draw: the picture shows at most the first this many seconds",
                                    gt=0)


@dataclass
class AudioBenchConfig:
    """``[bench]``: what ``bench`` measures besides the test split (written to results/audio.md)."""

    loso: bool = option(False, help="leave-one-speaker-out: one run per speaker of the data (data.split = "
                        "speaker with that speaker as test), reported as mean, minimum and spread of accuracy")
    loso_speakers: list[str] = option(help="loso: only these held-out speakers (a cheaper ablation, said in the "
                                      "record); empty: every speaker", default_factory=list)
    ablate: list[str] = option(help="loso: also rerun the folds once without each of these augmentations (an "
                               "ablation; runs named '<variant>/<speaker>')", default_factory=list,
                               choices=tuple(ABLATIONS))
    timeline: bool = option(True, help="score long recordings built from the test clips (event F1, sequence "
                            "accuracy, onset and offset errors) with the trained model")
    timeline_digits: int = option(10, help="timeline: test clips per recording (one speaker per recording)", ge=1)
    timeline_pauses: list[list[float]] = option(
        help="timeline: pause ranges [low, high] (s); one benchmark per range, each pause uniform in it",
        default_factory=lambda: [[0.3, 1.5], [0.05, 0.3]], ge=0)
    timeline_noise_db: float = option(0.0, help="timeline: level of the white-noise bed under each recording, in "
                                      "dB relative to its clips' own background (their quietest tenth)")
    timeline_seed: int = option(0, help="timeline: seed of clip order, pauses and noise")
    onset_tolerance: float = option(0.2, help="timeline: an event counts when its label matches and its onset is "
                                    "within this many seconds", gt=0)
    picture: str = option("", help="draw the first timeline recording with its segments into this file of the "
                          "results folder (e.g. audio_timeline.png); \"\": none")
    long_file_minutes: float = option(0.0, help="peak memory and seconds per audio hour of predict on a recording "
                                      "this long (built from test clips; measured in a fresh process); 0: off",
                                      ge=0)

    def check(self) -> None:
        for pair in self.timeline_pauses:
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(f"bench.timeline_pauses: {pair} is not a range [low, high] with low <= high")


@dataclass
class AudioConfig(TaskConfig):
    """The audio task's config. The defaults are FSDD spoken digits, usual split (recordings 0-4 of every
    speaker and digit = test, 5-9 = validation, 10-49 = train): ResNet-18 on 64-bin log-mel images of 1-s clips
    (64 x 63) with SpecAugment, gain and noise; goal >= 98% test accuracy within 10 minutes of CPU training."""

    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    model: AudioModelConfig = field(default_factory=AudioModelConfig)
    predict: AudioPredictConfig = field(default_factory=AudioPredictConfig)
    bench: AudioBenchConfig = field(default_factory=lambda: AudioBenchConfig(long_file_minutes=60.0,
                                                                             picture="audio_timeline.png"))
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
                         time_mask=m.time_mask, num_freq_masks=m.num_freq_masks, num_time_masks=m.num_time_masks,
                         speed=m.speed, pitch=m.pitch, eq_db=m.eq_db, eq_prob=m.eq_prob, noise_colour=m.noise_colour,
                         resample_rates=m.resample_rates, resample_prob=m.resample_prob)


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
                         n_mels=int(fp.get("n_mels", 64)),
                         title="one test clip per class, several speakers (log-mel, dB; red: misclassified)"):
            out["example spectrograms"] = "examples.png"
        return out

    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=0,
                            help="windows per forward pass (default: the checkpoint's predict.batch_size)")
        parser.add_argument("--top-k", type=int, default=3, help="classes listed in 'top'")
        parser.add_argument("--hop", type=float, default=None,
                            help="seconds between the windows of a stretch (default: predict.hop_seconds)")
        parser.add_argument("--gate-margin-db", type=float, default=None,
                            help="dB above the background that counts as sound (default: predict.gate_margin_db)")
        parser.add_argument("--min-confidence", type=float, default=None,
                            help="segments below this mean probability get no digit (default: "
                                 "predict.min_confidence)")
        parser.add_argument("--draw", action="store_true",
                            help="also draw each file's spectrogram with its segments into --out (default "
                                 "./predictions)")

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: AudioConfig,
                device: torch.device, batch_size: int = 0, top_k: int = 3, hop: float | None = None,
                gate_margin_db: float | None = None, min_confidence: float | None = None, draw: bool = False,
                out_dir: str | Path | None = None, **kw: Any) -> Iterator[dict]:
        """One JSON-ready dict per file (the project's predict schema: ``input``, ``picture`` when drawn,
        ``error`` for a file that cannot be read, and the task's fields); the other files go on.

        Every row: ``input``, ``seconds`` (length), ``mode`` (``clip`` or ``timeline``), ``sequence`` (the digits
        recognised, in order), ``segments`` ([{``start_s``, ``end_s``, ``label``, ``confidence``, ``top``,
        ``windows``}]), and ``reason`` when no digit was found (silence, or nothing above the gate).

        A file up to one clip long (``mode = "clip"``) is centred and padded exactly as in evaluation and also
        gets ``label`` (None when the gate finds no sound), ``probability`` and ``top`` [[label, p], ...]. A
        longer file (``mode = "timeline"``) is gated into stretches, each classified by windows, in bounded
        memory: see ``cnnapps.tasks.audio.timeline``."""
        p = cfg.predict
        bs = batch_size or p.batch_size
        if bs < 1:
            raise ValueError(f"predict batch size must be positive, got {bs}")
        g = gate_settings(cfg, hop=hop, gate_margin_db=gate_margin_db, min_confidence=min_confidence)
        names = [str(c) for c in state["classes"]]
        sr, clip = int(state["sample_rate"]), int(state["clip_samples"])
        model.eval()
        for path in inputs:
            row: dict[str, Any] = {"input": str(path)}
            try:
                track = level_track(path, sr, g.frame_seconds, max(clip, bs * clip))
                row["seconds"] = round(track.seconds, 3)
                if track.samples <= clip:
                    row["mode"] = "clip"
                    regions = speech_regions(track, g, single_threshold=True)
                    if not regions:
                        row.update(label=None, probability=None, top=[], sequence=[], segments=[],
                                   reason=no_speech_reason(track, g))
                    else:
                        prob = _predict_clip(model, Path(path), sr, clip, device)
                        top = prob.topk(min(max(top_k, 1), len(names)))
                        label, conf = names[int(top.indices[0])], round(float(top.values[0]), 4)
                        f = track.frame
                        ranked = [[names[int(i)], round(float(q), 4)] for q, i in zip(top.values, top.indices)]
                        row.update(label=label, probability=conf, top=ranked)
                        seg = {"start_s": round(regions[0][0] * f / sr, 3),
                               "end_s": round(min(regions[-1][1] * f, track.samples) / sr, 3),
                               "label": label, "confidence": conf, "top": row["top"], "windows": 1}
                        if conf < g.min_confidence:
                            row["label"] = seg["label"] = None
                            row["reason"] = seg["reason"] = (f"confidence {conf:.2f} below predict.min_confidence "
                                                             f"{g.min_confidence:g}")
                        row.update(sequence=[label] if row["label"] is not None else [], segments=[seg])
                else:
                    row["mode"] = "timeline"
                    timeline = predict_timeline(model, path, names, sr, clip, g, bs, device, top_k=top_k,
                                                track=track)
                    row["sequence"] = [s["label"] for s in timeline.segments if s["label"] is not None]
                    row["segments"] = timeline.segments
                    row["windows"] = timeline.windows
                    if not row["sequence"]:
                        row["reason"] = (no_speech_reason(track, g) if not timeline.segments else
                                         "no segment reached predict.min_confidence")
                if draw:
                    from cnnapps.data.images import picture_path
                    from cnnapps.tasks.audio.plots import plot_timeline

                    target = picture_path(out_dir, path, "_timeline", len(inputs) == 1)
                    row["picture"] = str(plot_timeline(path, row, sr, target, p.picture_seconds, g))
            except AudioReadError as exc:
                log.warning("%s", exc)
                yield {"input": str(path), "error": str(exc)}
                continue
            yield row

    def bench_extra(self, cfg: AudioConfig, data_root: Path) -> dict[str, float]:
        """Spectrograms per second of the front end on the CPU (batches of 64 clips of the config's length)."""
        from cnnapps.tasks.audio.bench import frontend_throughput

        clip = int(round(cfg.data.clip_seconds * cfg.data.sample_rate))
        fe = frontend_throughput(make_frontend(cfg.model, cfg.data.sample_rate), clip)
        return {"frontend_spectrograms_per_s": round(float(fe["spectrograms_per_s"]), 1),
                "frontend_threads": fe["threads"],
                "frontend": f"{fe['features']} {fe['output_shape']} per clip, batch {fe['batch_size']}"}

    def bench_runs(self, cfg: AudioConfig, data_root: Path) -> list[tuple[str, AudioConfig]]:
        """One run, or with ``bench.loso`` one per FSDD speaker of the data (or of ``bench.loso_speakers``): that
        speaker's 500 recordings are test, the others train (validation: recordings data.val_indices of the
        training speakers). With ``bench.ablate``, the folds are run once with everything and once more per
        named augmentation with it switched off. The folds skip the timeline benchmark (its recordings would hold
        the held-out speaker only)."""
        if not cfg.bench.loso:
            return [("", cfg)]
        if cfg.data.dataset != "fsdd":
            raise ConfigError("bench.loso needs data.dataset = 'fsdd' (speakers come from FSDD file names)")
        speakers = sorted({e.speaker for e in list_fsdd(_resolve(Path(data_root), cfg.data.path), Counter())})
        if cfg.bench.loso_speakers:
            unknown = sorted(set(cfg.bench.loso_speakers) - set(speakers))
            if unknown:
                raise ConfigError(f"bench.loso_speakers: unknown speaker(s) {', '.join(unknown)}; the data has "
                                  f"{', '.join(speakers)}")
            speakers = [s for s in speakers if s in cfg.bench.loso_speakers]
        if len(speakers) < 1 or (not cfg.bench.loso_speakers and len(speakers) < 2):
            raise ConfigError(f"bench.loso needs two or more speakers; the data has {', '.join(speakers)}")
        variants: list[tuple[str, dict[str, Any]]] = [("", {})]
        if cfg.bench.ablate:
            variants = [("all", {})] + [(f"no {a}", ABLATIONS[a]) for a in cfg.bench.ablate]
        runs = []
        for variant, model_off in variants:
            for speaker in speakers:
                d = to_dict(cfg)
                d["data"].update(split="speaker", test_speakers=[speaker], val_speakers=[])
                d["model"].update(model_off)
                d["bench"].update(loso=False, ablate=[], loso_speakers=[], timeline=False, long_file_minutes=0.0,
                                  picture="")
                runs.append((f"{variant}/{speaker}" if variant else speaker, from_dict(AudioConfig, d)))
        return runs

    def bench_report(self, cfg: AudioConfig, run_dir: Path, results_dir: Path, key: str,
                     data_root: Path | None = None) -> dict[str, Any]:
        """With the run's best checkpoint (nothing without ``data_root``): the timeline benchmark on recordings built from the test split's clips
        (one table row per pause range), a picture of the first recording (``bench.picture``), and peak memory
        and speed of predict on a ``bench.long_file_minutes`` recording against a one-minute one."""
        import tempfile

        from cnnapps.engine.trainer import model_from_checkpoint
        from cnnapps.tasks.audio.bench import (measure_long_predict, timeline_benchmark, write_long_recording)

        b = cfg.bench
        if data_root is None or not (b.timeline or b.long_file_minutes > 0):
            return {}
        checkpoint = Path(run_dir) / "checkpoints" / "best.pt"
        model, cfg_ck, state = model_from_checkpoint(self, checkpoint, "cpu")
        lists = _split_lists(cfg, Path(data_root), Counter())
        test = limit_per_class(lists.test, cfg.data.max_per_class, cfg.data.seed + 2) if cfg.data.max_per_class \
            else lists.test
        out: dict[str, Any] = {"extra": {}, "tables": []}
        with tempfile.TemporaryDirectory(prefix="cnnapps-audio-timeline-") as tmp:
            if b.timeline:
                columns = ["pauses (s)", "recordings", "digits", "audio (s)", "event F1", "precision", "recall",
                           "detection F1", "sequence accuracy", "exact sequences", "onset MAE (s)",
                           "offset MAE (s)", f"offsets within {b.onset_tolerance:g} s"]
                rows = []
                for k, (lo, hi) in enumerate(b.timeline_pauses):
                    scores, recs, preds = timeline_benchmark(self, model, state, cfg_ck, test, Path(tmp) / f"p{k}",
                                                             (lo, hi), b.timeline_digits, b.timeline_seed,
                                                             b.onset_tolerance, b.timeline_noise_db)
                    rows.append([f"{lo:g}-{hi:g}", scores["recordings"], scores["true_events"],
                                 scores["audio_seconds"], scores["event_f1"], scores["event_precision"],
                                 scores["event_recall"], scores["detection_f1"], scores["sequence_accuracy"],
                                 scores["exact_sequences"], scores["onset_mae_s"], scores["offset_mae_s"],
                                 scores["offset_within_tol"]])
                    if k == 0:
                        out["extra"]["timeline event F1"] = scores["event_f1"]
                        out["extra"]["timeline sequence accuracy"] = scores["sequence_accuracy"]
                        if b.picture and preds:
                            from cnnapps.tasks.audio.plots import plot_timeline

                            target = Path(results_dir) / b.picture
                            plot_timeline(preds[0]["input"], preds[0], int(state["sample_rate"]), target,
                                          cfg_ck.predict.picture_seconds, gate_settings(cfg_ck),
                                          truth=recs[0].truth)
                            out["extra"]["timeline picture"] = b.picture
                out["tables"].append({
                    "title": "timeline benchmark", "columns": columns, "rows": rows,
                    "note": (f"Long recordings made only of this run's test clips: {b.timeline_digits} clips of one "
                             f"speaker per recording in a seeded order (seed {b.timeline_seed}), seeded pauses "
                             f"uniform in the range, a white-noise bed at {b.timeline_noise_db:g} dB relative to "
                             f"the clips' own background under the whole recording; written as 16-bit WAVs and "
                             f"run through `predict`. An event is a segment whose label matches a clip's and whose "
                             f"onset is within {b.onset_tolerance:g} s of the clip's first sample (one-to-one); "
                             f"sequence accuracy = 1 - edit distance / digits.")})
            if b.long_file_minutes > 0:
                rows = []
                threads = cfg.train.threads if cfg.train.threads > 0 else 0
                for minutes in sorted({min(1.0, b.long_file_minutes), b.long_file_minutes}):
                    wav = Path(tmp) / f"long_{minutes:g}min.wav"
                    made = write_long_recording(test, int(state["sample_rate"]), minutes, wav, b.timeline_seed)
                    m = measure_long_predict(checkpoint, wav, threads, cfg_ck.predict.batch_size)
                    wav.unlink()
                    hours = made["seconds"] / 3600
                    rows.append([f"{minutes:g} min", made["digits"], round(made["bytes"] / 2 ** 20, 1),
                                 round(made["seconds"] * state["sample_rate"] * 4 / 2 ** 20, 1),
                                 m["segments"], m["windows"], round(m["rss_before"] / 2 ** 20, 1),
                                 round(m["rss_peak"] / 2 ** 20, 1),
                                 round((m["rss_peak"] - m["rss_before"]) / 2 ** 20, 1),
                                 round(m["seconds"], 2), round(m["seconds"] / hours, 1), m["threads"]])
                out["tables"].append({
                    "title": "long-file predict", "columns": ["file", "digits in it", "WAV (MiB)", "decoded at the model's rate (MiB)",
                                "segments", "windows", "RSS after loading (MiB)", "peak RSS in predict (MiB)",
                                "growth (MiB)", "predict (s)", "s per audio hour", "threads"],
                    "rows": rows,
                    "note": ("`predict` on one long 16-bit WAV built from test recordings (same pauses as the first "
                             "timeline row), in a fresh process on the CPU; the RSS is sampled every 5 ms. The "
                             "decoded-size column is what holding the whole signal would take (float32).")})
                last = rows[-1]
                out["extra"]["long-file peak RSS (MiB)"] = last[7]
                out["extra"]["long-file seconds per audio hour"] = last[10]
        return out

    def speed_measurements(self, data_root: Path | None) -> dict[str, Any]:
        """The front end's spectrograms/s with the default config (no data needed)."""
        return self.bench_extra(self.Config(), data_root or Path("."))


@torch.inference_mode()
def _predict_clip(model: nn.Module, path: Path, sample_rate: int, clip: int, device: torch.device) -> torch.Tensor:
    """Class probabilities (classes,) of a file at most one clip long, centred and padded as in evaluation."""
    x = np.concatenate(list(iter_audio_blocks(path, sample_rate, clip)))
    logits = model(torch.from_numpy(fix_length(x, clip))[None].to(device))
    return logits.float().softmax(1)[0].cpu()


def gate_settings(cfg: AudioConfig, hop: float | None = None, gate_margin_db: float | None = None,
                  min_confidence: float | None = None) -> GateSettings:
    """The timeline's settings from a config's ``[predict]`` and ``data.time_shift``, with optional overrides."""
    p = cfg.predict
    for name, value, ok in (("--hop", hop, lambda v: v > 0), ("--gate-margin-db", gate_margin_db, lambda v: v >= 0),
                            ("--min-confidence", min_confidence, lambda v: 0 <= v <= 1)):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{name} = {value}: out of range")
    return GateSettings(frame_seconds=p.frame_seconds,
                        gate_margin_db=p.gate_margin_db if gate_margin_db is None else gate_margin_db,
                        gate_floor_db=p.gate_floor_db, background_seconds=p.background_seconds,
                        background_smooth_seconds=p.background_smooth_seconds,
                        min_gap_seconds=p.min_gap_seconds, min_speech_seconds=p.min_speech_seconds,
                        max_segment_seconds=p.max_segment_seconds, pad_seconds=p.pad_seconds, context=p.context,
                        hold_margin_db=min(p.hold_margin_db, p.gate_margin_db if gate_margin_db is None
                                           else gate_margin_db),
                        hop_seconds=p.hop_seconds if hop is None else hop, max_shift_seconds=cfg.data.time_shift,
                        min_confidence=p.min_confidence if min_confidence is None else min_confidence)
