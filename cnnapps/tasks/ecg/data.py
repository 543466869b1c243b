"""ECG datasets over a prepared memmap cache: per-step labels, training crops with augmentation, evaluation
tiling, padding collate, splits (stratified CinC, inter-patient MIT-BIH) and class weights.

Conventions shared with the metric and the model:

- A *step* is ``step`` (256) samples, the network's total stride: the model emits one label per step.
- An item is ``{"x": float32 (leads, time), "y": int64 (ceil(time_real / step),), "record": int, "offset": int,
  "length": int}``: ``record`` indexes the cache's records (the same index in every split), ``offset`` is the
  item's first step within its record, ``length`` the real (unpadded) samples in ``x``. ``y`` is -100 where a
  step has no label: padding, samples before a record's first rhythm annotation, rhythms mapped to nothing.
- A step belongs to the signal when its centre sample is real (``n_valid_steps``); a record's label is
  broadcast over those steps (CinC), or each step gets the rhythm in force at its centre (MIT-BIH rhythm).
  Beats (one example per beat, not per step) live in ``cnnapps.tasks.ecg.beats``.
- No item reads a WFDB file: everything comes from ``PreparedCache`` memmaps.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnapps.tasks.ecg.prepare import CINC_CLASSES, NO_RHYTHM, STEP, PreparedCache

log = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_RHYTHM_CLASSES = ("N", "AFIB", "AFL", "B", "T", "VT", "SVTA", "OTHER")


def n_steps(length: int, step: int = STEP) -> int:
    """Steps that touch ``length`` samples: ceil(length / step)."""
    return -(-int(length) // step)


def n_valid_steps(length: int, step: int = STEP) -> int:
    """Steps whose centre sample lies inside ``length`` real samples (the steps that count as signal)."""
    return max(0, (int(length) + step // 2 - 1) // step)


# ---------------------------------------------------------------- labels


def parse_aliases(aliases: Sequence[str]) -> dict[str, str]:
    """``["SBR=N", "AFL=AFIB"]`` -> {"SBR": "N", "AFL": "AFIB"}; raises ValueError on a malformed item."""
    out = {}
    for item in aliases:
        if "=" not in item:
            raise ValueError(f"data.rhythm_aliases: expected 'FROM=TO', got {item!r}")
        src, dst = (s.strip().lstrip("(") for s in item.split("=", 1))
        out[src] = dst
    return out


def rhythm_class_lookup(rhythm_names: Sequence[str], classes: Sequence[str], aliases: Sequence[str] = (),
                        other: str = "OTHER") -> np.ndarray:
    """Map cache rhythm codes to class indices: (256,) int64, IGNORE for unmapped codes and NO_RHYTHM.

    A rhythm name is first renamed by ``aliases``; if the result is a class it maps there, else to ``other``
    when ``other`` is one of ``classes``, else it is ignored (-100) in loss and metrics.
    """
    alias = parse_aliases(aliases)
    lookup = np.full(256, IGNORE, dtype=np.int64)
    for code, name in enumerate(rhythm_names):
        name = alias.get(name, name)
        if name in classes:
            lookup[code] = list(classes).index(name)
        elif other in classes:
            lookup[code] = list(classes).index(other)
    lookup[NO_RHYTHM] = IGNORE
    return lookup


class Labeler:
    """Per-step labels of a window of a record: ``(record, start, n_real, n_steps) -> int64 (n_steps,)``."""

    def __call__(self, record: int, start: int, n_real: int, steps: int) -> np.ndarray:
        return np.full(steps, IGNORE, dtype=np.int64)


class RecordLabeler(Labeler):
    """A record-level class (CinC) broadcast over the window's valid steps; -100 for records without one."""

    def __init__(self, record_classes: np.ndarray, step: int = STEP) -> None:
        self.record_classes = np.asarray(record_classes, dtype=np.int64)
        self.step = step

    def __call__(self, record: int, start: int, n_real: int, steps: int) -> np.ndarray:
        y = np.full(steps, IGNORE, dtype=np.int64)
        y[: n_valid_steps(n_real, self.step)] = self.record_classes[record]
        return y


class RhythmLabeler(Labeler):
    """The rhythm in force at each valid step's centre sample, mapped through ``lookup`` (rhythm_class_lookup)."""

    def __init__(self, cache: PreparedCache, lookup: np.ndarray, step: int = STEP) -> None:
        self.cache, self.lookup, self.step = cache, lookup, step

    def __call__(self, record: int, start: int, n_real: int, steps: int) -> np.ndarray:
        y = np.full(steps, IGNORE, dtype=np.int64)
        k = n_valid_steps(n_real, self.step)
        centres = start + np.arange(k) * self.step + self.step // 2
        y[:k] = self.lookup[np.asarray(self.cache.rhythm(record)[centres])]
        return y


def record_labels_for_cinc(cache: PreparedCache) -> np.ndarray:
    """Class index of each cache record's REFERENCE.csv label (IGNORE where it has none): (records,) int64."""
    return np.array([CINC_CLASSES.index(r.label) if r.label in CINC_CLASSES else IGNORE for r in cache.records],
                    dtype=np.int64)


# ---------------------------------------------------------------- augmentation


@dataclass
class Augment:
    """Train-time signal augmentation on normalised ECG (units: record standard deviations); 0 turns one off.

    ``scale``: amplitude times U(1 - scale, 1 + scale). ``wander``: add a sinusoid of amplitude U(0, wander),
    frequency U(0.05, 0.5) Hz and random phase (baseline wander from breathing and movement). ``noise``: add
    Gaussian noise of standard deviation U(0, noise). ``flip``: with this probability multiply the crop by -1
    (every lead together): hand-held devices such as AliveCor's record many ECGs upside down, so the rhythm, not
    the polarity, should carry the label. Random numbers come from torch's generator, which the engine reseeds per
    epoch (and DataLoader per worker), so runs repeat.
    """

    fs: int
    scale: float = 0.0
    wander: float = 0.0
    noise: float = 0.0
    flip: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (leads, time) of real samples only -> same shape."""
        if self.flip > 0 and float(torch.rand(())) < self.flip:
            x = -x
        if self.scale > 0:
            x = x * (1.0 + self.scale * (2.0 * torch.rand(()) - 1.0))
        t = x.shape[-1]
        if self.wander > 0:
            freq = 0.05 + 0.45 * torch.rand(())
            phase = 2 * math.pi * torch.rand(())
            time = torch.arange(t, dtype=torch.float32) / self.fs
            x = x + self.wander * torch.rand(()) * torch.sin(2 * math.pi * freq * time + phase)
        if self.noise > 0:
            x = x + self.noise * torch.rand(()) * torch.randn(x.shape)
        return x

    @property
    def active(self) -> bool:
        return self.scale > 0 or self.wander > 0 or self.noise > 0 or self.flip > 0


# ---------------------------------------------------------------- datasets


def _item(cache: PreparedCache, labeler: Labeler, record: int, start: int, n_real: int, total: int,
          step: int, augment: Augment | None) -> dict:
    x = torch.zeros(cache.n_leads, total, dtype=torch.float32)
    real = torch.from_numpy(np.array(cache.signals(record)[start:start + n_real].T, dtype=np.float32))
    if augment is not None and augment.active:
        real = augment(real)
    x[:, :n_real] = real
    y = torch.from_numpy(labeler(record, start, n_real, n_steps(total, step)))
    return {"x": x, "y": y, "record": record, "offset": start // step, "length": n_real}


class TrainWindows(Dataset):
    """Training crops of ``window`` samples (a multiple of ``step``) from the given records.

    Each record is cut into ceil(length / window) tiles, one item each, so an epoch sees about every sample once.
    With ``time_shift`` an item's start moves by U(-window/2, window/2) (clipped to the record); a record no
    longer than the window starts at a random sample below one step instead. Records shorter than the window are
    zero-padded and their padded steps labelled -100. ``x``: (leads, window), ``y``: (window // step,).
    """

    def __init__(self, cache: PreparedCache, records: Sequence[int], labeler: Labeler, window: int,
                 step: int = STEP, time_shift: bool = True, augment: Augment | None = None) -> None:
        if window <= 0 or window % step:
            raise ValueError(f"data.window must be a positive multiple of {step}, got {window}")
        self.cache, self.labeler, self.window, self.step = cache, labeler, window, step
        self.time_shift, self.augment = time_shift, augment
        self.records = np.asarray(records, dtype=np.int64)
        tiles = [(r, s) for r in self.records for s in range(0, max(cache.records[r].length, 1), window)]
        self.tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict:
        record, start = (int(v) for v in self.tiles[i])
        length = self.cache.records[record].length
        room = max(0, length - self.window)
        if self.time_shift:
            if room > 0:
                start += int(torch.randint(-self.window // 2, self.window // 2 + 1, ()))
            else:
                start = int(torch.randint(0, max(1, min(self.step, length - self.step + 1)), ()))
        start = min(max(start, 0), room) if room > 0 else min(max(start, 0), max(0, length - self.step))
        n_real = min(self.window, length - start)
        return _item(self.cache, self.labeler, record, start, n_real, self.window, self.step, self.augment)

    def tile_labels(self, i: int) -> np.ndarray:
        """Labels of tile ``i`` without a shift: (window // step,) int64 (for sample weights)."""
        record, start = (int(v) for v in self.tiles[i])
        n_real = min(self.window, self.cache.records[record].length - start)
        return self.labeler(record, start, n_real, self.window // self.step)


class EvalWindows(Dataset):
    """Deterministic evaluation: every sample of every record exactly once.

    ``window`` 0: one item per whole record; else records are tiled into consecutive windows of ``window``
    samples (a multiple of ``step``, so steps keep the record's step grid) and the last one is shorter. Items
    are unpadded (``collate_windows`` pads a batch to its longest item) and ordered by length so batches waste
    little padding; the metric puts windows back together by (record, offset).
    """

    def __init__(self, cache: PreparedCache, records: Sequence[int], labeler: Labeler, window: int = 0,
                 step: int = STEP) -> None:
        if window < 0 or window % step:
            raise ValueError(f"data.eval_window must be 0 or a multiple of {step}, got {window}")
        self.cache, self.labeler, self.window, self.step = cache, labeler, window, step
        self.records = np.asarray(records, dtype=np.int64)
        items = []
        for r in self.records:
            length = cache.records[r].length
            size = window or length
            items += [(r, s, min(size, length - s)) for s in range(0, length, size)]
        items.sort(key=lambda it: (it[2], it[0], it[1]))
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        record, start, n_real = (int(v) for v in self.items[i])
        return _item(self.cache, self.labeler, record, start, n_real, n_real, self.step, None)


def collate_windows(batch: list[dict], step: int = STEP) -> dict[str, torch.Tensor]:
    """Stack items, zero-padding ``x`` to the longest item rounded up to a whole step and ``y`` with -100.

    Returns x (batch, leads, time), y (batch, time // step), record, offset, length (batch,) int64.
    """
    total = max(n_steps(item["x"].shape[-1], step) for item in batch) * step
    leads = batch[0]["x"].shape[0]
    x = torch.zeros(len(batch), leads, total, dtype=torch.float32)
    y = torch.full((len(batch), total // step), IGNORE, dtype=torch.int64)
    for i, item in enumerate(batch):
        x[i, :, : item["x"].shape[-1]] = item["x"]
        y[i, : item["y"].shape[0]] = item["y"]
    as_long = lambda key: torch.tensor([int(item[key]) for item in batch], dtype=torch.int64)  # noqa: E731
    return {"x": x, "y": y, "record": as_long("record"), "offset": as_long("offset"), "length": as_long("length")}


# ---------------------------------------------------------------- splits and weights


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int, max_records: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record indices (into ``labels``) for train/val/test, stratified by label, repeatable for a seed.

    ``fractions``: (train, val, test), summing to 1 (val or test may be 0). ``max_records`` > 0 first draws a
    stratified subset of that many records (CI runs). Records with label IGNORE are left out.
    """
    from sklearn.model_selection import train_test_split

    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"data.fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    idx = np.flatnonzero(labels != IGNORE)
    lab = labels[idx]
    if max_records and max_records < len(idx):
        idx, _, lab, _ = train_test_split(idx, lab, train_size=max_records, stratify=lab, random_state=seed)
    _, f_val, f_test = fractions
    empty = np.zeros(0, dtype=np.int64)
    test = empty
    if f_test > 0:
        idx, test, lab, _ = train_test_split(idx, lab, test_size=f_test, stratify=lab, random_state=seed)
    val = empty
    if f_val > 0:
        idx, val, lab, _ = train_test_split(idx, lab, test_size=f_val / (1.0 - f_test), stratify=lab,
                                            random_state=seed + 1)
    return np.sort(idx), np.sort(val), np.sort(test)


def duplicate_records(cache: PreparedCache, records: Sequence[int] | None = None) -> list[list[int]]:
    """Groups of records whose prepared samples are byte-identical (same length and values), found by a content
    hash rather than by name: [[first, copy, ...], ...] in cache order, each group sorted, only groups of two or
    more. Identical raw records prepare to identical samples, so this finds the exact duplicates of a data set
    (CinC 2017 holds two such pairs)."""
    import hashlib

    by_hash: dict[tuple[int, bytes], list[int]] = {}
    for r in (range(len(cache)) if records is None else records):
        x = np.ascontiguousarray(cache.signals(int(r)))
        by_hash.setdefault((len(x), hashlib.blake2b(x.tobytes(), digest_size=16).digest()), []).append(int(r))
    return sorted(sorted(g) for g in by_hash.values() if len(g) > 1)


def records_by_name(cache: PreparedCache, names: Sequence[str], what: str) -> np.ndarray:
    """Cache indices of the named records; a name the cache lacks is logged (skipped at preparation) and left out."""
    where = {n: i for i, n in enumerate(cache.names)}
    missing = [n for n in names if n not in where]
    if missing:
        log.warning("%s: record(s) %s not in the prepared cache (skipped at preparation: %s)", what,
                    ", ".join(missing), {n: r for r, ns in cache.skipped.items() for n in ns if n in missing})
    return np.asarray([where[n] for n in names if n in where], dtype=np.int64)


def step_class_counts(labeler: Labeler, cache: PreparedCache, records: Sequence[int], num_classes: int,
                      step: int = STEP) -> np.ndarray:
    """Labelled steps per class over whole records: (num_classes,) int64."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for r in records:
        length = cache.records[int(r)].length
        y = labeler(int(r), 0, length, n_steps(length, step))
        counts += np.bincount(y[y >= 0], minlength=num_classes)[:num_classes]
    return counts


def class_weights(counts: np.ndarray, mode: str = "inverse", max_weight: float = 10.0) -> np.ndarray:
    """Loss weights per class from training counts: (classes,) float32.

    ``inverse``: total / (classes present x count), 1 for a balanced set; ``sqrt``: its square root (milder);
    ``none``: ones. Clipped to [1 / max_weight, max_weight] so a class with a handful of examples cannot dominate;
    absent classes get 1 (they never occur as a target).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "none":
        return np.ones(len(counts), dtype=np.float32)
    if mode not in ("inverse", "sqrt"):
        raise ValueError(f"data.class_weighting must be none, inverse or sqrt, got {mode!r}")
    present = counts > 0
    w = np.ones(len(counts))
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    if mode == "sqrt":
        w = np.sqrt(w)
    return np.clip(w, 1.0 / max_weight, max_weight).astype(np.float32)


def tile_sample_weights(dataset: TrainWindows, weights: np.ndarray) -> torch.Tensor:
    """One sampling weight per training item: the largest class weight among its tile's labels (a tile holding a
    short VT run is drawn as often as one full of VT); tiles without labels get the smallest weight."""
    out = np.empty(len(dataset), dtype=np.float64)
    for i in range(len(dataset)):
        y = dataset.tile_labels(i)
        y = y[y >= 0]
        out[i] = weights[y].max() if len(y) else weights.min()
    return torch.as_tensor(out, dtype=torch.double)


def merge_segments(steps: np.ndarray, seconds_per_step: float) -> list[tuple[float, float, int]]:
    """Runs of equal consecutive step classes: [(start_s, end_s, class index)], in time order."""
    steps = np.asarray(steps)
    if not len(steps):
        return []
    cuts = np.flatnonzero(np.diff(steps)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(steps)]])
    return [(float(a * seconds_per_step), float(b * seconds_per_step), int(steps[a])) for a, b in zip(starts, ends)]
