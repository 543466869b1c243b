"""Long recordings as timelines: an energy gate finds the stretches that hold sound above the background, windows
classify each stretch, and their probabilities are merged into timed segments and the recognised sequence.

The gate (a documented energy rule, no model): the signal at the model's rate is cut into frames of
``frame_seconds``; a frame's level is its mean power in dB (full scale = 0 dB), smoothed over three frames. The
background at a frame is the lowest level within ``background_seconds`` around it of the level averaged over
``background_smooth_seconds`` (minimum statistics: it follows slow changes of the room noise, not the words, and
a brief dip inside a word does not pull it down). With hysteresis, a stretch of sound is a run of
frames above the background + ``hold_margin_db`` that somewhere rises above the background + ``gate_margin_db``;
every threshold is at least ``gate_floor_db``. Stretches closer than ``min_gap_seconds`` are joined (the
closure of a "t" or "k" inside a word), runs shorter than ``min_speech_seconds`` are dropped (clicks), and a run
longer than ``max_segment_seconds`` is split at its quietest frame until every piece fits (two words with too
short a pause between them).

Each stretch is then classified by clip-length windows whose centres lie within ``+- min(time_shift, half the
stretch)`` of its centre, ``hop_seconds`` apart (the placements the model saw in training). A window holds the
stretch's samples (widened by ``pad_seconds``) and around them, with ``context = "background"``, the recording
itself with every other stretch zeroed, or with ``context = "zeros"`` zeros, as training clips are one word
padded with zeros; either way a neighbouring word never leaks in. The mean of a stretch's window probabilities
gives its label and confidence.

Memory is bounded for any length: the file is read twice, block by block (once for the levels, once for the
stretches' samples), so at most one block, one stretch's reach and one batch of windows are held, plus the level
track (one float per frame: 1.4 MB per hour at 10-ms frames) and one small record per stretch. No whole-file signal or
spectrogram is ever built."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnapps.tasks.audio.data import iter_audio_blocks

log = logging.getLogger(__name__)


@dataclass
class GateSettings:
    """The gate's and the windows' parameters (``AudioPredictConfig`` holds them with their help text)."""

    frame_seconds: float = 0.01
    gate_margin_db: float = 12.0
    hold_margin_db: float = 6.0
    gate_floor_db: float = -70.0
    background_seconds: float = 3.0
    background_smooth_seconds: float = 0.2
    min_gap_seconds: float = 0.1
    min_speech_seconds: float = 0.08
    max_segment_seconds: float = 1.0
    pad_seconds: float = 0.05
    context: str = "background"
    hop_seconds: float = 0.05
    max_shift_seconds: float = 0.15
    min_confidence: float = 0.0


@dataclass
class LevelTrack:
    """Frame levels of a whole file: ``db`` (frames,) float32 smoothed levels in dB full scale, ``frame`` samples
    per frame at ``sample_rate``, the file's length in ``samples`` (at that rate) and its peak |sample|."""

    db: np.ndarray
    frame: int
    sample_rate: int
    samples: int
    peak: float

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


def level_track(path: str | Path, sample_rate: int, frame_seconds: float, block_samples: int) -> LevelTrack:
    """Read ``path`` block by block (mono, at ``sample_rate``) and return its frame levels. The last partial frame
    counts as a frame. Raises AudioReadError (from the reader) for an unreadable, empty or non-finite file."""
    frame = max(1, int(round(frame_seconds * sample_rate)))
    block_samples = max(frame, block_samples // frame * frame)
    powers: list[np.ndarray] = []
    carry = np.zeros(0, dtype=np.float32)
    total, peak = 0, 0.0
    for block in iter_audio_blocks(path, sample_rate, block_samples):
        total += len(block)
        peak = max(peak, float(np.abs(block).max())) if len(block) else peak
        x = np.concatenate([carry, block]) if len(carry) else block
        n = len(x) // frame
        powers.append(np.square(x[:n * frame], dtype=np.float64).reshape(n, frame).mean(1).astype(np.float32))
        carry = x[n * frame:]
    if len(carry):
        powers.append(np.array([np.mean(np.square(carry, dtype=np.float64))], dtype=np.float32))
    power = np.concatenate(powers) if powers else np.zeros(0, dtype=np.float32)
    if len(power) >= 3:
        power = np.convolve(power, np.ones(3, dtype=np.float32) / 3, mode="same")
    db = (10 * np.log10(power.astype(np.float64) + 1e-12)).astype(np.float32)
    return LevelTrack(db, frame, sample_rate, total, peak)


def background_level(track: LevelTrack, g: GateSettings, smooth_seconds: float | None = None) -> np.ndarray:
    """The background level (dB) at every frame: the lowest level, averaged over ``smooth_seconds`` (default
    ``background_smooth_seconds``), within ``background_seconds`` around it (the averaging keeps a brief dip
    inside a word, quieter than the room, from pulling the background down)."""
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    n = max(len(track.db), 1)
    smooth_seconds = g.background_smooth_seconds if smooth_seconds is None else smooth_seconds
    smooth = max(1, int(round(smooth_seconds / g.frame_seconds)))
    power = uniform_filter1d(np.power(10.0, track.db.astype(np.float64) / 10), size=min(smooth, n), mode="nearest")
    size = max(1, int(round(g.background_seconds / g.frame_seconds)))
    return minimum_filter1d(10 * np.log10(power + 1e-12), size=min(size, n), mode="nearest").astype(np.float32)


def gate_thresholds(track: LevelTrack, g: GateSettings, margin: float | None = None) -> np.ndarray:
    """A threshold per frame (dB): max(background + margin, floor), ``margin`` defaulting to the start margin
    ``gate_margin_db``; see the module docstring."""
    margin = g.gate_margin_db if margin is None else margin
    return np.maximum(background_level(track, g) + margin, g.gate_floor_db).astype(np.float32)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Start and end (exclusive) of each run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _split_long(db: np.ndarray, start: int, end: int, longest: int, edge: int) -> list[tuple[int, int]]:
    """Split frames [start, end) at the quietest frame at least ``edge`` frames from either end, recursively,
    until every piece is at most ``longest`` frames."""
    out, todo = [], [(start, end)]
    while todo:
        s, e = todo.pop()
        if e - s <= longest:
            out.append((s, e))
            continue
        margin = min(edge, (e - s) // 3)
        m = s + margin + int(np.argmin(db[s + margin:e - margin]))
        todo += [(m, e), (s, m)]
    return sorted(out)


def speech_regions(track: LevelTrack, g: GateSettings, single_threshold: bool = False) -> list[tuple[int, int]]:
    """The gate's stretches as frame ranges [start, end), in order; see the module docstring.
    ``single_threshold``: a stretch needs only the hold margin over the quietest single frame (for files of one
    clip, trimmed close to the word: too little background to average)."""
    if len(track.db) == 0:
        return []
    fs = g.frame_seconds
    background = background_level(track, g, g.frame_seconds if single_threshold else None)
    hold = track.db > np.maximum(background + g.hold_margin_db, g.gate_floor_db)
    start = hold if single_threshold else track.db > np.maximum(background + g.gate_margin_db, g.gate_floor_db)
    merged: list[list[int]] = []
    gap = int(round(g.min_gap_seconds / fs))
    for s, e in (r for r in _runs(hold) if start[r[0]:r[1]].any()):
        if merged and s - merged[-1][1] < gap:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    shortest = int(round(g.min_speech_seconds / fs))
    longest = max(1, int(round(g.max_segment_seconds / fs)))
    edge = max(1, int(round(0.15 / fs)))
    regions: list[tuple[int, int]] = []
    for s, e in merged:
        if e - s >= max(shortest, 1):
            regions += _split_long(track.db, s, e, longest, edge)
    return regions


@dataclass
class Stretch:
    """One gated stretch: samples [start, end) at the model's rate, its padded span [lo, hi), and the span
    [read_lo, read_hi) read for its windows."""

    start: int
    end: int
    lo: int
    hi: int
    read_lo: int = 0
    read_hi: int = 0
    prob_sum: np.ndarray | None = None
    windows: int = 0


def _stretch_audio(path: str | Path, sample_rate: int, block_samples: int,
                   spans: Sequence[Stretch]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, samples[lo:hi]) of each stretch in order, reading the file once more block by block; only the
    samples that a later stretch still needs are kept between blocks."""
    buf = np.zeros(0, dtype=np.float32)
    buf_start, i = 0, 0
    for block in iter_audio_blocks(path, sample_rate, block_samples):
        buf = np.concatenate([buf, block]) if len(buf) else block
        while i < len(spans) and spans[i].read_hi <= buf_start + len(buf):
            yield i, buf[spans[i].read_lo - buf_start:spans[i].read_hi - buf_start]
            i += 1
        keep_from = spans[i].read_lo if i < len(spans) else buf_start + len(buf)
        cut = min(max(0, keep_from - buf_start), len(buf))
        buf, buf_start = buf[cut:], buf_start + cut
    while i < len(spans):  # a file that ended early on the second read (changed under us): what is there
        yield i, buf[max(0, spans[i].read_lo - buf_start):max(0, spans[i].read_hi - buf_start)]
        i += 1


def _silence_neighbours(samples: np.ndarray, stretches: Sequence[Stretch], i: int) -> np.ndarray:
    """A copy of stretch ``i``'s read span with every other stretch's padded samples set to zero (its own stay)."""
    st = stretches[i]
    out = samples.copy()

    def clear(other: Stretch) -> None:
        a, b = max(other.lo, st.read_lo), min(other.hi, st.read_hi)
        for x, y in ((a, min(b, st.lo)), (max(a, st.hi), b)):  # the part outside stretch i's own span
            if y > x:
                out[x - st.read_lo:y - st.read_lo] = 0

    j = i - 1
    while j >= 0 and stretches[j].hi > st.read_lo:  # padded ends grow with the index
        clear(stretches[j])
        j -= 1
    j = i + 1
    while j < len(stretches) and stretches[j].lo < st.read_hi:
        clear(stretches[j])
        j += 1
    return out


def window_offsets(length: int, max_shift: int, hop: int) -> list[int]:
    """Offsets (samples) of a stretch's window centres from its centre: 0, +-hop, +-2 hop, ... up to
    min(max_shift, length // 2)."""
    reach = min(max_shift, length // 2)
    n = reach // hop if hop > 0 else 0
    return [j * hop for j in range(-n, n + 1)]


def masked_window(samples: np.ndarray, lo: int, centre: int, clip: int) -> np.ndarray:
    """A clip-length window centred at sample ``centre`` holding ``samples`` (which start at sample ``lo``) and
    zeros elsewhere: float32 (clip,)."""
    out = np.zeros(clip, dtype=np.float32)
    w0 = centre - clip // 2
    a, b = max(lo, w0), min(lo + len(samples), w0 + clip)
    if b > a:
        out[a - w0:b - w0] = samples[a - lo:b - lo]
    return out


@dataclass
class Timeline:
    """What ``predict_timeline`` returns: per-stretch segments, the file's length, the number of windows run and
    the level track."""

    segments: list[dict[str, Any]]
    seconds: float
    windows: int
    track: LevelTrack = field(repr=False)


@torch.inference_mode()
def predict_timeline(model: nn.Module, path: str | Path, classes: Sequence[str], sample_rate: int, clip: int,
                     g: GateSettings, batch_size: int, device: torch.device, block_samples: int = 0,
                     top_k: int = 3, track: LevelTrack | None = None) -> Timeline:
    """Gate, window and classify a file of any length (see the module docstring). ``model`` maps (batch, clip)
    waveforms to logits. Each segment is ``{"start_s", "end_s", "label", "confidence", "top": [[label, p]...],
    "windows"}``, with ``label`` None and a ``reason`` when its confidence is below ``g.min_confidence``.
    ``track``: the file's level track when the caller has read it already (the file is then read once more, not
    twice)."""
    block_samples = block_samples or max(clip, batch_size * clip)
    if track is None:
        track = level_track(path, sample_rate, g.frame_seconds, block_samples)
    regions = speech_regions(track, g)
    pad = int(round(g.pad_seconds * sample_rate))
    f = track.frame
    hop = max(1, int(round(g.hop_seconds * sample_rate)))
    shift = int(round(g.max_shift_seconds * sample_rate))
    stretches = []
    for s, e in regions:
        st = Stretch(s * f, min(e * f, track.samples), max(0, s * f - pad), min(track.samples, e * f + pad))
        if g.context == "background":  # the windows' whole reach, with the room noise around the stretch
            centre = (st.start + st.end) // 2
            st.read_lo = max(0, centre - shift - clip // 2)
            st.read_hi = min(track.samples, max(st.hi, centre + shift + clip - clip // 2))
            st.read_lo = min(st.read_lo, st.lo)
        else:
            st.read_lo, st.read_hi = st.lo, st.hi
        stretches.append(st)
    pending: list[np.ndarray] = []
    owners: list[int] = []
    n_windows = 0

    def flush() -> None:
        nonlocal n_windows
        if not pending:
            return
        prob = model(torch.from_numpy(np.stack(pending)).to(device)).float().softmax(1).cpu().numpy()
        for k, p in zip(owners, prob):
            st = stretches[k]
            st.prob_sum = p.astype(np.float64) if st.prob_sum is None else st.prob_sum + p
            st.windows += 1
        n_windows += len(pending)
        pending.clear()
        owners.clear()

    if stretches:
        for i, samples in _stretch_audio(path, sample_rate, block_samples, stretches):
            st = stretches[i]
            if g.context == "background":
                samples = _silence_neighbours(samples, stretches, i)
            centre = (st.start + st.end) // 2
            for off in window_offsets(st.end - st.start, shift, hop):
                pending.append(masked_window(samples, st.read_lo, centre + off, clip))
                owners.append(i)
                if len(pending) >= batch_size:
                    flush()
        flush()
    segments = []
    k = min(max(top_k, 1), len(classes))
    for st in stretches:
        if st.prob_sum is None:
            continue
        mean = st.prob_sum / st.windows
        order = np.argsort(-mean)[:k]
        seg: dict[str, Any] = {"start_s": round(st.start / sample_rate, 3), "end_s": round(st.end / sample_rate, 3),
                               "label": classes[int(order[0])], "confidence": round(float(mean[order[0]]), 4),
                               "top": [[classes[int(i)], round(float(mean[i]), 4)] for i in order],
                               "windows": st.windows}
        if seg["confidence"] < g.min_confidence:
            seg["reason"] = f"confidence {seg['confidence']:.2f} below predict.min_confidence {g.min_confidence:g}"
            seg["label"] = None
        segments.append(seg)
    return Timeline(segments, track.seconds, n_windows, track)


def no_speech_reason(track: LevelTrack, g: GateSettings) -> str:
    """Why a file holds no digit, in words: every sample zero, or no frame above the gate."""
    if track.peak == 0:
        return "silent: every sample is zero"
    loudest = float(track.db.max()) if len(track.db) else -math.inf
    return (f"no speech: no {g.frame_seconds * 1000:g}-ms frame rose {g.hold_margin_db:g} dB above the background "
            f"and above {g.gate_floor_db:g} dBFS for {g.min_speech_seconds * 1000:g} ms (loudest frame "
            f"{loudest:.1f} dBFS)")
