"""ECG metrics: PhysioNet/CinC 2017 challenge F1 and sequence- and set-level F1 (Hannun et al. 2019), from per-step
logits of windows put back together per record. Per-beat AAMI scores: ``cnnapps.tasks.ecg.beats.BeatMetrics``."""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

from cnnapps.metrics.base import Metric
from cnnapps.tasks.ecg.data import IGNORE, n_steps, n_valid_steps
from cnnapps.tasks.ecg.prepare import STEP

log = logging.getLogger(__name__)


def metric_key(name: str) -> str:
    """A class name as it appears in metric keys: ``~`` -> ``noise``, other odd characters -> ``_``."""
    return "noise" if name == "~" else re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "class"


class ECGMetrics(Metric):
    """Accumulates per-step probabilities by (record, window offset) and scores them.

    ``update(output, batch)``: output = logits (batch, classes, steps); batch = the collated dict with ``y``
    (batch, steps), ``record``, ``offset`` and ``length`` (batch,). Windows of one record (and repeated windows,
    as DistributedSampler pads) are assembled by offset, so a record counts once however it was tiled.

    ``target``: ``record`` (CinC 2017: one label per record, ``challenge_f1`` = mean F1 of N, A, O with the record
    label taken from the mean probability over its valid steps; ``challenge_f1_majority`` from a majority vote of
    step predictions; ``challenge_f1_ci_low`` / ``_high``: a 95% bootstrap interval over records, see
    ``bootstrap_f1_interval``; ``auroc_<class>`` / ``auprc_<class>``: one class against the rest, scored by the
    record's mean probability, and their macro means) or ``rhythm``. Every target reports ``seq_f1``
    (F1 over labelled steps, per class then averaged weighted by class frequency, as Hannun et al.),
    ``seq_f1_macro`` (the plain mean over the classes present in the truth, so rare rhythms count as much as
    sinus rhythm), ``set_f1`` (per record, the set of classes predicted vs present over its labelled steps;
    per-class F1 over records, frequency-weighted) and ``seq_f1_<class>``. Beats are scored one example per beat
    in ``cnnapps.tasks.ecg.beats``.
    """

    def __init__(self, classes: Sequence[str], target: str = "record", step: int = STEP) -> None:
        if target not in ("record", "rhythm"):
            raise ValueError(f"unknown ECG target {target!r} (record, rhythm; beats: cnnapps.tasks.ecg.beats)")
        self.classes = list(classes)
        self.target, self.step = target, step
        self.reset()

    # ---- accumulation
    def reset(self) -> None:
        self._windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}

    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        probs = torch.softmax(output.detach().float(), dim=1).cpu().numpy()
        y = batch["y"].detach().cpu().numpy()
        records = batch["record"].detach().cpu().numpy()
        offsets = batch["offset"].detach().cpu().numpy()
        lengths = batch["length"].detach().cpu().numpy()
        for b in range(probs.shape[0]):
            k = min(n_steps(int(lengths[b]), self.step), probs.shape[2], y.shape[1])
            self._windows[(int(records[b]), int(offsets[b]))] = (
                probs[b, :, :k].T.copy(), y[b, :k].copy(), int(lengths[b]))

    def state(self) -> dict:
        return {"windows": self._windows}

    def merge(self, state: dict) -> None:
        self._windows.update(state["windows"])

    # ---- assembling records
    def _records(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """record -> (probs (steps, classes), labels (steps,), valid (steps,) bool), windows in offset order."""
        by_record: dict[int, list] = {}
        for (record, offset), window in self._windows.items():
            by_record.setdefault(record, []).append((offset, window))
        out = {}
        for record, windows in by_record.items():
            windows.sort(key=lambda w: w[0])
            probs = np.concatenate([w[1][0] for w in windows])
            labels = np.concatenate([w[1][1] for w in windows])
            valid = np.concatenate([np.arange(len(w[1][1])) < n_valid_steps(w[1][2], self.step) for w in windows])
            out[record] = (probs, labels, valid)
        return out

    # ---- scores
    def compute(self) -> dict[str, float]:
        records = self._records()
        values: dict[str, float] = {}
        k = len(self.classes)
        labels = list(range(k))
        true = np.concatenate([r[1] for r in records.values()]) if records else np.zeros(0, np.int64)
        pred = np.concatenate([r[0].argmax(1) for r in records.values()]) if records else np.zeros(0, np.int64)
        keep = true != IGNORE
        true, pred = true[keep], pred[keep]
        if len(true) == 0:
            log.warning("ECG metrics: no labelled steps to score")
        values["seq_f1"] = float(f1_score(true, pred, labels=labels, average="weighted", zero_division=0)) \
            if len(true) else 0.0
        per_class = f1_score(true, pred, labels=labels, average=None, zero_division=0) if len(true) \
            else np.zeros(k)
        for name, f in zip(self.classes, per_class):
            values[f"seq_f1_{metric_key(name)}"] = float(f)
        present = np.bincount(true, minlength=k)[:k] > 0 if len(true) else np.zeros(k, bool)
        values["seq_f1_macro"] = float(per_class[present].mean()) if present.any() else 0.0
        values["seq_accuracy"] = float((true == pred).mean()) if len(true) else 0.0
        values["set_f1"] = self._set_f1(records)
        if self.target == "record":
            values.update(self._record_scores(records))
        else:
            values["accuracy"] = values["seq_accuracy"]
        return values

    def _set_f1(self, records: dict) -> float:
        k = len(self.classes)
        rows_true, rows_pred = [], []
        for probs, labels, _ in records.values():
            lab = labels != IGNORE
            if not lab.any():
                continue
            t, p = np.zeros(k, bool), np.zeros(k, bool)
            t[labels[lab]] = True
            p[probs[lab].argmax(1)] = True
            rows_true.append(t)
            rows_pred.append(p)
        if not rows_true:
            return 0.0
        return float(f1_score(np.array(rows_true), np.array(rows_pred), average="weighted", zero_division=0))

    def _record_level(self, records: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], np.ndarray]:
        """(true, by mean probability, by majority vote, record ids, mean probabilities (records, classes)) over
        records with a label."""
        true, mean_pred, vote_pred, ids, mean_probs = [], [], [], [], []
        k = len(self.classes)
        for record, (probs, labels, valid) in sorted(records.items()):
            lab = labels[labels != IGNORE]
            if not len(lab) or not valid.any():
                continue
            true.append(int(np.bincount(lab, minlength=k).argmax()))
            mean_probs.append(probs[valid].mean(0))
            mean_pred.append(int(mean_probs[-1].argmax()))
            # ties go to the class with the larger mean probability, not the lower index
            votes = np.bincount(probs[valid].argmax(1), minlength=k).astype(np.float64)
            vote_pred.append(int((votes + 1e-6 * probs[valid].mean(0)).argmax()))
            ids.append(record)
        return (np.array(true, np.int64), np.array(mean_pred, np.int64), np.array(vote_pred, np.int64), ids,
                np.array(mean_probs, np.float64).reshape(-1, k))

    def _record_scores(self, records: dict) -> dict[str, float]:
        true, mean_pred, vote_pred, _, mean_probs = self._record_level(records)
        labels = list(range(len(self.classes)))
        out: dict[str, float] = {}
        if not len(true):
            return {"challenge_f1": 0.0, "challenge_f1_majority": 0.0, "accuracy": 0.0}
        f1 = f1_score(true, mean_pred, labels=labels, average=None, zero_division=0)
        f1_vote = f1_score(true, vote_pred, labels=labels, average=None, zero_division=0)
        scored = [i for i, c in enumerate(self.classes) if c in ("N", "A", "O")] or labels[:3]
        out["challenge_f1"] = float(np.mean(f1[scored]))
        out["challenge_f1_ci_low"], out["challenge_f1_ci_high"] = bootstrap_f1_interval(true, mean_pred, scored)
        out["challenge_f1_majority"] = float(np.mean(f1_vote[scored]))
        for name, f in zip(self.classes, f1):
            out[f"f1_{metric_key(name)}"] = float(f)
        out["accuracy"] = float((true == mean_pred).mean())
        out.update(ranking_scores(true, mean_probs, self.classes))
        return out

    # ---- for plots
    def artifacts(self) -> dict[str, Any]:
        """Confusion matrices (numpy, rows = truth), class names, and per-record step predictions.

        ``confusion``: records for the ``record`` target, steps otherwise; ``seq_confusion``: steps;
        ``record_steps``: {record: predicted class per step};
        ``record_probabilities``: {record: mean probability over valid steps (classes,)}.
        """
        records = self._records()
        k = len(self.classes)
        labels = list(range(k))
        true = np.concatenate([r[1] for r in records.values()]) if records else np.zeros(0, np.int64)
        pred = np.concatenate([r[0].argmax(1) for r in records.values()]) if records else np.zeros(0, np.int64)
        keep = true != IGNORE
        seq_cm = confusion_matrix(true[keep], pred[keep], labels=labels) if keep.any() else np.zeros((k, k), int)
        out: dict[str, Any] = {"classes": list(self.classes), "seq_confusion": seq_cm, "confusion": seq_cm,
                               "record_steps": {r: v[0].argmax(1) for r, v in records.items()},
                               "record_probabilities": {r: v[0][v[2]].mean(0) if v[2].any() else v[0].mean(0)
                                                        for r, v in records.items()}}
        if self.target == "record":
            rt, rp, _, _, _ = self._record_level(records)
            out["confusion"] = confusion_matrix(rt, rp, labels=labels) if len(rt) else np.zeros((k, k), int)
        return out


def bootstrap_f1_interval(true: np.ndarray, pred: np.ndarray, scored: Sequence[int], n_boot: int = 1000,
                          level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean F1 over the ``scored`` classes (the challenge F1), resampling
    records with replacement ``n_boot`` times (fixed ``seed``: the same predictions give the same interval).

    ``true``, ``pred``: (records,) class indices. Returns (low, high) at ``level``; (0, 0) without records. A
    class absent from a resample (no truth, no prediction) scores 0 there, as in the point estimate.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    n = len(true)
    if n == 0:
        return 0.0, 0.0
    # resample counts per record, (n_boot, n): one matrix product per class replaces n_boot confusion matrices
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    score = np.zeros(n_boot)
    for c in scored:
        t, p = true == c, pred == c
        tp, fp, fn = counts @ (t & p), counts @ (~t & p), counts @ (t & ~p)
        denom = 2 * tp + fp + fn
        score += np.divide(2 * tp, denom, out=np.zeros(n_boot), where=denom > 0)
    score /= max(len(scored), 1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(score, [alpha, 1.0 - alpha])
    return float(low), float(high)


def ranking_scores(true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Per class, one against the rest, from scores ``probs`` (records, classes): ``auroc_<class>`` (area under the
    ROC curve) and ``auprc_<class>`` (average precision, scikit-learn), left out for a class absent from ``true``
    or present everywhere; ``auroc_macro`` / ``auprc_macro``: their plain means."""
    out: dict[str, float] = {}
    aurocs, auprcs = [], []
    for c, name in enumerate(classes):
        positive = np.asarray(true) == c
        if positive.all() or not positive.any():
            continue
        aurocs.append(float(roc_auc_score(positive, probs[:, c])))
        auprcs.append(float(average_precision_score(positive, probs[:, c])))
        out[f"auroc_{metric_key(name)}"], out[f"auprc_{metric_key(name)}"] = aurocs[-1], auprcs[-1]
    if aurocs:
        out["auroc_macro"], out["auprc_macro"] = float(np.mean(aurocs)), float(np.mean(auprcs))
    return out
