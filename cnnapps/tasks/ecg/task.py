"""The ECG task plugin: typed config, data from the prepared caches, a 1D backbone with a per-step head, the
sequence loss, metrics, report plots and ``predict`` on WFDB records."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.engine.config import ConfigError, TrainConfig, option
from cnnapps.engine.task import DataSplits, Task, TaskConfig, unwrap
from cnnapps.tasks.ecg.beats import SCORED, BeatDataConfig, BeatHeadConfig
from cnnapps.tasks.ecg.data import (DEFAULT_RHYTHM_CLASSES, IGNORE, Augment, EvalWindows, Labeler,
                                    RecordLabeler, RhythmLabeler, TrainWindows, class_weights, collate_windows,
                                    duplicate_records,
                                    merge_segments, n_valid_steps, record_labels_for_cinc, records_by_name,
                                    rhythm_class_lookup, step_class_counts, stratified_split, tile_sample_weights)
from cnnapps.tasks.ecg.explain import ECGExplain
from cnnapps.tasks.ecg.leads import ALL, parse_leads, same_lead
from cnnapps.tasks.ecg.metrics import ECGMetrics
from cnnapps.tasks.ecg.prepare import (CINC_CLASSES, MITDB_DS1, MITDB_DS2, STEP, PrepParams,
                                       PreparedCache, RecordSkip, choose_lead, cinc2021_source, dataset_source,
                                       folder_source, prepare_source)

log = logging.getLogger(__name__)

# DS1 patients held out for validation (early stopping, best.pt). DS1's only AFIB/AFL records (201, 203) stay
# in training; these four still cover bigeminy/trigeminy (119), VT (205), SVTA (209) and a noisy record (108).
MITDB_VAL = ("108", "119", "205", "209")
MITDB_TRAIN = tuple(r for r in MITDB_DS1 if r not in MITDB_VAL)


@dataclass
class ECGDataConfig:
    """``[data]``: which records, how they are prepared, windowed, split, weighted and augmented."""

    dataset: str = option("cinc2017", help="data set under the data root: cinc2017 (PhysioNet/CinC 2017, "
                          "REFERENCE.csv labels), mitdb (MIT-BIH Arrhythmia, .atr annotations) or cinc2021 "
                          "(PhysioNet/CinC 2020/2021 12-lead records under data.path, # Dx: header labels)",
                          choices=("cinc2017", "mitdb", "cinc2021"))
    target: str = option("record", help="what each 256-sample step is labelled with: record (the CinC record "
                         "label broadcast along it), rhythm (MIT-BIH rhythm at the step centre), beats (one example "
                         "per annotated MIT-BIH beat, centred on its R-peak: AAMI N, S, V, F), dx (cinc2021: the "
                         "record's scored diagnoses, several per record, sigmoid outputs pooled over the record)",
                         choices=("record", "rhythm", "beats", "dx"))
    path: str = option("cinc2021", help="cinc2021: the folder of records, searched recursively (the Challenge "
                       "sets keep each source in subfolders); absolute or relative to the data root")
    label_set: str = option("scored2021", help="cinc2021: the classes, the Challenge's scored diagnoses "
                            "(equivalent SNOMED CT codes merged; cnnapps.tasks.ecg.cinc2021)",
                            choices=("scored2021", "scored2020"))
    unscored: str = option("negative", help="cinc2021: a record whose codes hold no scored class is kept as an "
                           "all-negative example, or left out before the split and counted (no_scored_label)",
                           choices=("negative", "skip"))
    fs: int = option(200, help="model sampling rate in Hz (records are resampled to it; Hannun et al.: 200)", ge=1)
    lead: str = option("", help="signal name to read (e.g. MLII; aliases match, MLII ~ II); \"\": each record's first "
                       "ECG signal")
    leads: list[str] = option(
        help="several leads, e.g. [\"MLII\", \"V1\"], or \"all\" (every ECG lead of the first record): in_chans "
        "follows; names match through the alias table of cnnapps.tasks.ecg.leads (MLII ~ II, D2 ~ II, MV1 ~ V1, "
        "...); signals that are not ECG (PLETH, RESP, ABP, ...) are never read; []: the one data.lead",
        default_factory=list)
    missing_lead: str = option(
        "substitute", help="with data.leads, a record lacking a wanted lead: read another ECG signal of it in its "
        "place (a warning names the record and the lead used; data_summary.json counts them) or skip it "
        "(lead_not_found)", choices=("substitute", "skip"))
    normalize: str = option("zscore", help="per-record amplitude normalisation", choices=("zscore", "robust", "none"))
    window: int = option(6144, help="training crop in samples at fs, a multiple of 256 (6144 = 30.7 s: a typical "
                         "CinC record whole)", ge=256)
    eval_window: int = option(0, help="evaluation tiles in samples at fs, a multiple of 256; 0: whole records",
                              ge=0)
    fractions: list[float] = option(help="CinC train/val/test fractions of the records, stratified by label; "
                                    "three numbers summing to 1", ge=0, le=1,
                                    default_factory=lambda: [0.8, 0.1, 0.1])
    split_seed: int = option(0, help="seed of the CinC split (independent of train.seed)", ge=0)
    max_records: int = option(0, help="CinC: a stratified subset of this many records (CI runs); 0: all", ge=0)
    dedupe: bool = option(True, help="CinC: drop exact duplicate records (identical samples) before splitting, "
                          "keeping the first name, so no copy of a training record is tested")
    train_records: list[str] = option(help="MIT-BIH training records by name (DS1 less validation)",
                                      default_factory=lambda: list(MITDB_TRAIN))
    val_records: list[str] = option(help="MIT-BIH validation records by name (DS1 patients held out)",
                                    default_factory=lambda: list(MITDB_VAL))
    test_records: list[str] = option(help="MIT-BIH test records by name (de Chazal DS2)",
                                     default_factory=lambda: list(MITDB_DS2))
    rhythm_classes: list[str] = option(help="rhythm target: class names (MIT-BIH rhythm codes without the "
                                       "parenthesis)", default_factory=lambda: list(DEFAULT_RHYTHM_CLASSES))
    rhythm_aliases: list[str] = option(help="rhythm target: FROM=TO renames applied before mapping to classes",
                                       default_factory=lambda: ["SBR=N"])
    other_class: str = option("OTHER", help="rhythm target: rhythms outside rhythm_classes map here if it is a "
                              "class, else are ignored")
    class_weighting: str = option("sqrt", help="loss weight per class from training step counts: none, inverse "
                                  "frequency, or its square root", choices=("none", "inverse", "sqrt"))
    class_weight_max: float = option(10.0, help="loss weights are clipped to [1/max, max]", ge=1)
    weighted_sampler: bool = option(False, help="draw training tiles by their rarest class (sqrt inverse "
                                    "frequency)")
    time_shift: bool = option(True, help="random crop position (training only)")
    augment: bool = option(True, help="amplitude scale, baseline wander and noise below (training only)")
    aug_scale: float = option(0.1, help="amplitude times U(1 - s, 1 + s)", ge=0, lt=1)
    aug_wander: float = option(0.1, help="largest baseline-wander sinusoid (0.05-0.5 Hz), in record SDs", ge=0)
    aug_noise: float = option(0.02, help="largest Gaussian noise SD, in record SDs", ge=0)
    aug_flip: float = option(0.5, help="probability of inverting a training crop (polarity flip: AliveCor "
                             "records are often recorded upside down); applies with augment. 0.5 raised the default "
                             "run's best validation challenge F1 from 0.834 to 0.845 (one seed, 16 epochs)",
                             ge=0, le=1)

    def check(self) -> None:
        """Rules between fields, checked when a config loads."""
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"data.fractions = {self.fractions}: must be three numbers (train, val, test) "
                              "summing to 1")
        for key in ("window", "eval_window"):
            if getattr(self, key) % STEP:
                raise ConfigError(f"data.{key} = {getattr(self, key)}: must be a multiple of {STEP} samples")
    beats: BeatDataConfig = option(help="[data.beats]: beat windows and RR features (data.target = \"beats\")",
                                   default_factory=BeatDataConfig)


@dataclass
class ECGModelConfig:
    """``[model]``: a registered 1D backbone and its keyword arguments, then a per-step head."""

    backbone: str = option("hannun34_1d", help="registered 1D backbone; its total stride must be 256 samples")
    width: int = option(12, help="hannun: filters of the first blocks (doubling every increase_every blocks)",
                        ge=1)
    num_blocks: int = option(8, help="hannun: residual blocks (two convolutions each)", ge=1)
    kernel_size: int = option(16, help="hannun: convolution kernel length in samples", ge=1)
    dropout: float = option(0.2, help="hannun: dropout between the two convolutions of a block", ge=0, lt=1)
    subsample_every: int = option(1, help="hannun: a block halving time every this many blocks "
                                  "(2 ** (num_blocks / subsample_every) must be 256)", ge=1)
    increase_every: int = option(2, help="hannun: blocks between doublings of the filter count", ge=1)
    head_dropout: float = option(0.0, help="dropout before the per-step linear head", ge=0, lt=1)
    pool: str = option("mean", help="dx target: how per-step logits become the record's logit per class: their "
                       "mean over the record's real steps, or their max (a finding seen in one beat)",
                       choices=("mean", "max"))
    kwargs: dict = option(help="other backbone keyword arguments (for backbones other than hannun34_1d)",
                          default_factory=dict)
    beat_head: BeatHeadConfig = option(help="[model.beat_head]: the head that joins RR features (data.target = "
                                       "\"beats\")", default_factory=BeatHeadConfig)


@dataclass
class ECGConfig(TaskConfig):
    """The defaults are the main job, ``cnnapps ecg train``: PhysioNet/CinC 2017 (8,528 single-lead records,
    labels N/A/O/~ broadcast to every 256-sample step as the Stanford group did), stratified 80/10/10 split by
    record after exact duplicates are dropped. Sized for a 2-core CPU: a width-reduced hannun34_1d (8 residual
    blocks, 17 convolutions, each block halving time so the total stride stays 256; 12 -> 96 filters, kernel 16;
    0.69 M parameters) instead of the paper's 16 blocks of 32 -> 256 filters (10.5 M, the ``hannun`` config);
    16 epochs of Adam with a one-cycle schedule (validation challenge F1 still rose after 8, the old setting:
    0.817 at epoch 7 of 8, 0.834 at epoch 12 of 16, one seed, one thread), about 12 minutes of training on
    both cores."""

    data: ECGDataConfig = field(default_factory=ECGDataConfig)
    model: ECGModelConfig = field(default_factory=ECGModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=16, batch_size=32, optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="onecycle",
        warmup_epochs=0.0, threads=2))


class ECGSequenceModel(nn.Module):
    """``backbone.forward_features`` then a per-step ``head``: (batch, leads, time) -> (batch, classes, time/256).

    ``backbone`` and ``head`` are the names the engine's freezing and transfer code look for.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head_dropout: float = 0.0,
                 class_weights: list[float] | None = None) -> None:
        super().__init__()
        from cnnapps.heads import SequenceHead

        self.backbone = backbone
        self.head = SequenceHead(backbone.feature_info.channels(-1), num_classes, dim=1, drop=head_dropout)
        # the loss weights fitted on the training split travel with the model (and to its device); they come from
        # the data state, which every checkpoint saves, so they are not part of the weights (persistent=False)
        weights = torch.tensor(class_weights if class_weights is not None else [], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def _classes(target: str, d: ECGDataConfig) -> list[str]:
    if target == "record":
        return list(CINC_CLASSES)
    if target == "beats":
        return list(SCORED)
    if target == "dx":
        from cnnapps.tasks.ecg.cinc2021 import class_table

        return [c.abbr for c in class_table(d.label_set)]
    if not d.rhythm_classes:
        raise ConfigError("data.rhythm_classes is empty")
    return list(d.rhythm_classes)


def _settings(cfg: ECGConfig, state: dict | None) -> dict[str, Any]:
    """The preprocessing in force: the checkpoint's ``state`` where given, else derived from the config."""
    if state:
        return dict(state)
    d = cfg.data
    expected = {"cinc2017": ("record",), "mitdb": ("rhythm", "beats"), "cinc2021": ("dx",)}
    if d.dataset not in expected:
        raise ConfigError(f"data.dataset: unknown {d.dataset!r} (cinc2017, mitdb, cinc2021)")
    if d.target not in expected[d.dataset]:
        raise ConfigError(f"data.target {d.target!r} does not fit data.dataset {d.dataset!r} "
                          f"(use {' or '.join(expected[d.dataset])})")
    for key in ("window", "eval_window"):
        value = getattr(d, key)
        if value < 0 or value % STEP or (key == "window" and value == 0):
            raise ConfigError(f"data.{key} must be a {'positive ' if key == 'window' else ''}multiple of {STEP} "
                              f"samples{' (or 0: whole records)' if key == 'eval_window' else ''}, got {value}")
    leads = _config_leads(d)
    return {"dataset": d.dataset, "target": d.target, "fs": d.fs, "lead": d.lead, "normalize": d.normalize,
            "step": STEP, "classes": _classes(d.target, d), "window": d.window, "eval_window": d.eval_window,
            "rhythm_aliases": list(d.rhythm_aliases), "other_class": d.other_class,
            "leads": leads, "missing_lead": d.missing_lead,
            # "all" is known only once the cache is prepared (build_data sets it then)
            "in_chans": 0 if leads == [ALL] else max(1, len(leads)),
            **({"path": d.path, "label_set": d.label_set, "unscored": d.unscored} if d.target == "dx" else {})}


def _config_leads(d: ECGDataConfig) -> list[str]:
    """``data.leads`` checked: names, or ``["all"]``, or ``[]`` (the one ``data.lead``)."""
    try:
        leads = parse_leads(d.leads)
    except ValueError as exc:
        raise ConfigError(f"data.{exc}") from exc
    if leads and d.lead and not same_lead(d.lead, leads[0]):
        raise ConfigError(f"data.lead = {d.lead!r} and data.leads = {leads}: give one of them (data.leads wins "
                          f"only when its first lead is data.lead)")
    return leads


def _params(s: dict) -> PrepParams:
    return PrepParams(fs=int(s["fs"]), lead=str(s["lead"]), normalize=str(s["normalize"]), step=int(s["step"]),
                      leads=tuple(s.get("leads") or ()), missing_lead=str(s.get("missing_lead", "skip")))


def _model_leads(s: dict) -> list[str]:
    """The leads a model of state ``s`` reads, by name, in channel order ([] : each record's first ECG signal)."""
    names = s.get("lead_names") or [n for n in (s.get("leads") or []) if n != ALL]
    return list(names) if names else ([s["lead"]] if s.get("lead") else [])


def _labeler(s: dict, cache: PreparedCache) -> Labeler:
    """Per-step labels for the target; a cache without the needed labels (a plain folder) gives none (-100)."""
    target, step = s["target"], int(s["step"])
    if target == "record":
        labels = record_labels_for_cinc(cache)
        return RecordLabeler(labels, step) if (labels != IGNORE).any() else Labeler()
    if not cache.has_annotations:
        return Labeler()
    lookup = rhythm_class_lookup(cache.rhythm_names, s["classes"], s.get("rhythm_aliases", ()),
                                 s.get("other_class", "OTHER"))
    return RhythmLabeler(cache, lookup, step)


def leads_read(cache: PreparedCache) -> dict[str, Any]:
    """What the cache's records gave: {"leads": the channels, "records_by_leads": {"MLII+V1": n, ...},
    "substituted": {record: {wanted: read}}} (for the log and data_summary.json)."""
    combos: dict[str, int] = {}
    for r in cache.records:
        key = "+".join(r.leads or [r.lead])
        combos[key] = combos.get(key, 0) + 1
    return {"leads": list(cache.lead_names) or ["first ECG signal of each record"],
            "records_by_leads": dict(sorted(combos.items(), key=lambda kv: -kv[1])),
            "substituted": dict(cache.index.get("lead_substitutions", {}))}


def _note_leads(s: dict, cache: PreparedCache, from_checkpoint: bool) -> None:
    """Put the cache's channels into the state (``in_chans``, ``lead_names``) and log which leads were read."""
    if from_checkpoint and int(s.get("in_chans") or cache.n_leads) != cache.n_leads:
        raise ConfigError(f"{cache.path}: the cache holds {cache.n_leads} lead(s), the checkpoint's model reads "
                          f"{s['in_chans']}")
    s["in_chans"] = cache.n_leads
    if cache.lead_names:
        s["lead_names"] = list(cache.lead_names)
    info = leads_read(cache)
    log.info("ECG leads %s; records by leads read: %s%s", ", ".join(info["leads"]), info["records_by_leads"],
             f"; {len(info['substituted'])} record(s) read another lead in place of a missing one"
             if info["substituted"] else "")


def _cache_for(s: dict, data_root: Path, split: str | None) -> PreparedCache:
    """The dataset's cache; for ``split='all'``, every record of ``data_root`` (a WFDB folder or a data root)."""
    data_root = Path(data_root)
    if s["dataset"] == "cinc2021":  # labels from the headers: a folder given for --split all is read the same way
        if split == "all" and any(data_root.rglob("*.hea")):
            return prepare_source(cinc2021_source(data_root), _params(s))
        return prepare_source(dataset_source(data_root, "cinc2021", str(s.get("path", ""))), _params(s))
    if split == "all" and any(data_root.glob("*.hea")):
        return prepare_source(folder_source(data_root), _params(s))
    return prepare_source(dataset_source(data_root, s["dataset"]), _params(s))


class ECGTask(ECGExplain, Task):  # explain hooks: tasks/ecg/explain.py
    """ECG rhythm labelling, one label per 256 samples (Hannun et al. 2019), on CinC 2017 or MIT-BIH."""

    name = "ecg"
    Config = ECGConfig
    engine_bench_config = "default"  # the main job's model and windows
    gpu_check_runs = (("hannun", ("train.epochs=1",)),)  # one epoch of the full 34-layer network
    monitor = "challenge_f1"  # CinC; the MIT-BIH configs set train.monitor = "seq_f1"
    monitor_mode = "max"

    def explain_prep(self, state: dict) -> tuple[PrepParams, list[str]]:
        """For the explain hooks: the checkpoint's preprocessing and the leads its model reads."""
        return _params(state), _model_leads(state)

    # ---- data
    def build_data(self, cfg: ECGConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        """Train/val/test windows over the prepared cache (``split='all'``: every record of ``data_root`` in
        ``test``). Items: x (leads, time), y (time // 256,), record, offset, length; see
        ``cnnapps.tasks.ecg.data``."""
        d = cfg.data
        s = _settings(cfg, state)
        cache = _cache_for(s, data_root, split)
        if s["target"] == "beats":  # one example per beat: cnnapps.tasks.ecg.beats
            from cnnapps.tasks.ecg.beats import build_beat_data

            return build_beat_data(d, s, cache, None if split == "all" else self._split(s, d, cache), state)
        _note_leads(s, cache, state is not None)
        if s["target"] == "dx":  # record-level multi-label: cnnapps.tasks.ecg.dx
            from cnnapps.tasks.ecg.dx import build_dx_data

            return build_dx_data(d, s, cache, split, state)
        labeler = _labeler(s, cache)
        classes = list(s["classes"])
        step, window, eval_window = int(s["step"]), int(s["window"]), int(s["eval_window"])
        if split == "all":
            test = EvalWindows(cache, np.arange(len(cache)), labeler, eval_window, step)
            return DataSplits(train=None, val=None, test=test, state=s, collate_fn=collate_windows,
                              skipped=cache.skip_counts())
        train_ids, val_ids, test_ids = self._split(s, d, cache)
        skips = cache.skip_counts()
        log.info("ECG %s/%s: %d train, %d val, %d test records (%d skipped at preparation%s)", s["dataset"],
                 s["target"], len(train_ids), len(val_ids), len(test_ids), sum(skips.values()),
                 ": " + ", ".join(f"{k} {v}" for k, v in skips.items()) if skips else "")
        augment = Augment(int(s["fs"]), d.aug_scale, d.aug_wander, d.aug_noise, d.aug_flip) if d.augment else None
        train = TrainWindows(cache, train_ids, labeler, window, step, time_shift=d.time_shift, augment=augment)
        val = EvalWindows(cache, val_ids, labeler, eval_window, step) if len(val_ids) else None
        test = EvalWindows(cache, test_ids, labeler, eval_window, step) if len(test_ids) else None
        counts = None
        if state and state.get("class_weights") is not None:
            weights = np.asarray(state["class_weights"], dtype=np.float32)
        else:
            counts = step_class_counts(labeler, cache, train_ids, len(classes), step)
            weights = class_weights(counts, d.class_weighting, d.class_weight_max)
            s["train_step_counts"] = counts.tolist()
            log.info("ECG training steps per class %s; loss weights %s", dict(zip(classes, counts.tolist())),
                     {c: round(float(w), 3) for c, w in zip(classes, weights)})
        s["class_weights"] = weights.tolist()
        sample_weights = None
        if d.weighted_sampler and len(train):
            # the sampler's notion of rarity is independent of the loss weights (which may be off)
            if counts is None:
                counts = step_class_counts(labeler, cache, train_ids, len(classes), step)
            sample_weights = tile_sample_weights(train, class_weights(counts, "sqrt", d.class_weight_max))
        return DataSplits(train=train, val=val, test=test, state=s, collate_fn=collate_windows,
                          sample_weights=sample_weights, skipped=cache.skip_counts())

    def _split(self, s: dict, d: ECGDataConfig, cache: PreparedCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if s["dataset"] == "cinc2017":
            labels = record_labels_for_cinc(cache)
            if d.dedupe:  # a copy on each side of the split would be a test record seen in training
                groups = duplicate_records(cache, np.flatnonzero(labels != IGNORE))
                for group in groups:
                    labels[group[1:]] = IGNORE
                s["duplicates_removed"] = [[cache.names[i] for i in group] for group in groups]
                if groups:
                    log.info("ECG: %d exact duplicate record(s) left out before splitting (kept the first of "
                             "each group): %s", sum(len(g) - 1 for g in groups), s["duplicates_removed"])
            return stratified_split(labels, d.fractions, d.split_seed, d.max_records)
        named = {"train": d.train_records, "val": d.val_records, "test": d.test_records}
        seen: dict[str, str] = {}
        for split_name, names in named.items():
            for n in names:
                if n in seen:
                    raise ConfigError(f"data.{split_name}_records: record {n} is also in data.{seen[n]}_records; "
                                      "splits must be disjoint by patient")
                seen[n] = split_name
        return tuple(records_by_name(cache, names, f"data.{k}_records") for k, names in named.items())  # type: ignore

    # ---- model
    def build_model(self, cfg: ECGConfig, data: DataSplits) -> nn.Module:
        """A registered 1D backbone (``features_only=False, num_classes=0``) + SequenceHead:
        (batch, leads, time) -> (batch, classes, time / 256)."""
        from cnnapps.backbones import create_backbone

        m = cfg.model
        kwargs = dict(m.kwargs)
        if m.backbone.startswith("hannun"):
            kwargs = {"width": m.width, "num_blocks": m.num_blocks, "kernel_size": m.kernel_size,
                      "dropout": m.dropout, "subsample_every": m.subsample_every,
                      "increase_every": m.increase_every, **kwargs}
        backbone = create_backbone(m.backbone, features_only=False, num_classes=0,
                                   in_chans=int(data.state.get("in_chans", 1)), **kwargs)
        if data.state.get("target") == "beats":
            from cnnapps.tasks.ecg.beats import build_beat_model

            return build_beat_model(backbone, m, data.state)
        step = int(data.state.get("step", STEP))
        reduction = backbone.feature_info.reduction(-1)
        if reduction != step:
            raise ConfigError(f"model: backbone {m.backbone!r} with {kwargs} reduces time by {reduction}, but the "
                              f"ECG labels come one per {step} samples; for hannun34_1d keep "
                              f"2 ** (num_blocks // subsample_every) == {step}")
        model = ECGSequenceModel(backbone, len(data.state["classes"]), m.head_dropout,
                                 class_weights=data.state.get("class_weights"))
        if data.state.get("target") == "dx":
            from cnnapps.tasks.ecg.dx import attach_dx

            attach_dx(model, len(data.state["classes"]), str(data.state.get("pool", m.pool)))
            data.state["pool"] = model.pool
        return model

    # ---- step
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], cfg: ECGConfig) -> dict[str, Any]:
        """Cross-entropy averaged over labelled steps (class-weighted, label smoothing from the config)."""
        if "rr" in batch:  # the beats target: one example per beat
            from cnnapps.tasks.ecg.beats import beat_loss

            logits = model(batch["x"], batch["rr"])
            return {"loss": beat_loss(model, logits, batch["y"], cfg.train.label_smoothing), "output": logits}
        if "targets" in batch:  # the dx target: record-level multi-label
            from cnnapps.tasks.ecg.dx import dx_step

            return dx_step(model, batch)
        logits = model(batch["x"])
        y = batch["y"]
        if logits.shape[-1] != y.shape[-1]:
            raise RuntimeError(f"model gave {logits.shape[-1]} steps for {batch['x'].shape[-1]} samples; labels "
                               f"have {y.shape[-1]} (inputs must be a multiple of the step)")
        weights = unwrap(model).class_weights
        weight = weights.to(logits.dtype) if len(weights) == logits.shape[1] else None
        if bool((y != IGNORE).any()):
            loss = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE,
                                   label_smoothing=cfg.train.label_smoothing)
        else:  # a batch of padding only (or unlabelled records): no signal, but no NaN either
            loss = logits.sum() * 0.0
        return {"loss": loss, "output": logits}

    # ---- metrics and report
    def metrics(self, cfg: ECGConfig, data: DataSplits) -> ECGMetrics:
        s = data.state
        if s["target"] == "beats":
            from cnnapps.tasks.ecg.beats import BeatMetrics

            return BeatMetrics(s["classes"])
        if s["target"] == "dx":
            from cnnapps.tasks.ecg.dx import DxMetrics

            return DxMetrics(s["classes"])
        return ECGMetrics(s["classes"], s["target"], int(s["step"]))

    def report(self, run_dir: Path, metric: ECGMetrics, data: DataSplits) -> dict[str, str]:
        """Confusion matrices and an ECG strip coloured by predicted rhythm; returns {what: relative path}."""
        from cnnapps.tasks.ecg.plots import plot_confusion_matrices, plot_example_strip

        if data.state["target"] == "beats":
            from cnnapps.tasks.ecg.beats import beat_report

            return beat_report(run_dir, metric, data)
        if data.state["target"] == "dx":
            return _dx_report(Path(run_dir), metric, data)
        run_dir = Path(run_dir)
        artifacts = metric.artifacts()
        out = plot_confusion_matrices(artifacts, run_dir, data.state["target"])
        (run_dir / "data_summary.json").write_text(json.dumps(_data_summary(data, artifacts), indent=2) + "\n")
        out["data summary (split sizes, skipped records, confusion matrix)"] = "data_summary.json"
        dataset = data.test if data.test is not None else data.val
        if dataset is not None:
            strip = plot_example_strip(artifacts, dataset, data.state, run_dir / "ecg_strip.png")
            if strip is not None:
                out["ECG strip coloured by predicted rhythm"] = strip.name
        return out

    def bench_report(self, cfg: ECGConfig, run_dir: Path, results_dir: Path, key: str,
                     data_root: Path | None = None) -> dict[str, Any]:
        """The headline facts of a finished run for its results section: the network actually trained, the label
        file, the split and the record-level rule, the confusion matrix; the default run's strip and confusion
        pictures are copied into ``results_dir``; for beats, ours beside de Chazal et al. (2004). See
        ``cnnapps.tasks.ecg.bench.headline``."""
        from cnnapps.tasks.ecg.bench import headline

        if cfg.data.target == "dx":  # the record-rhythm headline (confusion matrix, challenge F1) does not apply
            return {}
        report = headline(self, cfg, Path(run_dir), Path(results_dir), key)
        if cfg.data.target == "beats" and (Path(run_dir) / "metrics.json").is_file():  # ours beside de Chazal's
            from cnnapps.tasks.ecg.beats import comparison_table

            test = json.loads((Path(run_dir) / "metrics.json").read_text())
            report.setdefault("tables", []).append(comparison_table(test))
        return report

    def callbacks(self, cfg: ECGConfig) -> list[Any]:
        """The dx target's per-class threshold calibration after each validation pass."""
        if cfg.data.target == "dx":
            from cnnapps.tasks.ecg.dx import CalibrateDxThresholds

            return [CalibrateDxThresholds()]
        return []

    # ---- predict
    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--lead", default=None,
                            help="signal name to read (default: the training lead if the record has it, else the "
                                 "first signal)")
        parser.add_argument("--plot", action="store_true", help="draw each ECG coloured by predicted rhythm")
        parser.add_argument("--steps", action="store_true",
                            help="add each record's per-step class probabilities (one row of probabilities per "
                                 "256 samples at the model rate; step_s says how long a step is)")
        parser.add_argument("--answers", type=Path, default=None, metavar="FILE",
                            help="also write a CinC-style answers file: one 'record,label' line per record read "
                                 "(a folder given as input is searched for records); for a 12-lead (dx) model "
                                 "the label is the predicted SNOMED CT codes joined by commas as on a header's "
                                 "# Dx: line. Records that fail are left out and named in their error rows")

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: ECGConfig, device: torch.device,
                plot: bool = False, out_dir: str | Path | None = None, lead: str | None = None,
                steps: bool = False, answers: str | Path | None = None, **kw: Any) -> Iterator[dict]:
        """One dict per WFDB record (any sampling rate and lead count; a folder stands for every record below
        it): ``input`` (the record as given or found), fs, lead, leads (read), duration_s, label, probabilities
        (mean over the record), segments [{start_s, end_s, rhythm}] of equal consecutive steps; ``picture`` (the
        strip drawn, with ``plot``); ``error`` instead for a record that cannot be read. ``steps``: also
        ``step_s`` and ``steps`` (per-step probabilities, (steps, classes) as lists). A dx (12-lead) model gives
        ``labels`` {class: probability} of every class at or above its threshold, ``codes`` (their SNOMED CT
        codes) and ``probabilities`` of every class instead of label and segments. A beats model gives instead
        beat_counts {class: n} and beats [{time_s, class, p}], one per R-peak detected
        (``cnnapps.tasks.ecg.beats.classify_beats``). ``answers``: a file of ``record,label`` lines, written when
        every input has been read."""
        from cnnapps.tasks.ecg.prepare import read_for_model

        if answers is not None and state["target"] == "beats":
            raise ConfigError("--answers: a beats model labels beats, not records")
        classes, step, fs = list(state["classes"]), int(state["step"]), int(state["fs"])
        params = _params(state)
        chunk = int(state.get("eval_window") or 0) or 2 ** 18  # bounded memory for half-hour records
        dx = state["target"] == "dx"
        model.eval()
        lines: list[str] = []
        for path in _expand_records(inputs):
            try:
                record, raw, fs_in, choice, x = read_for_model(
                    path, _model_leads(state), max(1, int(state.get("n_leads") or state.get("in_chans", 1))),
                    lead, params)
                lead_name = choice.names[0]
            except (RecordSkip, ValueError) as exc:  # ValueError: a --lead list that repeats a lead
                yield {"input": path, "error": f"{getattr(exc, 'reason', 'bad_lead')}: {exc}"}
                continue
            facts = {"fs": fs_in, "lead": lead_name, "leads": list(choice.names),
                     "duration_s": round(len(raw) / fs_in, 3)}
            if state["target"] == "beats":
                yield _predict_beats(model, x, state, device, path, record, facts)
                continue
            logits = _predict_logits(model, x, chunk, step, device)[:n_valid_steps(len(x), step)]
            duration = len(raw) / fs_in
            if dx:
                row = _dx_row(model, logits, state, path, facts)
                answer = ",".join(row["codes"])
                step_probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
            else:
                probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
                step_probs = probs
                mean = probs.mean(0)
                pred = probs.argmax(1)
                row = {"input": path, **facts, "label": classes[int(mean.argmax())],
                       "probabilities": {c: round(float(p), 4) for c, p in zip(classes, mean)},
                       "segments": [{"start_s": round(a, 3), "end_s": round(min(b, duration), 3),
                                     "rhythm": classes[c]} for a, b, c in merge_segments(pred, step / fs)]}
                answer = row["label"]
            if steps:
                row["step_s"] = step / fs
                row["steps"] = np.round(step_probs, 4).tolist()
            if plot:
                from cnnapps.tasks.ecg.plots import plot_ecg_strip, signal_in_millivolts

                folder = Path(out_dir or ".")
                folder.mkdir(parents=True, exist_ok=True)
                mv, units = signal_in_millivolts(raw[:, 0], fs_in, fs, x[:, 0])
                shown = step_probs.argmax(1)
                title = (f"{Path(record).name} ({lead_name}): "
                         f"{', '.join(row['labels']) or 'no scored class' if dx else row['label']}")
                png = plot_ecg_strip(mv, fs, shown, classes, folder / f"{Path(record).name}.png", step=step,
                                     title=title, units=units)
                row["picture"] = str(png)
            lines.append(f"{Path(record).name},{answer}")
            yield row
        if answers is not None:
            target = Path(answers)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(f"{ln}\n" for ln in lines))
            log.info("wrote %s (%d records)", target, len(lines))

    # ---- bench hook
    def bench_extra(self, cfg: ECGConfig, data_root: Path) -> dict[str, float]:
        """Windows per second from the prepared cache and from WFDB files (see ``cnnapps.tasks.ecg.bench``); for
        the beats target, the QRS detector's Se and +P on the test records (``cnnapps.tasks.ecg.qrs``)."""
        from cnnapps.tasks.ecg.bench import windows_per_second_cache, windows_per_second_wfdb

        s = _settings(cfg, None)
        cache = prepare_source(dataset_source(Path(data_root), s["dataset"]), _params(s))
        if s["target"] == "beats":  # the QRS detector on the test records instead of crop throughput
            from cnnapps.tasks.ecg.qrs import detector_scores

            return detector_scores(cache, records_by_name(cache, cfg.data.test_records, "data.test_records"))
        return {"windows_per_s_cache": windows_per_second_cache(cache, s["window"]),
                "windows_per_s_wfdb": windows_per_second_wfdb(cache, s["window"])}

    def deployment_example(self) -> tuple[str, nn.Module, tuple[int, ...]]:
        """The default config's model (its backbone and per-step head, the four CinC classes) on one training
        crop, for ``bench --deploy``."""
        cfg = ECGConfig()
        model = self.build_model(cfg, DataSplits(None, None, None, state={"classes": ["N", "A", "O", "~"],
                                                                          "step": STEP, "in_chans": 1}))
        return (f"ecg default ({cfg.model.backbone}, width {cfg.model.width}, {cfg.model.num_blocks} blocks)",
                model.eval(), (1, cfg.data.window))

    def speed_measurements(self, data_root: Path | None) -> dict[str, Any]:
        """The default config's training windows/s from the prepared cache against per-window WFDB reads (needs
        the data; nothing without it)."""
        if data_root is None:
            return {}
        out: dict[str, Any] = {k: round(v, 1) for k, v in self.bench_extra(self.Config(), data_root).items()}
        out["cache_speedup"] = round(out["windows_per_s_cache"] / out["windows_per_s_wfdb"], 1)
        return out


def _data_summary(data: DataSplits, artifacts: dict[str, Any]) -> dict[str, Any]:
    """What the numbers rest on, for data_summary.json: records per split, the preparation's skips by reason,
    duplicates left out, labelled steps per class in each split, loss weights and the evaluated confusion
    matrix (rows: truth; records for the record target, steps otherwise)."""
    s = data.state
    splits = [(k, ds) for k, ds in (("train", data.train), ("val", data.val), ("test", data.test)) if ds is not None]
    cache = splits[0][1].cache if splits else None
    step_counts = {k: step_class_counts(ds.labeler, ds.cache, ds.records, len(s["classes"]), int(s["step"])).tolist()
                   for k, ds in splits}
    return {"records": {k: int(len(ds.records)) for k, ds in splits},
            "skipped_at_preparation": dict(data.skipped),
            "leads_read": leads_read(cache) if cache is not None else None,
            "duplicates_removed": s.get("duplicates_removed", []),
            "label_file": cache.index.get("reference") if cache is not None else None,
            "label_counts": cache.index.get("label_counts") if cache is not None else None,
            "classes": list(s["classes"]),
            "step_counts": step_counts,
            "train_step_counts": s.get("train_step_counts"),
            "class_weights": s.get("class_weights"),
            "confusion": {"of": "records" if s["target"] == "record" else "steps",
                          "rows": "truth", "matrix": np.asarray(artifacts["confusion"]).tolist()}}


def _lead_in_record(record: str, lead: str) -> str:
    """The training lead if this record has it, else "" (its first signal)."""
    if not lead:
        return ""
    import wfdb

    try:
        names = list(wfdb.rdheader(record).sig_name)
        choose_lead(names, lead, record)
        return lead
    except RecordSkip:
        log.warning("%s has no lead %s; using its first ECG signal", record, lead)
        return ""
    except Exception:  # unreadable header: read_lead reports it with the reason
        return lead


def _predict_beats(model: nn.Module, x: np.ndarray, state: dict, device: torch.device, path: str, record: str,
                   row: dict[str, Any]) -> dict[str, Any]:
    """``predict``'s row for a beats model: R-peaks detected, each beat classified (``row`` holds the record's
    facts); an error row when no two R-peaks are found."""
    from cnnapps.tasks.ecg.beats import beat_rows, classify_beats
    from cnnapps.tasks.ecg.qrs import QRSDetectionError

    try:
        pred = classify_beats(model, x, state, device, where=record)
    except QRSDetectionError as exc:
        return {"input": path, "error": f"no_beats: {exc}"}
    return {"input": path, **row, **beat_rows(pred, state)}


def _predict_logits(model: nn.Module, x: np.ndarray, chunk: int, step: int, device: torch.device) -> np.ndarray:
    """Per-step logits of a whole prepared signal (time,) or (time, leads), in chunks of ``chunk`` samples:
    float32 (steps, classes)."""
    x = x[:, None] if x.ndim == 1 else x
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), chunk):
            piece = x[start:start + chunk]
            padded = np.zeros((x.shape[1], -(-len(piece) // step) * step), dtype=np.float32)
            padded[:, :len(piece)] = piece.T
            logits = model(torch.from_numpy(padded)[None].to(device))
            out.append(logits.float()[0].T.cpu().numpy())
    return np.concatenate(out)


def _expand_records(inputs: list[str]) -> Iterator[str]:
    """The inputs, with each folder replaced by the records below it (every ``*.hea``, sorted, without suffix)."""
    for path in inputs:
        if Path(path).is_dir():
            found = sorted(Path(path).rglob("*.hea"))
            if not found:
                yield path  # read_leads reports it (missing_record)
            for hea in found:
                yield str(hea.with_suffix(""))
        else:
            yield path


def _dx_row(model: nn.Module, logits: np.ndarray, state: dict, path: str, facts: dict) -> dict[str, Any]:
    """``predict``'s row for a dx model: the steps' logits pooled as in training, each class's probability, the
    classes at or above their thresholds (highest first) and their SNOMED CT codes."""
    from cnnapps.tasks.ecg.cinc2021 import class_table
    from cnnapps.tasks.ecg.dx import dx_answer, pool_steps

    net = unwrap(model)
    record_logit = pool_steps(torch.from_numpy(logits).T[None], None, how=str(state.get("pool", "mean")))[0]
    probs = torch.sigmoid(record_logit).numpy().astype(float)
    if isinstance(getattr(net, "thresholds", None), torch.Tensor):
        thresholds = net.thresholds.detach().cpu().numpy().astype(float)
    elif state.get("thresholds") is not None:  # an exported model: the thresholds its JSON saved
        thresholds = np.asarray(state["thresholds"], dtype=float)
    else:
        log.warning("the model carries no calibrated thresholds; classes are called at p >= 0.5")
        thresholds = np.full(len(state["classes"]), 0.5)
    classes = list(state["classes"])
    order = np.argsort(-probs)
    return {"input": path, **facts,
            "labels": {classes[i]: round(float(probs[i]), 4) for i in order if probs[i] >= thresholds[i]},
            "codes": dx_answer(class_table(state["label_set"]), probs, thresholds),
            "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)}}


def _dx_report(run_dir: Path, metric: Any, data: DataSplits) -> dict[str, str]:
    """The dx target's report files: thresholds.json (per class, chosen on validation) and data_summary.json
    (records per split, skips, records per class, loss weights)."""
    s = data.state
    art = metric.artifacts()
    values = metric.compute()
    names = list(art["class_names"])
    (run_dir / "thresholds.json").write_text(json.dumps(
        {"thresholds": dict(zip(names, [round(float(t), 4) for t in art["thresholds"]])),
         "from": "the best F1 per class on the validation records, chosen with the evaluated weights"},
        indent=2) + "\n")
    splits = [(k, ds) for k, ds in (("train", data.train), ("val", data.val), ("test", data.test)) if ds is not None]
    cache = splits[0][1].cache if splits else None
    summary = {"records": {k: int(len(ds.records)) for k, ds in splits},
               "skipped": dict(data.skipped), "unscored_records": s.get("unscored_records"),
               "unscored": s.get("unscored"), "label_set": s.get("label_set"),
               "leads_read": leads_read(cache) if cache is not None else None,
               "classes": names, "train_label_counts": s.get("train_label_counts"),
               "pos_weight": s.get("class_weights"),
               "evaluated": {"records": int(len(art["targets"])),
                             "positives": dict(zip(names, np.asarray(art["targets"]).sum(0).astype(int).tolist())),
                             "macro_f1": values.get("macro_f1"), "auroc_macro": values.get("auroc_macro")}}
    (run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"thresholds": "thresholds.json", "data summary (split sizes, skipped records, labels)":
            "data_summary.json"}
