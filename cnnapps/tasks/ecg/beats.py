"""Beat classification the way the field measures it (de Chazal, O'Dwyer and Reilly 2004; ANSI/AAMI EC57): one
example per heartbeat, a window of the prepared signal centred on the beat's R-peak plus RR-interval features,
AAMI classes N, S, V, F (Q beats stay in the RR sequence but are never trained on or scored), and per-class
sensitivity (Se), positive predictivity (+P) and F1 over every beat.

R-peaks come from the reference annotations where a record has them (MIT-BIH ``.atr``), else from the QRS
detector (``cnnapps.tasks.ecg.qrs``). ``classify_beats`` is the whole chain for a signal without annotations:
detect R-peaks -> beat windows and RR features -> per-beat classes.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cnnapps.engine.config import ConfigError, option
from cnnapps.metrics.base import Metric
from cnnapps.tasks.ecg.prepare import BEAT_CLASSES, PreparedCache

log = logging.getLogger(__name__)

IGNORE = -100
SCORED = ("N", "S", "V", "F")  # AAMI classes trained and scored; Q (paced, unclassifiable) is left out
_TO_SCORED = np.array([SCORED.index(c) if c in SCORED else IGNORE for c in BEAT_CLASSES], dtype=np.int64)

# RR features: intervals in seconds and their ratios. A ratio is fed as its logarithm, so a beat as early as the
# next is late sits symmetric about 0. "average" is the mean RR of the whole record, "local" the mean of the
# ``rr_local`` intervals centred on the beat; dividing by them removes each patient's heart rate, which is what
# lets premature (S) beats be found in patients never seen in training.
RR_FEATURES = ("pre", "post", "local", "average", "pre/average", "post/average", "local/average", "pre/local",
               "post/local", "pre/post", "local_cv")

# de Chazal et al. 2004, table 4, DS2 (inter-patient), their best classifier configuration (in %)
DE_CHAZAL_2004 = {"se_N": 86.9, "ppv_N": 99.2, "se_S": 75.9, "ppv_S": 38.5, "se_V": 77.7, "ppv_V": 81.9,
                  "se_F": 89.4, "ppv_F": 8.6, "accuracy": 85.9}


@dataclass
class BeatDataConfig:
    """``[data.beats]`` (``data.target = "beats"``): how a beat becomes an example."""

    window: int = option(256, help="samples of the beat window at data.fs, centred on the R-peak (256 = 1.28 s "
                         "at 200 Hz: the beat and parts of its neighbours)", ge=16)
    template: bool = option(True, help="add the record's median beat as an input channel per lead, so the network "
                            "compares a beat with the patient's usual beat")
    baseline: str = option("median", help="per-window baseline removal: median (subtract each lead's median) "
                           "or none", choices=("median", "none"))
    rr_features: list[str] = option(help="RR features joined at the head (intervals in s; ratios as logs; local_cv: "
                                    "spread of the local intervals over their mean)", choices=RR_FEATURES,
                                    default_factory=lambda: list(RR_FEATURES))
    rr_local: int = option(10, help="RR intervals in the local average, centred on the beat (de Chazal: 10)", ge=2)
    jitter: int = option(2, help="training: the window centre moves by up to this many samples either way", ge=0)
    stretch: float = option(0.0, help="training: the window (and the median beat) is stretched in time by a factor "
                            "drawn from U(1 - stretch, 1 + stretch), as heart rate and QRS width differ between "
                            "patients; 0: off", ge=0, lt=0.5)

    def check(self) -> None:
        if not self.rr_features:
            raise ConfigError("data.beats.rr_features is empty (the head needs at least one RR feature)")
        if len(set(self.rr_features)) != len(self.rr_features):
            raise ConfigError(f"data.beats.rr_features lists a feature twice: {self.rr_features}")


@dataclass
class BeatHeadConfig:
    """``[model.beat_head]``: the head after the backbone's features (beats target only)."""

    pool: str = option("avgmax", help="how the backbone's feature map becomes a vector: avg, max, avgmax (both, "
                       "joined) or flatten (keeps where in the window a feature is)",
                       choices=("avg", "max", "avgmax", "flatten"))
    rr_hidden: int = option(32, help="width of the layer the RR features pass through before they join", ge=1)
    hidden: int = option(64, help="width of the hidden layer of the classifier", ge=1)
    dropout: float = option(0.3, help="dropout before each linear layer of the classifier", ge=0, lt=1)


# ---------------------------------------------------------------- beats, windows and RR features


def rr_features(peaks: np.ndarray, fs: float, names: Sequence[str] = RR_FEATURES, local: int = 10) -> np.ndarray:
    """RR features of every beat of one record from its R-peak samples ``peaks`` (n,), sorted: (n, len(names))
    float64 (ratios as natural logs).

    ``pre``/``post``: the interval to the previous/next beat in seconds (the first beat takes its ``post`` as
    ``pre``, the last its ``pre`` as ``post``); ``average``: the mean interval of the record; ``local``: the mean
    of the ``local`` intervals centred on the beat (fewer at the record's ends); ``local_cv``: their standard
    deviation over their mean. Needs at least two peaks.
    """
    peaks = np.asarray(peaks, dtype=np.float64)
    n = len(peaks)
    if n < 2:
        raise ValueError(f"RR features need at least two beats, got {n}")
    # d[k]: interval between beats k and k + 1; at least one sample, so two marks on one sample give no log(0)
    d = np.maximum(np.diff(peaks), 1.0) / fs
    pre = np.concatenate([[d[0]], d])
    post = np.concatenate([d, [d[-1]]])
    half = max(1, local // 2)
    i = np.arange(n)
    lo, hi = np.clip(i - half, 0, n - 1), np.clip(i + half, 0, n - 1)  # intervals lo .. hi - 1
    lo = np.minimum(lo, np.maximum(hi - 1, 0))
    cs = np.concatenate([[0.0], np.cumsum(d)])
    cs2 = np.concatenate([[0.0], np.cumsum(d * d)])
    count = np.maximum(hi - lo, 1)
    loc = (cs[hi] - cs[lo]) / count
    var = np.maximum((cs2[hi] - cs2[lo]) / count - loc ** 2, 0.0)
    avg = np.full(n, d.mean())
    base = {"pre": pre, "post": post, "local": loc, "average": avg}
    cols = []
    for name in names:
        if name in base:
            cols.append(base[name])
        elif name == "local_cv":
            cols.append(np.sqrt(var) / loc)
        elif "/" in name:
            a, b = name.split("/")
            cols.append(np.log(base[a] / base[b]))
        else:
            raise ValueError(f"unknown RR feature {name!r}; known: {', '.join(RR_FEATURES)}")
    return np.stack(cols, axis=1)


def record_signal(cache: PreparedCache, i: int) -> np.ndarray:
    """Every lead of record ``i`` of a prepared cache as (leads, time) (a view: the cache keeps time-major)."""
    return np.asarray(cache.signals(i)).T


def cut_window(signal: np.ndarray, centre: int, window: int, baseline: str = "median") -> np.ndarray:
    """``window`` samples of ``signal`` (leads, time) with sample ``centre`` at index ``window // 2``, zero
    beyond the record's ends; with ``baseline="median"`` each lead's median over the window is subtracted.
    Returns float32 (leads, window)."""
    leads, total = signal.shape
    start = int(centre) - window // 2
    lo, hi = max(start, 0), min(start + window, total)
    out = np.zeros((leads, window), dtype=np.float32)
    if hi > lo:
        out[:, lo - start:hi - start] = signal[:, lo:hi]
        if baseline == "median":
            out[:, lo - start:hi - start] -= np.median(out[:, lo - start:hi - start], axis=1, keepdims=True)
    return out


def median_beat(signal: np.ndarray, peaks: np.ndarray, window: int, baseline: str = "median",
                limit: int = 3000) -> np.ndarray:
    """The record's typical beat: the per-sample median of the windows around ``peaks`` (at most ``limit``,
    evenly spread): float32 (leads, window). Most beats of a record are its usual beat, so the median is it."""
    peaks = np.asarray(peaks)
    if len(peaks) > limit:
        peaks = peaks[np.linspace(0, len(peaks) - 1, limit).astype(np.int64)]
    stack = np.stack([cut_window(signal, p, window, baseline) for p in peaks])
    return np.median(stack, axis=0).astype(np.float32)


@dataclass
class BeatCutter:
    """Model input of one beat: its window (``window`` samples, R-peak at ``window // 2``), optionally stretched in
    time, each lead's median subtracted (``baseline="median"``), and with ``template`` the record's median beat
    (same stretch) as extra channels: float32 (leads x (1 + template), window).

    Windows are first cut ``margin`` samples wider on each side (the median beat too), so a stretch of up to
    ``2 * (margin - 1) / window`` finds real samples; without a stretch the result is the centred ``window``.
    Training, evaluation and ``classify_beats`` all go through ``cut``, so they see the same input.
    """

    window: int
    baseline: str = "median"
    template: bool = True
    margin: int = 0

    @classmethod
    def for_stretch(cls, window: int, baseline: str, template: bool, stretch: float) -> "BeatCutter":
        return cls(window, baseline, template, int(math.ceil(window * stretch / 2)) + 1 if stretch > 0 else 0)

    @property
    def wide(self) -> int:
        return self.window + 2 * self.margin

    def median(self, signal: np.ndarray, peaks: np.ndarray) -> np.ndarray | None:
        """The record's median beat over the wide window (None without ``template``): (leads, wide)."""
        return median_beat(signal, peaks, self.wide, self.baseline) if self.template else None

    def _fit(self, wide: np.ndarray, scale: float) -> np.ndarray:
        if scale == 1.0:
            out = wide[:, self.margin:self.margin + self.window].copy()
        else:
            pos = self.wide // 2 + (np.arange(self.window) - self.window // 2) * scale
            grid = np.arange(self.wide)
            out = np.stack([np.interp(pos, grid, lead) for lead in wide]).astype(np.float32)
        if self.baseline == "median":
            out -= np.median(out, axis=1, keepdims=True)
        return out

    def cut(self, signal: np.ndarray, peak: int, median: np.ndarray | None, scale: float = 1.0) -> np.ndarray:
        """The input for the beat at ``peak`` of ``signal`` (leads, time): (in_chans, window) float32."""
        x = self._fit(cut_window(signal, peak, self.wide, "none"), scale)
        if median is not None:
            x = np.concatenate([x, self._fit(median, scale)])
        return x


@dataclass
class RecordBeats:
    """The beats of one record: R-peak samples (n,) at the cache rate, scored class per beat (n,) (-100 for Q
    beats and beats without a label) and RR features (n, features), raw (not standardised)."""

    record: int
    peaks: np.ndarray
    labels: np.ndarray
    rr: np.ndarray


def record_beats(cache: PreparedCache, i: int, names: Sequence[str], local: int) -> RecordBeats:
    """Beats of record ``i``: the annotated ones if the cache has annotations, else detected R-peaks (no labels).
    Raises ValueError when fewer than two beats are found."""
    if cache.has_annotations:
        beats = cache.beats(i)
        peaks, labels = beats[:, 0].astype(np.int64), _TO_SCORED[beats[:, 1]]
    else:
        from cnnapps.tasks.ecg.qrs import detect_r_peaks

        peaks = detect_r_peaks(record_signal(cache, i)[0], cache.fs, cache.records[i].name)
        labels = np.full(len(peaks), IGNORE, dtype=np.int64)
    if len(peaks) < 2:
        raise ValueError(f"record {cache.records[i].name}: {len(peaks)} beat(s); at least two are needed")
    return RecordBeats(i, peaks, labels, rr_features(peaks, cache.fs, names, local))


def beat_class_counts(beats: Sequence[RecordBeats], num_classes: int = len(SCORED)) -> np.ndarray:
    """Labelled beats per scored class over ``beats``: (num_classes,) int64."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for b in beats:
        lab = b.labels[b.labels >= 0]
        counts += np.bincount(lab, minlength=num_classes)[:num_classes]
    return counts


class BeatDataset(Dataset):
    """One item per beat that is scored (labelled N, S, V or F) or, without labels, per detected beat.

    Item: ``x`` (in_chans, window) float32 (the beat's leads, then the record's median beat per lead with
    ``template``), ``rr`` (features,) standardised by ``rr_mean``/``rr_std``, ``y`` () int64 (-100: no label),
    ``record`` (cache index) and ``beat`` (index of the beat among the record's beats); the input is made by
    ``cutter`` (BeatCutter). Training only: ``jitter`` moves the window centre by up to that many samples,
    ``stretch`` stretches it (and the median beat) by U(1 - stretch, 1 + stretch), and ``augment``
    (``data.Augment``) changes the beat's amplitude, baseline and noise (the median beat's stay as they are).
    """

    def __init__(self, cache: PreparedCache, beats: Sequence[RecordBeats], cutter: BeatCutter, rr_mean: np.ndarray,
                 rr_std: np.ndarray, jitter: int = 0, stretch: float = 0.0, augment: Any = None,
                 labelled_only: bool = True) -> None:
        self.cache, self.cutter, self.jitter, self.stretch, self.augment = cache, cutter, jitter, stretch, augment
        self.records = np.asarray([b.record for b in beats], dtype=np.int64)
        self._signals = {b.record: record_signal(cache, b.record) for b in beats}
        self._medians = {b.record: cutter.median(self._signals[b.record], b.peaks) for b in beats}
        items, rr = [], []
        for b in beats:
            keep = np.flatnonzero(b.labels >= 0) if labelled_only else np.arange(len(b.peaks))
            items.append(np.stack([np.full(len(keep), b.record), b.peaks[keep], b.labels[keep], keep], axis=1))
            rr.append(b.rr[keep])
        self.items = np.concatenate(items).astype(np.int64) if items else np.zeros((0, 4), np.int64)
        raw = np.concatenate(rr) if rr else np.zeros((0, len(rr_mean)))
        self.rr = ((raw - rr_mean) / rr_std).astype(np.float32)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return self.items[:, 2]

    def __getitem__(self, i: int) -> dict:
        record, peak, label, beat = (int(v) for v in self.items[i])
        if self.jitter:
            peak += int(torch.randint(-self.jitter, self.jitter + 1, ()))
        scale = 1.0 + self.stretch * (2.0 * float(torch.rand(())) - 1.0) if self.stretch else 1.0
        x = torch.from_numpy(self.cutter.cut(self._signals[record], peak, self._medians[record], scale))
        if self.augment is not None and self.augment.active:
            leads = self._signals[record].shape[0]
            x = torch.cat([self.augment(x[:leads]), x[leads:]])
        return {"x": x, "rr": torch.from_numpy(self.rr[i]), "y": torch.tensor(label, dtype=torch.int64),
                "record": record, "beat": beat}


def beat_settings(beats_cfg: BeatDataConfig, s: dict) -> dict:
    """The beat-specific preprocessing added to the task's settings ``s`` (kept in checkpoints)."""
    out = dict(s)
    out.update({"classes": list(SCORED), "beat_window": beats_cfg.window, "beat_template": beats_cfg.template,
                "beat_baseline": beats_cfg.baseline, "rr_features": list(beats_cfg.rr_features),
                "beat_margin": BeatCutter.for_stretch(beats_cfg.window, beats_cfg.baseline, beats_cfg.template,
                                                      beats_cfg.stretch).margin,
                "rr_local": beats_cfg.rr_local})
    return out


def state_cutter(state: dict) -> BeatCutter:
    """The BeatCutter of a model's preprocessing ``state``."""
    return BeatCutter(int(state["beat_window"]), str(state.get("beat_baseline", "median")),
                      bool(state.get("beat_template", True)), int(state.get("beat_margin", 0)))


def collect_beats(cache: PreparedCache, records: Sequence[int], s: dict) -> tuple[list[RecordBeats], list[str]]:
    """RecordBeats of ``records``; a record with fewer than two beats (or where detection fails) is left out and
    its name returned in the second list (a logged, counted skip)."""
    from cnnapps.tasks.ecg.qrs import QRSDetectionError

    out, skipped = [], []
    for r in records:
        try:
            out.append(record_beats(cache, int(r), s["rr_features"], int(s["rr_local"])))
        except (ValueError, QRSDetectionError) as exc:
            log.warning("skipping %s in the beat data (too_few_beats): %s", cache.records[int(r)].name, exc)
            skipped.append(cache.records[int(r)].name)
    return out, skipped


# ---------------------------------------------------------------- the model


class BeatNet(nn.Module):
    """A zoo backbone over the beat window, pooled, joined with the RR features at the head:
    ``forward(x (batch, in_chans, window), rr (batch, features))`` -> logits (batch, classes).

    ``backbone`` and ``head`` are the names the engine's freezing and transfer code look for; the RR layer is
    part of the head.
    """

    def __init__(self, backbone: nn.Module, in_chans: int, window: int, n_rr: int, num_classes: int,
                 cfg: BeatHeadConfig, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, cfg.pool
        channels = backbone.feature_info.channels(-1)
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            length = backbone.forward_features(torch.zeros(1, in_chans, window)).shape[-1]
            backbone.train(was)
        features = {"avg": channels, "max": channels, "avgmax": 2 * channels, "flatten": channels * length}[cfg.pool]
        self.head = nn.ModuleDict({
            "rr": nn.Sequential(nn.Linear(n_rr, cfg.rr_hidden), nn.ReLU(inplace=True)),
            "classifier": nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(features + cfg.rr_hidden, cfg.hidden),
                                        nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
                                        nn.Linear(cfg.hidden, num_classes)),
        })
        weights = torch.tensor(class_weights if class_weights is not None else [], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, x: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        if self.pool == "avg":
            f = f.mean(-1)
        elif self.pool == "max":
            f = f.amax(-1)
        elif self.pool == "avgmax":
            f = torch.cat([f.mean(-1), f.amax(-1)], 1)
        else:
            f = f.flatten(1)
        return self.head["classifier"](torch.cat([f, self.head["rr"](rr)], 1))


def beat_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Class-weighted cross-entropy over labelled beats (the weights travel with the model); 0 without any."""
    from cnnapps.engine.task import unwrap

    weights = unwrap(model).class_weights
    weight = weights.to(logits.dtype) if len(weights) == logits.shape[1] else None
    if not bool((y != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing)


# ---------------------------------------------------------------- metrics


class BeatMetrics(Metric):
    """Per-beat scores: for each class C, ``se_C`` (sensitivity), ``ppv_C`` (positive predictivity, +P) and
    ``f1_C``; ``accuracy``, ``macro_f1`` (mean F1 of the classes present) and ``sv_f1`` (mean F1 of S and V)
    over every labelled beat; ``beats`` (their count). Beats with label -100 (Q, unlabelled) are not scored. A beat seen twice (a distributed sampler
    pads with repeats) counts once. ``se_C`` is left out when C has no beats, ``ppv_C`` when none is predicted C.
    """

    def __init__(self, classes: Sequence[str] = SCORED) -> None:
        self.classes = list(classes)
        self.reset()

    def reset(self) -> None:
        self._beats: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        probs = torch.softmax(output.detach().float(), dim=1).cpu().numpy()
        y = batch["y"].detach().cpu().numpy()
        records, beats = batch["record"].detach().cpu().numpy(), batch["beat"].detach().cpu().numpy()
        for b in range(len(y)):
            self._beats[(int(records[b]), int(beats[b]))] = (int(y[b]), probs[b])

    def state(self) -> dict:
        return {"beats": self._beats}

    def merge(self, state: dict) -> None:
        self._beats.update(state["beats"])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._beats:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = sorted(self._beats)
        true = np.array([self._beats[k][0] for k in keys], dtype=np.int64)
        pred = np.array([int(self._beats[k][1].argmax()) for k in keys], dtype=np.int64)
        keep = true != IGNORE
        return true[keep], pred[keep]

    def confusion(self) -> np.ndarray:
        """(classes, classes) int64, rows = truth."""
        true, pred = self._arrays()
        k = len(self.classes)
        cm = np.zeros((k, k), dtype=np.int64)
        np.add.at(cm, (true, pred), 1)
        return cm

    def compute(self) -> dict[str, float]:
        cm = self.confusion()
        total = int(cm.sum())
        if not total:
            log.warning("beat metrics: no labelled beats to score")
        out: dict[str, float] = {"accuracy": float(np.trace(cm) / total) if total else 0.0}
        f1s = []
        for i, name in enumerate(self.classes):
            tp, support, predicted = cm[i, i], cm[i].sum(), cm[:, i].sum()
            if support:
                out[f"se_{name}"] = float(tp / support)
            if predicted:
                out[f"ppv_{name}"] = float(tp / predicted)
            if support:
                f1 = float(2 * tp / (support + predicted))
                out[f"f1_{name}"] = f1
                f1s.append(f1)
        out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
        # the two ectopic classes the field's goals are set on (F is rare and often absent in a few patients)
        sv = [out[k] for k in ("f1_S", "f1_V") if k in out]
        out["sv_f1"] = float(np.mean(sv)) if sv else 0.0
        out["beats"] = float(total)
        return out

    def artifacts(self) -> dict[str, Any]:
        """``beat_confusion`` (rows: truth) and ``classes``."""
        return {"classes": list(self.classes), "beat_confusion": self.confusion()}


# ---------------------------------------------------------------- records without annotations


@dataclass
class BeatPrediction:
    """Per-beat classes of one record: R-peak samples (n,) at the model rate, class index (n,) and
    probabilities (n, classes)."""

    peaks: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray


def classify_beats(model: nn.Module, signal: np.ndarray, state: dict, device: torch.device | str = "cpu",
                   peaks: np.ndarray | None = None, where: str = "signal", batch_size: int = 512) -> BeatPrediction:
    """The whole beat chain for a prepared signal (the preparation's output at ``state['fs']``: (time,) or
    (time, leads), time-major as the cache keeps it): R-peaks (detected on the first lead with
    ``qrs.detect_r_peaks`` unless ``peaks`` are given) -> beat windows and RR features as in training -> the beat
    model's classes (names: ``state['classes']``).

    Raises ``qrs.QRSDetectionError`` (naming ``where``) when fewer than two R-peaks are found.
    """
    from cnnapps.tasks.ecg.qrs import QRSDetectionError, detect_r_peaks

    x = np.asarray(signal, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x.T
    fs = int(state["fs"])
    if peaks is None:
        peaks = detect_r_peaks(x[0], fs, where)
    peaks = np.asarray(peaks, dtype=np.int64)
    if len(peaks) < 2:
        raise QRSDetectionError(f"{where}: {len(peaks)} R-peak(s); at least two are needed")
    rr = rr_features(peaks, fs, state["rr_features"], int(state["rr_local"]))
    rr = ((rr - np.asarray(state["rr_mean"])) / np.asarray(state["rr_std"])).astype(np.float32)
    cutter = state_cutter(state)
    median = cutter.median(x, peaks)
    model.eval()
    probs = []
    with torch.inference_mode():
        for start in range(0, len(peaks), batch_size):
            part = peaks[start:start + batch_size]
            wins = np.stack([cutter.cut(x, p, median) for p in part])
            logits = model(torch.from_numpy(wins).to(device), torch.from_numpy(rr[start:start + len(part)]).to(device))
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
    p = np.concatenate(probs)
    return BeatPrediction(peaks, p.argmax(1), p)


# ---------------------------------------------------------------- the task's data for the beats target


def build_beat_data(d: Any, s: dict, cache: PreparedCache, ids: tuple[np.ndarray, ...] | None,
                    state: dict | None) -> Any:
    """DataSplits of beats for ``ECGTask.build_data``: ``ids`` = (train, val, test) cache indices, or None for
    every record of ``cache`` in ``test`` (``split='all'``). ``d``: the ``[data]`` section; ``s``: the settings
    (``state`` from a checkpoint where given: its RR standardisation and class weights are kept)."""
    from cnnapps.engine.task import DataSplits
    from cnnapps.tasks.ecg.data import Augment, class_weights

    if state is None:
        s = beat_settings(d.beats, s)
    elif "beat_window" not in s:
        raise ConfigError("this checkpoint is from the removed step-labelled beats mode (one label per 256-sample "
                          "step); retrain it with data.target = \"beats\" (one example per beat)")
    skipped = dict(cache.skip_counts())
    splits = {"test": np.arange(len(cache))} if ids is None else dict(zip(("train", "val", "test"), ids))
    beats: dict[str, list[RecordBeats]] = {}
    for name, records in splits.items():
        beats[name], lost = collect_beats(cache, records, s)
        if lost:
            skipped["too_few_beats"] = skipped.get("too_few_beats", 0) + len(lost)
    leads = cache.n_leads
    if state is not None and int(s.get("n_leads", leads)) != leads:
        raise ConfigError(f"{cache.path}: the cache holds {leads} lead(s), the checkpoint's model reads "
                          f"{s['n_leads']}")
    s["n_leads"], s["in_chans"] = leads, leads * (2 if s["beat_template"] else 1)
    if cache.lead_names:
        s["lead_names"] = list(cache.lead_names)
    log.info("ECG beats: leads %s", ", ".join(cache.lead_names) or "the first ECG signal of each record")
    if state is None:
        train = beats.get("train", [])
        if not train:
            raise ConfigError("data.train_records: no training record with beats")
        rr = np.concatenate([b.rr[b.labels >= 0] for b in train])
        s["rr_mean"], s["rr_std"] = rr.mean(0).tolist(), np.maximum(rr.std(0), 1e-6).tolist()
        counts = beat_class_counts(train)
        s["train_beat_counts"] = counts.tolist()
        s["class_weights"] = class_weights(counts, d.class_weighting, d.class_weight_max).tolist()
        log.info("ECG beats: training beats per class %s; loss weights %s", dict(zip(SCORED, counts.tolist())),
                 {c: round(float(w), 3) for c, w in zip(SCORED, s["class_weights"])})
    mean, std = np.asarray(s["rr_mean"]), np.asarray(s["rr_std"])
    cutter = state_cutter(s)

    def dataset(name: str, train: bool = False) -> BeatDataset | None:
        if not beats.get(name):
            return None
        augment = Augment(int(s["fs"]), d.aug_scale, d.aug_wander, d.aug_noise) if train and d.augment else None
        return BeatDataset(cache, beats[name], cutter, mean, std, jitter=d.beats.jitter if train else 0,
                           stretch=d.beats.stretch if train else 0.0, augment=augment,
                           labelled_only=train or cache.has_annotations)

    train_ds = dataset("train", train=True)
    sample_weights = None
    if d.weighted_sampler and train_ds is not None:
        # rarity for the sampler is independent of the loss weights (which may be off)
        counts = beat_class_counts(beats["train"])
        w = class_weights(counts, "sqrt", d.class_weight_max)
        sample_weights = torch.as_tensor(w[train_ds.labels], dtype=torch.double)
    n = {k: len(v) for k, v in beats.items()}
    log.info("ECG beats: %s records %s, %s beats", {k: len(v) for k, v in splits.items()}, n,
             {k: len(ds) for k, ds in (("train", train_ds),) if ds is not None})
    return DataSplits(train=train_ds, val=dataset("val"), test=dataset("test"), state=s, collate_fn=None,
                      sample_weights=sample_weights, skipped=skipped)


def build_beat_model(backbone: nn.Module, model_cfg: Any, state: dict) -> BeatNet:
    """BeatNet around a zoo ``backbone`` built with ``in_chans = state['in_chans']``."""
    return BeatNet(backbone, int(state["in_chans"]), int(state["beat_window"]), len(state["rr_features"]),
                   len(state["classes"]), model_cfg.beat_head, class_weights=state.get("class_weights"))


def beat_report(run_dir: Any, metric: BeatMetrics, data: Any) -> dict[str, str]:
    """The beat confusion matrix and the data summary into ``run_dir``; {what: file name}."""
    import json
    from pathlib import Path

    from cnnapps.engine.plots import plot_confusion

    run_dir = Path(run_dir)
    art = metric.artifacts()
    plot_confusion(art["beat_confusion"], art["classes"], run_dir / "confusion_beats.png",
                   "beats (AAMI classes, Q left out)")
    summary = {"records": {k: int(len(ds.records)) for k, ds in
                           (("train", data.train), ("val", data.val), ("test", data.test)) if ds is not None},
               "beats": {k: int(len(ds)) for k, ds in
                         (("train", data.train), ("val", data.val), ("test", data.test)) if ds is not None},
               "skipped": dict(data.skipped), "train_beat_counts": data.state.get("train_beat_counts"),
               "class_weights": data.state.get("class_weights"),
               "confusion_beats": {"classes": art["classes"], "rows_true": art["beat_confusion"].tolist()}}
    (run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"confusion matrix (beats)": "confusion_beats.png", "data summary (split sizes, skips)": "data_summary.json"}


# ---------------------------------------------------------------- results beside the literature

# The goal of issue 17 (inter-patient, DS2): (Se, +P) floors in %
GOALS = {"S": (76.0, 45.0), "V": (85.0, 85.0)}


def comparison_table(test: dict[str, Any]) -> dict[str, Any]:
    """Our per-class test scores (%) beside de Chazal et al. (2004) on DS2, with the goal where one is set:
    a results table ``{"title", "columns", "rows", "note"}``."""
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * float(v):.1f}"

    def f1(se: float | None, ppv: float | None) -> str:
        return "n/a" if not se or not ppv else f"{200 * se * ppv / (se + ppv) / 100:.1f}"

    rows = []
    for c in SCORED:
        ref_se, ref_ppv = DE_CHAZAL_2004[f"se_{c}"], DE_CHAZAL_2004[f"ppv_{c}"]
        goal = GOALS.get(c)
        met = ""
        if goal:
            ok = (100 * test.get(f"se_{c}", 0.0) >= goal[0]) and (100 * test.get(f"ppv_{c}", 0.0) >= goal[1])
            met = f"Se >= {goal[0]:g}, +P >= {goal[1]:g}: {'met' if ok else 'missed'}"
        rows.append([c, pct(test.get(f"se_{c}")), f"{ref_se:.1f}", pct(test.get(f"ppv_{c}")), f"{ref_ppv:.1f}",
                     pct(test.get(f"f1_{c}")), f1(ref_se, ref_ppv), met])
    return {"title": "Beats on the test records beside de Chazal et al. (2004), DS2, in %",
            "columns": ["class", "Se", "Se de Chazal", "+P", "+P de Chazal", "F1", "F1 de Chazal", "goal"],
            "rows": rows,
            "note": "de Chazal, O'Dwyer, Reilly, IEEE Trans. Biomed. Eng. 51(7) 2004, table IV (their F1 computed "
                    "from their Se and +P). Both: every N, S, V and F beat of the 22 DS2 records, Q left out."}


def beat_rows(pred: BeatPrediction, state: dict) -> dict[str, Any]:
    """``predict``'s JSON for the beats of one record: ``beat_counts`` {class: n} and ``beats`` [{time_s, class,
    p}] (R-peak time from the record's start, the class and its probability)."""
    classes, fs = list(state["classes"]), float(state["fs"])
    return {"beat_counts": {c: int((pred.classes == k).sum()) for k, c in enumerate(classes)},
            "beats": [{"time_s": round(float(t) / fs, 3), "class": classes[int(c)], "p": round(float(p[int(c)]), 3)}
                      for t, c, p in zip(pred.peaks, pred.classes, pred.probabilities)]}
