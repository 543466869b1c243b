"""Audio benchmarks: spectrograms per second of the front end; long recordings built from test clips with a known
timeline, scored as events and sequences; peak memory and speed of predict on an hour-long file."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import nn

from cnnapps.tasks.audio.data import AudioReadError, FileEntry, read_audio

log = logging.getLogger(__name__)


def frontend_throughput(frontend: nn.Module, clip_samples: int, batch_size: int = 64, batches: int = 20,
                        threads: int = 0, device: str = "cpu", warmup: int = 2) -> dict[str, Any]:
    """Time ``frontend`` (peak normalisation, features, per-bin normalisation) in eval mode on batches of
    ``batch_size`` random clips (batch, clip_samples).

    Returns ``{"spectrograms_per_s", "ms_per_batch", "batch_size", "clip_samples", "features", "output_shape",
    "threads", "device"}``; ``threads`` > 0 sets torch's intra-op threads first."""
    if threads > 0:
        torch.set_num_threads(threads)
    fe = frontend.to(device).eval()
    x = (torch.randn(batch_size, clip_samples) * 0.1).to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fe(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            fe(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"spectrograms_per_s": round(batch_size * batches / dt, 1), "ms_per_batch": round(1000 * dt / batches, 3),
            "batch_size": batch_size, "clip_samples": clip_samples, "features": getattr(fe, "kind", type(fe).__name__),
            "output_shape": list(fe.output_shape(clip_samples)), "threads": torch.get_num_threads(),
            "device": device}


# ---------------------------------------------------------------- long recordings with a known timeline


@dataclass
class Recording:
    """A long test recording: ``wave`` float32 (samples,) at ``sample_rate`` and its truth, one
    ``(start_s, end_s, label)`` per clip placed in it, in order."""

    wave: np.ndarray
    sample_rate: int
    truth: list[tuple[float, float, str]]
    speaker: str = ""
    files: list[str] = field(default_factory=list)


def background_rms(x: np.ndarray, frame: int) -> float:
    """The RMS of a clip's quietest tenth of ``frame``-sample frames: its own background noise."""
    n = len(x) // frame
    if n == 0:
        return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0
    power = np.square(x[:n * frame], dtype=np.float64).reshape(n, frame).mean(1)
    return float(np.sqrt(np.percentile(power, 10)))


def build_recordings(entries: Sequence[FileEntry], sample_rate: int, digits: int, pauses: tuple[float, float],
                     seed: int, noise_db: float = 0.0) -> list[Recording]:
    """Long recordings made only of the clips ``entries`` (the test split): each speaker's clips in a seeded
    random order, ``digits`` per recording (the last one of a speaker may hold fewer), every clip once. Before,
    between and after the clips come pauses of a seeded length uniform in ``pauses`` (s); one bed of white noise
    at the recording's own background level (the median over its clips of ``background_rms``, times ``noise_db``
    in dB) runs under the
    whole recording, as one room's noise runs under a real one (the clips' own noise, louder or quieter, stays
    under it), so the gate faces noise rather than digital silence. The truth of a clip is where it was placed:
    from its first to its last sample."""
    rng = np.random.default_rng(seed)
    by_speaker: dict[str, list[FileEntry]] = {}
    for e in entries:
        by_speaker.setdefault(e.speaker or "", []).append(e)
    out = []
    frame = max(1, sample_rate // 100)
    for speaker in sorted(by_speaker):
        group = by_speaker[speaker]
        order = rng.permutation(len(group))
        for start in range(0, len(group), digits):
            chosen = [group[i] for i in order[start:start + digits]]
            clips = [read_audio(e.path, sample_rate) for e in chosen]
            level = float(np.median([background_rms(c, frame) for c in clips])) * 10 ** (noise_db / 20)
            parts, truth, t = [], [], 0
            for e, c in zip(chosen, clips):
                gap = int(round(rng.uniform(*pauses) * sample_rate))
                parts.append(np.zeros(gap, dtype=np.float32))
                t += gap
                truth.append((t / sample_rate, (t + len(c)) / sample_rate, e.label))
                parts.append(c)
                t += len(c)
            parts.append(np.zeros(int(round(rng.uniform(*pauses) * sample_rate)), dtype=np.float32))
            wave = np.concatenate(parts)
            wave = np.clip(wave + rng.standard_normal(len(wave)).astype(np.float32) * level, -1, 1).astype(np.float32)
            out.append(Recording(wave, sample_rate, truth, speaker, [str(e.path) for e in chosen]))
    return out


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance between two sequences (insertions, deletions and substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def match_events(pred: Sequence[dict], truth: Sequence[tuple[float, float, str]], onset_tolerance: float,
                 labels: bool = True) -> list[tuple[int, int]]:
    """One-to-one pairs (pred index, truth index) whose onsets differ by at most ``onset_tolerance`` s (and whose
    labels agree when ``labels``), closest onsets first."""
    pairs = sorted((abs(p["start_s"] - t[0]), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)
                   if abs(p["start_s"] - t[0]) <= onset_tolerance and (not labels or p["label"] == t[2]))
    used_p, used_t, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            out.append((i, j))
    return out


def score_timelines(results: Sequence[tuple[list[dict], list[tuple[float, float, str]]]],
                    onset_tolerance: float = 0.2, offset_tolerance: float = 0.2) -> dict[str, float]:
    """Scores of predicted segments against known timelines, one ``(segments, truth)`` pair per recording
    (segments with label None count as no event).

    - ``event_f1`` (with precision and recall): a predicted segment is a true positive when it is paired with a
      true clip of the same label whose onset is within ``onset_tolerance`` s (one-to-one).
    - ``detection_f1``: the same pairing ignoring labels (does the gate find the words?).
    - ``sequence_accuracy``: 1 - (sum of edit distances between the recognised and the true digit sequences) /
      (number of true digits); ``exact_sequences``: share of recordings recognised without one error.
    - ``onset_mae_s`` / ``offset_mae_s``: mean absolute onset and offset error of the label-matched pairs;
      ``offset_within_tol``: share of them whose offset is within ``offset_tolerance`` s."""
    tp = n_pred = n_true = det = edits = exact = 0
    onset_err: list[float] = []
    offset_err: list[float] = []
    for segments, truth in results:
        pred = [s for s in segments if s.get("label") is not None]
        pairs = match_events(pred, truth, onset_tolerance)
        tp += len(pairs)
        det += len(match_events(pred, truth, onset_tolerance, labels=False))
        n_pred += len(pred)
        n_true += len(truth)
        onset_err += [abs(pred[i]["start_s"] - truth[j][0]) for i, j in pairs]
        offset_err += [abs(pred[i]["end_s"] - truth[j][1]) for i, j in pairs]
        d = edit_distance([s["label"] for s in pred], [t[2] for t in truth])
        edits += d
        exact += d == 0

    def f1(hits: int) -> float:
        return 2 * hits / (n_pred + n_true) if n_pred + n_true else 1.0

    return {"event_f1": round(f1(tp), 4), "event_precision": round(tp / n_pred, 4) if n_pred else 0.0,
            "event_recall": round(tp / n_true, 4) if n_true else 0.0, "detection_f1": round(f1(det), 4),
            "sequence_accuracy": round(1 - edits / n_true, 4) if n_true else 0.0,
            "exact_sequences": round(exact / len(results), 4) if results else 0.0,
            "onset_mae_s": round(float(np.mean(onset_err)), 4) if onset_err else float("nan"),
            "offset_mae_s": round(float(np.mean(offset_err)), 4) if offset_err else float("nan"),
            "offset_within_tol": round(float(np.mean(np.asarray(offset_err) <= offset_tolerance)), 4)
            if offset_err else 0.0,
            "recordings": len(results), "true_events": n_true, "predicted_events": n_pred}


def write_recording(rec: Recording, path: Path) -> Path:
    """``rec`` as a 16-bit PCM WAV at its rate (as a user's recorder would write it)."""
    sf.write(str(path), rec.wave, rec.sample_rate, subtype="PCM_16")
    return path


def timeline_benchmark(task: Any, model: nn.Module, state: dict, cfg: Any, entries: Sequence[FileEntry],
                       folder: Path, pauses: tuple[float, float], digits: int, seed: int,
                       onset_tolerance: float = 0.2, noise_db: float = 0.0
                       ) -> tuple[dict[str, float], list[Recording], list[dict]]:
    """Build the recordings of ``entries`` (``build_recordings``), write each to ``folder`` as a WAV, run the
    task's ``predict`` on the files (the user's path: reading, gate, windows) and score them
    (``score_timelines``). Returns (scores, recordings, predict rows)."""
    sr = int(state["sample_rate"])
    recs = build_recordings(entries, sr, digits, pauses, seed, noise_db)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(write_recording(r, folder / f"recording_{i:03d}_{r.speaker}.wav")) for i, r in enumerate(recs)]
    device = next(model.parameters()).device
    rows = list(task.predict(model, paths, state, cfg, device))
    errors = [r for r in rows if "error" in r]
    if errors:
        raise AudioReadError(f"timeline benchmark: {errors[0]['error']}")
    scores = score_timelines([(row["segments"], rec.truth) for row, rec in zip(rows, recs)], onset_tolerance)
    scores["audio_seconds"] = round(sum(len(r.wave) for r in recs) / sr, 1)
    return scores, recs, rows


# ---------------------------------------------------------------- an hour-long file: memory and speed


def write_long_recording(entries: Sequence[FileEntry], sample_rate: int, minutes: float, path: Path,
                         seed: int = 0, pauses: tuple[float, float] = (0.3, 1.5)) -> dict[str, Any]:
    """A ``minutes``-long 16-bit WAV made of test recordings (``build_recordings`` of ``entries``, repeated with
    new seeds until long enough), written piece by piece so that building it holds one recording at a time.
    Returns {"seconds", "digits", "bytes"}."""
    want = int(round(minutes * 60 * sample_rate))
    written, digits, k = 0, 0, 0
    with sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1, subtype="PCM_16") as f:
        while written < want:
            for rec in build_recordings(entries, sample_rate, 10, pauses, seed + k):
                piece = rec.wave[:want - written]
                f.write(piece)
                written += len(piece)
                digits += sum(1 for t in rec.truth if t[1] * sample_rate <= len(piece))
                if written >= want:
                    break
            k += 1
    return {"seconds": written / sample_rate, "digits": digits, "bytes": path.stat().st_size}


def _rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _predict_child(checkpoint: str, wav: str, threads: int, batch_size: int, queue: Any) -> None:
    """In a fresh process: load the model, then predict ``wav`` while a thread samples the RSS every 5 ms; put
    {"rss_before", "rss_peak", "seconds", "segments", "windows"} on ``queue``."""
    try:
        from cnnapps.engine.trainer import model_from_checkpoint
        from cnnapps.tasks import get_task  # by name: the task module imports this one

        if threads > 0:
            torch.set_num_threads(threads)
        task = get_task("audio")
        model, cfg, state = model_from_checkpoint(task, checkpoint, "cpu")
        with torch.inference_mode():  # warm up the kernels outside the timing
            model(torch.zeros(2, int(state["clip_samples"])))
        before = _rss_bytes()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        (row,) = list(task.predict(model, [wav], state, cfg, torch.device("cpu"), batch_size=batch_size))
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes())
        queue.put({"rss_before": before, "rss_peak": peak[0], "seconds": seconds,
                   "segments": len(row.get("segments", [])), "windows": row.get("windows", 0),
                   "error": row.get("error"), "threads": torch.get_num_threads()})
    except Exception as exc:  # reported by the parent as a one-line failure
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_long_predict(checkpoint: Path, wav: Path, threads: int, batch_size: int,
                         timeout: float = 3600) -> dict[str, Any]:
    """Predict ``wav`` with ``checkpoint`` in a fresh (spawned) process and return its timing and memory: peak
    RSS during predict and its growth over the RSS after loading the model."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_predict_child, args=(str(checkpoint), str(wav), threads, batch_size, results))
    proc.start()
    deadline = time.monotonic() + timeout
    out: dict[str, Any] | None = None
    try:
        while out is None:
            try:
                out = results.get(timeout=1.0)
            except queue_mod.Empty:
                if not proc.is_alive():
                    out = {"error": f"the measuring process ended with exit code {proc.exitcode} and no result"}
                elif time.monotonic() > deadline:
                    out = {"error": f"no result within {timeout:g} s"}
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if out.get("error"):
        raise RuntimeError(f"long-file predict of {wav} failed: {out['error']}")
    return out
