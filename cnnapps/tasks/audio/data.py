"""Audio data: read WAV files with soundfile, list FSDD or ``<class>/*.wav`` folders, split them, cache the decoded
waveforms once as one NumPy array, and serve fixed-length clips."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

from cnnapps.data.root import DataNotFoundError, cache_dir, require_path

log = logging.getLogger(__name__)

# Bump when the decoding below changes, so caches written by older code are not reused.
CACHE_VERSION = 2  # 2: WAVs cut short are refused
FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[A-Za-z]+)_(?P<index>\d+)\.wav$", re.IGNORECASE)
FSDD_CLASSES = [str(d) for d in range(10)]


class AudioReadError(ValueError):
    """A file could not be used as audio: unreadable, empty, wrong format or non-finite samples. The message
    starts with the file's path."""


# ---------------------------------------------------------------- reading


def _resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """(samples,) at ``orig_sr`` -> (samples * new_sr / orig_sr,) float32 at ``new_sr`` (windowed sinc)."""
    if orig_sr == new_sr:
        return x
    return AF.resample(torch.from_numpy(np.ascontiguousarray(x)), orig_sr, new_sr).numpy()


def _to_mono(x: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) by averaging the channels (a plain mix-down, no channel weighting)."""
    return x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)


def _check_samples(path: Path, x: np.ndarray) -> None:
    if x.size == 0:
        raise AudioReadError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(x).all():
        raise AudioReadError(f"{path}: holds NaN or infinite samples")


def wav_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file whose ``data`` chunk declares more bytes than the file holds (a copy or a recording
    cut short), a description of the shortfall; None for complete WAVs, other formats, and WAVs that leave the
    size open (0 or 0xFFFFFFFF, as streaming writers do). libsndfile itself silently reads what is there."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = path.stat().st_size
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                declared = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"data":
                    held = size - pos - 8
                    if declared in (0, 0xFFFFFFFF) or declared <= held:
                        return None
                    return f"truncated: the header declares {declared} bytes of audio, the file holds {held}"
                pos += 8 + declared + (declared & 1)
    except OSError:
        return None
    return None


def open_audio(path: str | os.PathLike) -> sf.SoundFile:
    """Open ``path`` with soundfile; any file libsndfile cannot parse, and a WAV cut short, raise AudioReadError
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: no such file")
    short = wav_truncation(path)
    if short:
        raise AudioReadError(f"{path}: {short}")
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioReadError(f"{path}: not a readable audio file (wrong format or corrupt): {exc}") from None
    if f.samplerate <= 0 or f.channels <= 0:
        f.close()
        raise AudioReadError(f"{path}: invalid header ({f.samplerate} Hz, {f.channels} channels)")
    return f


def read_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Decode a whole file: mono mix-down, resampled to ``sample_rate``. Returns float32 (samples,) in [-1, 1].

    Raises AudioReadError (message starts with the path) for a missing, unreadable, empty or non-finite file."""
    path = Path(path)
    with open_audio(path) as f:
        sr = f.samplerate
        try:
            x = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioReadError(f"{path}: decoding failed (truncated or corrupt): {exc}") from None
    _check_samples(path, x)
    return _resample(_to_mono(x), sr, sample_rate).astype(np.float32, copy=False)


def iter_audio_blocks(path: str | os.PathLike, sample_rate: int, block_samples: int) -> Iterator[np.ndarray]:
    """Read a file of any length block by block: float32 mono (<= block_samples,) arrays at ``sample_rate``.

    Only one block is in memory at a time. Each block is resampled on its own; its source length is a multiple
    of ``orig_sr / gcd(orig_sr, sample_rate)`` so output blocks line up exactly (only the filter tails at block
    edges differ from resampling the whole file, a negligible change). Raises AudioReadError as ``read_audio``."""
    path = Path(path)
    with open_audio(path) as f:
        sr = f.samplerate
        step = sr // math.gcd(sr, sample_rate)
        src_block = max(step, (block_samples * sr // sample_rate) // step * step)
        n = 0
        while True:
            try:
                x = f.read(src_block, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioReadError(f"{path}: decoding failed after {n} samples: {exc}") from None
            if x.shape[0] == 0:
                break
            if not np.isfinite(x).all():
                raise AudioReadError(f"{path}: holds NaN or infinite samples")
            n += x.shape[0]
            yield _resample(_to_mono(x), sr, sample_rate).astype(np.float32, copy=False)
        if n == 0:
            raise AudioReadError(f"{path}: empty audio (0 samples)")


def fix_length(x: np.ndarray, length: int, offset: int | None = None) -> np.ndarray:
    """Pad with zeros or crop ``x`` (samples,) to ``length`` samples.

    ``offset`` is where the clip starts relative to the signal: for a longer signal the crop start (0 ..
    len - length), for a shorter one minus the padding before it (-(length - len) .. 0). None: centred."""
    n = x.shape[0]
    if offset is None:
        offset = (n - length) // 2
    out = np.zeros(length, dtype=np.float32)
    if n >= length:
        offset = min(max(offset, 0), n - length)
        out[:] = x[offset:offset + length]
    else:
        pad = min(max(-offset, 0), length - n)
        out[pad:pad + n] = x
    return out


# ---------------------------------------------------------------- listing files


@dataclass
class FileEntry:
    """One labelled audio file: its path, class name, and for FSDD the speaker and recording index."""

    path: Path
    label: str
    speaker: str = ""
    index: int = -1


def is_fsdd_folder(folder: Path) -> bool:
    """True when ``folder`` (or its ``recordings/``) holds FSDD-named files ``{digit}_{speaker}_{index}.wav``."""
    folder = folder / "recordings" if (folder / "recordings").is_dir() else folder
    return any(FSDD_NAME.match(p.name) for p in folder.glob("*.wav")) if folder.is_dir() else False


def list_fsdd(folder: Path, skipped: Counter) -> list[FileEntry]:
    """FSDD files in ``folder`` (or ``folder/recordings``), sorted by name. Names that do not parse are skipped
    and counted in ``skipped``: a wrong label is worse than a missing example."""
    folder = folder / "recordings" if (folder / "recordings").is_dir() else folder
    require_path(folder, "FSDD recordings folder")
    entries = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".wav":
            continue
        m = FSDD_NAME.match(p.name)
        if m is None:
            log.warning("%s: not an FSDD name {digit}_{speaker}_{index}.wav; skipped", p)
            skipped["file name is not {digit}_{speaker}_{index}.wav"] += 1
            continue
        entries.append(FileEntry(p, m["digit"], m["speaker"].lower(), int(m["index"])))
    if not entries:
        raise DataNotFoundError(f"no FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav) in {folder}")
    return entries


def list_class_folders(folder: Path) -> list[FileEntry]:
    """Every ``folder/<class>/*.wav`` (case-insensitive suffix), sorted; the class is the sub-folder name."""
    require_path(folder, "audio folder")
    entries = [FileEntry(p, d.name) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
               for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() == ".wav"]
    if not entries:
        raise DataNotFoundError(f"no <class>/*.wav files in {folder}")
    return entries


def list_any(folder: Path, skipped: Counter) -> list[FileEntry]:
    """FSDD layout if ``folder`` has FSDD-named files, else ``<class>/*.wav``."""
    return list_fsdd(folder, skipped) if is_fsdd_folder(folder) else list_class_folders(folder)


# ---------------------------------------------------------------- splits


@dataclass
class SplitLists:
    """File entries per split."""

    train: list[FileEntry] = field(default_factory=list)
    val: list[FileEntry] = field(default_factory=list)
    test: list[FileEntry] = field(default_factory=list)


def split_fsdd_usual(entries: Sequence[FileEntry], val_indices: Sequence[int]) -> SplitLists:
    """The FSDD convention: recording indices 0-4 of every speaker and digit are test; ``val_indices`` (ours:
    5-9, a fixed and balanced choice that needs no seed) are validation; the rest train."""
    out = SplitLists()
    val = set(val_indices)
    for e in entries:
        (out.test if e.index < 5 else out.val if e.index in val else out.train).append(e)
    return out


def split_fsdd_speaker(entries: Sequence[FileEntry], test_speakers: Sequence[str], val_speakers: Sequence[str],
                       val_indices: Sequence[int]) -> SplitLists:
    """Speaker-held-out: every file of ``test_speakers`` is test. Validation is every file of ``val_speakers``
    when given, else the recordings ``val_indices`` of the training speakers (same voices as train, so it
    measures fit, not generalisation to new voices)."""
    known = sorted({e.speaker for e in entries})
    test_s, val_s = {s.lower() for s in test_speakers}, {s.lower() for s in val_speakers}
    for what, names in (("data.test_speakers", test_s), ("data.val_speakers", val_s)):
        unknown = sorted(names - set(known))
        if unknown:
            raise ValueError(f"{what}: unknown speaker(s) {', '.join(unknown)}; the data has {', '.join(known)}")
    if not test_s:
        raise ValueError(f"data.split = 'speaker' needs data.test_speakers (speakers: {', '.join(known)})")
    if test_s & val_s:
        raise ValueError(f"speaker(s) {', '.join(sorted(test_s & val_s))} in both test_speakers and val_speakers")
    if not set(known) - test_s - val_s:
        raise ValueError("data.test_speakers and data.val_speakers leave no speaker to train on")
    out = SplitLists()
    val_idx = set(val_indices)
    for e in entries:
        if e.speaker in test_s:
            out.test.append(e)
        elif val_s:
            (out.val if e.speaker in val_s else out.train).append(e)
        else:
            (out.val if e.index in val_idx else out.train).append(e)
    return out


def split_stratified(entries: Sequence[FileEntry], val_fraction: float, test_fraction: float,
                     seed: int) -> SplitLists:
    """Seeded split by class: each class gives round(n * fraction) files to test and to val (at least one of
    each when it has 3 or more files), the rest to train."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
                         f"[0, 1) with a sum below 1")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[FileEntry]] = {}
    for e in entries:
        by_class.setdefault(e.label, []).append(e)
    out = SplitLists()
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n = len(items)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        picked = [items[i] for i in order]
        out.test += picked[:n_test]
        out.val += picked[n_test:n_test + n_val]
        out.train += picked[n_test + n_val:]
    return out


def limit_per_class(entries: list[FileEntry], limit: int, seed: int) -> list[FileEntry]:
    """At most ``limit`` files of each class, a seeded choice kept in listing order (0: all)."""
    if limit <= 0:
        return entries
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_class.setdefault(e.label, []).append(i)
    keep = set()
    for idx in by_class.values():
        keep.update(idx if len(idx) <= limit else rng.choice(idx, size=limit, replace=False).tolist())
    return [e for i, e in enumerate(entries) if i in keep]


# ---------------------------------------------------------------- decoded cache


@dataclass
class DecodedAudio:
    """Every file of a list decoded once: ``waves`` (total_samples,) float32 (a read-only memmap), with
    ``offsets``/``lengths`` per file; files that failed have length -1 and a reason in ``errors``."""

    files: list[str]
    waves: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    errors: dict[str, str]
    sample_rate: int

    def signal(self, i: int) -> np.ndarray:
        """The decoded waveform of file ``i``: float32 (samples,)."""
        return np.asarray(self.waves[self.offsets[i]:self.offsets[i] + self.lengths[i]], dtype=np.float32)


def cache_key(paths: Sequence[Path], sample_rate: int) -> str:
    """Hash of the file list with sizes and modification times plus the decoding parameters: any change to a
    file, the list or the parameters gives a new key (a fresh cache)."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "sample_rate": sample_rate}).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def decode_files(paths: Sequence[Path], sample_rate: int, cache_root: Path | None = None) -> DecodedAudio:
    """Decode ``paths`` (mono, ``sample_rate``) into one cached array, or load the cache if it is current.

    Broken files are logged, not fatal: their length is -1 and ``errors[path]`` says why. The cache is two files
    under ``cache_dir('audio', key)``: ``waves.npy`` and ``index.json`` (written last, so a cache with an index is
    complete; both are written to temporary names and renamed, so concurrent builders never see half a file)."""
    key = cache_key(paths, sample_rate)
    folder = (cache_root / key) if cache_root is not None else cache_dir("audio", key)
    folder.mkdir(parents=True, exist_ok=True)
    index_path, waves_path = folder / "index.json", folder / "waves.npy"
    files = [str(p) for p in paths]
    if index_path.is_file() and waves_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            if index.get("files") == files and index.get("sample_rate") == sample_rate:
                waves = np.load(waves_path, mmap_mode="r")
                return DecodedAudio(files, waves, np.asarray(index["offsets"], dtype=np.int64),
                                    np.asarray(index["lengths"], dtype=np.int64), index["errors"], sample_rate)
            log.warning("%s does not match its file list; rebuilding", index_path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s unreadable (%s); rebuilding", folder, exc)

    log.info("decoding %d audio files at %d Hz into %s", len(paths), sample_rate, folder)
    chunks, offsets, lengths, errors, pos = [], [], [], {}, 0
    for p in paths:
        try:
            x = read_audio(p, sample_rate)
        except AudioReadError as exc:
            errors[str(p)] = str(exc)
            offsets.append(pos)
            lengths.append(-1)
            continue
        chunks.append(x)
        offsets.append(pos)
        lengths.append(len(x))
        pos += len(x)
    waves = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    tmp_w = folder / f".waves.{os.getpid()}.npy"
    np.save(tmp_w, waves)
    os.replace(tmp_w, waves_path)
    tmp_i = folder / f".index.{os.getpid()}.json"
    tmp_i.write_text(json.dumps({"files": files, "sample_rate": sample_rate, "offsets": offsets,
                                 "lengths": lengths, "errors": errors, "version": CACHE_VERSION}))
    os.replace(tmp_i, index_path)
    return DecodedAudio(files, np.load(waves_path, mmap_mode="r"), np.asarray(offsets, dtype=np.int64),
                        np.asarray(lengths, dtype=np.int64), errors, sample_rate)


# ---------------------------------------------------------------- datasets


def skip_reason(error: str) -> str:
    """A short, countable reason from an AudioReadError message (the path is dropped)."""
    msg = error.split(": ", 1)[-1]
    for key in ("empty audio", "not a readable audio file", "decoding failed", "NaN or infinite", "invalid header",
                "no such file", "truncated"):
        if key in msg:
            return key
    return msg[:60]


class ClipDataset(Dataset):
    """Fixed-length clips of decoded files: item -> ``{"wave": (samples,) float32, "y": int64 scalar,
    "index": int64 scalar, "file": str}`` where ``index`` is the position in ``files``.

    Training (``train=True``): a clip longer than ``clip_samples`` is cropped at a random place and a shorter one
    placed at a random offset within ``max_shift`` samples of the centre (time-shift augmentation). Evaluation:
    centred crop or padding. Randomness comes from torch's generator, which the engine seeds per epoch."""

    def __init__(self, decoded: DecodedAudio, rows: Sequence[int], labels: Sequence[int], files: Sequence[str],
                 clip_samples: int, train: bool = False, max_shift: int = 0) -> None:
        self.decoded = decoded
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.files = list(files)
        self.clip_samples = clip_samples
        self.train = train
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.rows)

    def _offset(self, n: int) -> int | None:
        if not self.train:
            return None
        if n >= self.clip_samples:
            return int(torch.randint(0, n - self.clip_samples + 1, ()).item())
        centre = (n - self.clip_samples) // 2  # negative: minus the padding before the signal
        lo = max(n - self.clip_samples, centre - self.max_shift)
        hi = min(0, centre + self.max_shift)
        return int(torch.randint(lo, hi + 1, ()).item())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        x = self.decoded.signal(int(self.rows[i]))
        clip = fix_length(x, self.clip_samples, self._offset(len(x)))
        # "wave" first: the engine counts a batch's examples from its first value.
        return {"wave": torch.from_numpy(clip), "y": torch.tensor(self.labels[i]), "index": torch.tensor(i),
                "file": self.files[i]}


@dataclass
class BuiltSplits:
    """What ``build_clip_datasets`` returns: datasets per split, class names and skip counts."""

    train: ClipDataset | None
    val: ClipDataset | None
    test: ClipDataset | None
    classes: list[str]
    skipped: dict[str, int]
    speakers: dict[str, list[str]] = field(default_factory=dict)


def build_clip_datasets(lists: SplitLists, classes: list[str] | None, sample_rate: int, clip_samples: int,
                        max_shift: int, skipped: Counter, cache_root: Path | None = None,
                        random_train_crops: bool = True) -> BuiltSplits:
    """Decode (cached) every file of the splits and wrap each split in a ClipDataset (the training one with
    random crops and shifts unless ``random_train_crops`` is False, e.g. to evaluate a model on it).

    ``classes`` None: the sorted labels present (FSDD: "0".."9"). Given (from a checkpoint): a file with a label
    outside it is skipped and counted. Broken and silent files are skipped and counted in ``skipped``."""
    all_entries = lists.train + lists.val + lists.test
    if classes is None:
        classes = sorted({e.label for e in all_entries}, key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    class_index = {c: i for i, c in enumerate(classes)}
    paths = sorted({e.path for e in all_entries})
    decoded = decode_files(paths, sample_rate, cache_root)
    row_of = {p: i for i, p in enumerate(decoded.files)}

    def make(entries: list[FileEntry], train: bool) -> ClipDataset | None:
        rows, labels, files = [], [], []
        for e in entries:
            r = row_of[str(e.path)]
            err = decoded.errors.get(str(e.path))
            if err is not None:
                log.warning("skipped %s", err)
                skipped[skip_reason(err)] += 1
                continue
            if e.label not in class_index:
                log.warning("skipped %s: label %r is not one of the model's classes", e.path, e.label)
                skipped["label not among the model's classes"] += 1
                continue
            if not np.any(decoded.signal(r)):
                log.warning("skipped %s: silent (every sample is zero)", e.path)
                skipped["silent (every sample is zero)"] += 1
                continue
            rows.append(r)
            labels.append(class_index[e.label])
            files.append(str(e.path))
        if not entries:
            return None
        return ClipDataset(decoded, rows, labels, files, clip_samples, train=train, max_shift=max_shift)

    speakers = {name: sorted({e.speaker for e in entries if e.speaker})
                for name, entries in (("train", lists.train), ("val", lists.val), ("test", lists.test))}
    return BuiltSplits(make(lists.train, random_train_crops), make(lists.val, False), make(lists.test, False), classes,
                       dict(skipped), speakers)
