"""Data-loading benchmark: training windows per second from the prepared memmap versus from WFDB files."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import wfdb
from scipy.signal import resample_poly

from cnnapps.tasks.ecg.prepare import PreparedCache, normalise


def _window_plan(cache: PreparedCache, window: int, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` random (record, start) pairs at the cache's rate, the same for both readers."""
    rng = np.random.default_rng(seed)
    records = rng.integers(0, len(cache), size=n)
    return [(int(r), int(rng.integers(0, max(1, cache.records[r].length - window + 1)))) for r in records]


def windows_per_second_cache(cache: PreparedCache, window: int = 6144, n: int = 2000, seed: int = 0) -> float:
    """Random ``window``-sample crops read from the memmap as the training dataset does (copy to a float32
    array): windows per second. The plan is read once untimed first, as every epoch after the first reads pages
    the operating system already holds; the WFDB reader gets the same warm-up, so neither side is timed on disk
    reads."""
    plan = _window_plan(cache, window, n, seed)

    def read_all() -> None:
        for r, s in plan:
            np.array(cache.signal(r)[s:s + window], dtype=np.float32)

    read_all()
    t0 = time.perf_counter()
    read_all()
    return n / (time.perf_counter() - t0)


def windows_per_second_wfdb(cache: PreparedCache, window: int = 6144, n: int = 200, seed: int = 0) -> float:
    """The same crops without a cache: ``wfdb.rdrecord(sampfrom, sampto)`` of the raw record at its own rate,
    then the resampling and normalisation preparation does (normalised by the window's own statistics, since
    the whole record is not read): windows per second."""
    plan = _window_plan(cache, window, n, seed)
    record_dir = Path(cache.index["record_dir"])
    fs = cache.fs
    for r, _ in plan:  # warm-up (see windows_per_second_cache): the files into the operating system's cache
        for part in record_dir.glob(f"{cache.records[r].name}.*"):
            part.read_bytes()
    t0 = time.perf_counter()
    for r, s in plan:
        info = cache.records[r]
        scale = info.orig_fs / fs
        start = int(s * scale)
        stop = min(info.orig_length, start + math.ceil(window * scale))
        rec = wfdb.rdrecord(str(record_dir / info.name), sampfrom=start, sampto=stop,
                            channel_names=[info.lead] if info.lead else None)
        x = rec.p_signal[:, 0]
        if info.orig_fs != fs:
            from fractions import Fraction

            ratio = Fraction(fs / info.orig_fs).limit_denominator(1000)
            x = resample_poly(x, ratio.numerator, ratio.denominator)
        normalise(x, cache.index["params"]["normalize"], cache.index["params"]["min_std"]).astype(np.float32)
    return n / (time.perf_counter() - t0)
