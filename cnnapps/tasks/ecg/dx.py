"""The ``dx`` target: record-level multi-label diagnoses of 12-lead records (PhysioNet/CinC Challenge 2020/2021).

Each record's label is the SNOMED CT codes of its header's ``# Dx:`` line (kept in the prepared cache as
written); they map to the Challenge's scored classes (``cnnapps.tasks.ecg.cinc2021``), equivalent codes merged.
The network is the per-step sequence model of the other targets; its per-step logits are pooled over the
record's real steps (mean, or max) into one logit per class, trained with binary cross-entropy (per-class
``pos_weight`` from the training labels). Per-class thresholds are chosen on the validation records after
every validation pass (the F1-maximising one per class) and kept in the model's ``thresholds`` buffer, so every
checkpoint, ``evaluate`` and ``predict`` apply its own epoch's thresholds.

Records whose codes hold no scored class are kept as all-negative examples (``data.unscored = "negative"``, the
default: a record that has none of the scored diagnoses is information about them) or left out before the split
and counted as ``no_scored_label`` (``"skip"``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cnnapps.engine.callbacks import Callback
from cnnapps.engine.config import ConfigError
from cnnapps.engine.task import DataSplits, unwrap
from cnnapps.metrics.multilabel import MultiLabelMetrics
from cnnapps.tasks.ecg.cinc2021 import ScoredClass, class_table, multi_hot
from cnnapps.tasks.ecg.data import (Augment, EvalWindows, Labeler, TrainWindows, collate_windows, n_valid_steps)
from cnnapps.tasks.ecg.prepare import STEP, PreparedCache

log = logging.getLogger(__name__)

POOLS = ("mean", "max")


def record_codes(cache: PreparedCache, i: int) -> list[str]:
    """The SNOMED CT codes of record ``i`` of a cache prepared with Dx labels ([] for none)."""
    label = cache.records[i].label or ""
    return [c for c in label.split(",") if c]


def dx_targets(cache: PreparedCache, classes: Sequence[ScoredClass]) -> np.ndarray:
    """0/1 per record and scored class: float32 (records, classes)."""
    return np.asarray([multi_hot(record_codes(cache, i), classes) for i in range(len(cache))], dtype=np.float32)


class DxItems(Dataset):
    """A window dataset of the prepared cache with each item's record-level targets beside it: the item of
    ``base`` plus ``targets`` float32 (classes,) and ``calib`` (True for the validation records, where the
    thresholds are chosen)."""

    def __init__(self, base: Dataset, targets: np.ndarray, calib: bool = False) -> None:
        self.base, self.targets, self.calib = base, targets, calib
        self.records = base.records
        self.cache = base.cache
        self.labeler = base.labeler

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        item["targets"] = torch.from_numpy(self.targets[int(item["record"])])
        item["calib"] = self.calib
        return item


def collate_dx(batch: list[dict]) -> dict[str, torch.Tensor]:
    """``collate_windows`` plus ``targets`` (batch, classes) float32 and ``calib`` (batch,) bool."""
    out = collate_windows(batch)
    out["targets"] = torch.stack([item["targets"] for item in batch])
    out["calib"] = torch.tensor([bool(item["calib"]) for item in batch])
    return out


def dx_split(n: int, fractions: Sequence[float], seed: int, max_records: int = 0, keep: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random train/val/test record indices (a multi-label set has no single label to stratify by):
    ``keep`` (bool per record) limits the pool; ``max_records`` > 0 first draws that many."""
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(np.ones(n, bool) if keep is None else keep)
    pool = rng.permutation(pool)
    if max_records:
        pool = pool[:max_records]
    n_test = int(round(len(pool) * fractions[2]))
    n_val = int(round(len(pool) * fractions[1]))
    test, val, train = pool[:n_test], pool[n_test:n_test + n_val], pool[n_test + n_val:]
    return np.sort(train), np.sort(val), np.sort(test)


def pos_weights(targets: np.ndarray, mode: str, max_weight: float) -> np.ndarray:
    """BCE ``pos_weight`` per class from training targets (records, classes): negatives / positives
    (``inverse``), its square root (``sqrt``) or ones (``none``), clipped to [1, max_weight]; 1 for a class
    without positives."""
    pos = targets.sum(0)
    neg = len(targets) - pos
    w = np.ones(targets.shape[1])
    if mode != "none":
        have = pos > 0
        w[have] = neg[have] / pos[have]
        if mode == "sqrt":
            w = np.sqrt(w)
    return np.clip(w, 1.0, max_weight).astype(np.float32)


def build_dx_data(d: Any, s: dict, cache: PreparedCache, split: str | None, state: dict | None) -> DataSplits:
    """Train/val/test (``split='all'``: every record in test) over a cache prepared with Dx labels. Items: the
    window items of ``cnnapps.tasks.ecg.data`` plus ``targets`` (classes,) and ``calib``."""
    classes = class_table(s["label_set"])
    targets = dx_targets(cache, classes)
    scored = targets.sum(1) > 0
    unscored = [cache.names[i] for i in np.flatnonzero(~scored)]
    keep = scored if s.get("unscored", "negative") == "skip" else np.ones(len(cache), bool)
    skipped = dict(cache.skip_counts())
    if s.get("unscored") == "skip" and unscored:
        skipped["no_scored_label"] = len(unscored)
        log.info("ECG cinc2021: %d record(s) without a scored diagnosis left out (data.unscored = skip): %s%s",
                 len(unscored), ", ".join(unscored[:10]), " ..." if len(unscored) > 10 else "")
    elif unscored:
        log.info("ECG cinc2021: %d record(s) without a scored diagnosis kept as all-negative", len(unscored))
    s["unscored_records"] = len(unscored)
    step = int(s["step"])
    label_none = Labeler()
    if split == "all":
        ids = np.flatnonzero(keep)
        test = DxItems(EvalWindows(cache, ids, label_none, 0, step), targets)
        return DataSplits(train=None, val=None, test=test, state=s, collate_fn=collate_dx, skipped=skipped)
    train_ids, val_ids, test_ids = dx_split(len(cache), d.fractions, d.split_seed, d.max_records, keep)
    if not len(train_ids):
        raise ConfigError(f"{cache.index.get('record_dir')}: no training records left (check data.fractions, "
                          "data.max_records and data.unscored)")
    log.info("ECG cinc2021/dx: %d train, %d val, %d test records (%d skipped at preparation: %s)", len(train_ids),
             len(val_ids), len(test_ids), sum(cache.skip_counts().values()), cache.skip_counts())
    augment = Augment(int(s["fs"]), d.aug_scale, d.aug_wander, d.aug_noise, d.aug_flip) if d.augment else None
    train = DxItems(TrainWindows(cache, train_ids, label_none, int(s["window"]), step, time_shift=d.time_shift,
                                 augment=augment), targets)
    # whole records at evaluation: one row per record for the record-level metric
    val = DxItems(EvalWindows(cache, val_ids, label_none, 0, step), targets, calib=True) if len(val_ids) else None
    test = DxItems(EvalWindows(cache, test_ids, label_none, 0, step), targets) if len(test_ids) else None
    if not (state and state.get("class_weights") is not None):
        s["class_weights"] = pos_weights(targets[train_ids], d.class_weighting, d.class_weight_max).tolist()
        s["train_label_counts"] = dict(zip([c.abbr for c in classes], targets[train_ids].sum(0).astype(int).tolist()))
        log.info("ECG cinc2021 training records per class %s; pos_weight %s", s["train_label_counts"],
                 dict(zip(s["classes"], np.round(s["class_weights"], 2).tolist())))
    s["split_sizes"] = {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids)}
    return DataSplits(train=train, val=val, test=test, state=s, collate_fn=collate_dx, skipped=skipped)


def pool_steps(logits: torch.Tensor, lengths: torch.Tensor | None, step: int = STEP, how: str = "mean"
               ) -> torch.Tensor:
    """Per-step logits (batch, classes, steps) -> record logits (batch, classes), over each item's real steps
    (those whose centre sample is real, ``n_valid_steps`` of ``lengths``; all steps when ``lengths`` is None)."""
    if lengths is None:
        valid = torch.ones(logits.shape[0], logits.shape[-1], dtype=torch.bool, device=logits.device)
    else:
        n = torch.tensor([max(1, n_valid_steps(int(v), step)) for v in lengths], device=logits.device)
        valid = torch.arange(logits.shape[-1], device=logits.device)[None, :] < n[:, None]
    mask = valid[:, None, :]
    if how == "max":
        return logits.masked_fill(~mask, float("-inf")).amax(-1)
    return (logits * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def attach_dx(model: nn.Module, num_classes: int, pool: str) -> nn.Module:
    """Give an ``ECGSequenceModel`` the dx target's ``thresholds`` buffer (saved with the weights: 0.5 until a
    validation pass calibrates them) and its pooling rule."""
    if pool not in POOLS:
        raise ConfigError(f"model.pool: unknown {pool!r} ({', '.join(POOLS)})")
    model.register_buffer("thresholds", torch.full((num_classes,), 0.5))
    model.pool = pool
    return model


def dx_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """BCE of the pooled record logits against ``targets``, with the model's ``class_weights`` as pos_weight."""
    net = unwrap(model)
    logits = pool_steps(model(batch["x"]), batch.get("length"), STEP, getattr(net, "pool", "mean"))
    targets = batch["targets"].to(logits.dtype)
    weights = net.class_weights
    pos_weight = weights.to(logits.dtype) if len(weights) == logits.shape[1] else None
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pos_weight)
    return {"loss": loss, "output": {"logits": logits, "thresholds": net.thresholds}}


class DxMetrics(MultiLabelMetrics):
    """The multi-label metrics (mAP, micro/macro F1 at per-class thresholds, per-class AP and F1; see
    ``cnnapps.metrics.multilabel``) plus per-class AUROC (scikit-learn, ``auroc_<class>``, left out for a class
    with only one truth value among the scored records) and their mean ``auroc_macro``."""

    def update(self, output: Any, batch: Any) -> None:
        super().update(output, {"y": batch["targets"], "calib": batch.get("calib")})

    def compute(self) -> dict[str, float]:
        from sklearn.metrics import roc_auc_score

        out = super().compute()
        probs, y, _ = self._evaluated()
        aurocs = []
        for c, name in enumerate(self.class_names):
            if len(y) and 0 < y[:, c].sum() < len(y):
                out[f"auroc_{name}"] = float(roc_auc_score(y[:, c], probs[:, c]))
                aurocs.append(out[f"auroc_{name}"])
        out["auroc_macro"] = float(np.mean(aurocs)) if aurocs else float("nan")
        return out


class CalibrateDxThresholds(Callback):
    """After each validation pass the per-class thresholds that maximise F1 on the validation records become the
    model's ``thresholds`` (as the multilabel task's callback of the same role), so each epoch's checkpoint
    carries thresholds chosen with its own weights. They go into the data state too (``thresholds``), which an
    exported model's JSON keeps, so ``predict --onnx`` applies them without the buffer."""

    def on_validation_end(self, trainer: Any, row: dict[str, Any]) -> None:
        calibrated = getattr(trainer.metric, "calibrated", None)
        net = unwrap(trainer.model)
        if trainer.is_rank0 and calibrated is not None and hasattr(net, "thresholds"):
            net.thresholds.copy_(torch.as_tensor(calibrated, dtype=net.thresholds.dtype))
            trainer.data.state["thresholds"] = [float(t) for t in calibrated]


def dx_answer(classes: Sequence[ScoredClass], probs: np.ndarray, thresholds: np.ndarray) -> list[str]:
    """The SNOMED CT code of each class whose probability reaches its threshold (the first code of a merged
    class), in the table's order."""
    return [cls.codes[0] for cls, p, t in zip(classes, probs, thresholds) if p >= t]
