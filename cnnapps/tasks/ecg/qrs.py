"""R-peak (QRS) detection for records without beat annotations, and its score against reference annotations.

The detector is ``wfdb.processing.XQRS`` (already a dependency through ``wfdb``): run on the prepared signal (the
model's sampling rate, normalised), its detections sit on the annotated R-peaks (median offset 0 samples on
MIT-BIH DS2), so the beat windows cut around them are the windows the classifier was trained on. Scoring follows
ANSI/AAMI EC57: a detection matches a reference beat within 150 ms (``wfdb.processing.compare_annotations``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnapps.tasks.ecg.prepare import PreparedCache

log = logging.getLogger(__name__)

MATCH_WINDOW_S = 0.150  # EC57's beat-matching window


class QRSDetectionError(ValueError):
    """The detector found no usable R-peaks in a signal; the message names the record."""


def detect_r_peaks(signal: np.ndarray, fs: float, where: str = "signal") -> np.ndarray:
    """R-peak sample indices (sorted, unique, int64 (n,)) of one ECG lead ``signal`` (time,) at ``fs`` Hz.

    Raises QRSDetectionError naming ``where`` when the detector fails or finds fewer than two peaks (no RR
    interval, so no beat can be classified).
    """
    from wfdb import processing

    x = np.asarray(signal, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{where}: detect_r_peaks wants one lead (time,), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise QRSDetectionError(f"{where}: the signal holds NaN or infinite samples")
    try:
        detector = processing.XQRS(sig=x, fs=float(fs))
        detector.detect(verbose=False)
    except Exception as exc:  # XQRS raises bare errors on signals too short for its learning period
        raise QRSDetectionError(f"{where}: QRS detection failed ({type(exc).__name__}: {exc})") from exc
    peaks = np.unique(np.asarray(detector.qrs_inds, dtype=np.int64))
    if len(peaks) < 2:
        raise QRSDetectionError(f"{where}: {len(peaks)} R-peak(s) detected in {len(x) / fs:.1f} s; at least two "
                                "are needed (is this an ECG lead?)")
    return peaks


@dataclass
class QRSScore:
    """Beat-by-beat detection counts (EC57): ``se`` = tp / (tp + fn), ``ppv`` = tp / (tp + fp)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def se(self) -> float:
        return self.tp / max(self.tp + self.fn, 1)

    @property
    def ppv(self) -> float:
        return self.tp / max(self.tp + self.fp, 1)

    def __add__(self, other: "QRSScore") -> "QRSScore":
        return QRSScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def score_detections(reference: np.ndarray, detected: np.ndarray, fs: float,
                     window_s: float = MATCH_WINDOW_S) -> QRSScore:
    """Match ``detected`` to ``reference`` sample indices within ``window_s`` (one-to-one, nearest first)."""
    from wfdb import processing

    reference = np.asarray(reference, dtype=np.int64)
    detected = np.asarray(detected, dtype=np.int64)
    if not len(reference) or not len(detected):
        return QRSScore(0, len(detected), len(reference))
    cmp = processing.compare_annotations(reference, detected, int(round(window_s * fs)))
    return QRSScore(int(cmp.tp), int(cmp.fp), int(cmp.fn))


def detector_scores(cache: PreparedCache, records: Sequence[int]) -> dict[str, float]:
    """XQRS on the prepared signal of each of ``records`` (indices into a ``PreparedCache`` with beat
    annotations) against every annotated beat: gross Se and +P over the records, counts and seconds."""
    total = QRSScore()
    t0 = time.perf_counter()
    worst = (1.0, "")
    for r in records:
        name = cache.records[r].name
        signal = np.asarray(cache.signal(r), dtype=np.float64)
        if signal.ndim > 1:  # several leads: the detector runs on the first (the trained lead)
            signal = signal[0]
        reference = cache.beats(r)[:, 0]
        try:
            detected = detect_r_peaks(signal, cache.fs, name)
        except QRSDetectionError as exc:
            log.warning("%s", exc)
            detected = np.zeros(0, np.int64)
        score = score_detections(reference, detected, cache.fs)
        worst = min(worst, (min(score.se, score.ppv), name))
        total = total + score
    return {"qrs_se": round(total.se, 5), "qrs_ppv": round(total.ppv, 5), "qrs_tp": total.tp, "qrs_fp": total.fp,
            "qrs_fn": total.fn, "qrs_records": len(records), "qrs_worst_record": worst[1],
            "qrs_seconds": round(time.perf_counter() - t0, 1)}
