"""Turn raw WFDB ECG records (CinC 2017, MIT-BIH, any WFDB folder) into a cached float32 memmap plus a JSON index.

Preparation runs once per (source, parameters) pair; every later run, and every training epoch, reads only the
memmap. What a cache folder ``<cache>/ecg/prepared/<dataset>-<key>/`` holds:

- ``signal.f32``: all kept records, resampled to ``fs``, normalised per lead, concatenated: float32 of shape
  (total samples, leads), time-major (a one-lead cache is the same bytes as a 1-D array). Which leads: the
  preparation's ``leads`` (names matched through the alias table of ``cnnapps.tasks.ecg.leads``), else the one
  ``lead``, else each record's first ECG signal; signals that are not ECG (PPG, respiration, pressures) are
  never read.
- ``rhythm.u8`` (only where ``.atr`` annotations exist): per sample, the rhythm in force, as an index into the
  index's ``rhythm_names``; 255 before a record's first rhythm annotation (no label).
- ``beats.npy`` (same condition): int32 array (n_beats, 2) of [R-peak sample relative to its record at ``fs``,
  AAMI class index into ``BEAT_CLASSES``].
- ``index.json``: per record name, offset, length, label, original fs and length, the leads read (and any lead
  read in place of a missing one), beat slice; the cache's lead names (``leads``, ``n_leads``); label counts;
  the skipped records by reason (``skipped: {reason: [names]}``) with a message each; the source fingerprint and
  the preparation parameters, hashed into ``key``, so a changed source or parameter gives a new cache.

Bad records never stop preparation: each is skipped with a logged reason (see ``SKIP_REASONS``). A missing or
unreadable archive, or a missing ``REFERENCE.csv``, is an error naming the file. The cache is written into a
temporary folder and renamed into place at the end, so a killed preparation never leaves a cache that looks
complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import wfdb
from scipy.signal import resample_poly
from tqdm.auto import tqdm

from cnnapps.data.root import DataNotFoundError, cache_dir
from cnnapps.tasks.ecg.leads import ALL, LeadChoice, LeadError, choose_leads, parse_leads

log = logging.getLogger(__name__)

# 2: multi-lead caches (signal.f32 is (samples, leads), the index names the leads); a new version gives new keys,
# so a cache of the one-lead layout is never opened as a multi-lead one or the other way round.
PREP_VERSION = 2
STEP = 256  # samples per output label of the Hannun et al. network (its total stride)
CINC_CLASSES = ("N", "A", "O", "~")
BEAT_CLASSES = ("N", "S", "V", "F", "Q")
# ANSI/AAMI EC57 beat classes from the MIT-BIH symbols (data README). Other symbols (+ ~ ! " x | [ ]) are not beats.
AAMI_SYMBOLS = {
    **dict.fromkeys("NLRej", "N"), **dict.fromkeys("AaJS", "S"), **dict.fromkeys("VE", "V"), "F": "F",
    **dict.fromkeys("/fQ", "Q"),
}
NO_RHYTHM = 255  # rhythm code for samples before a record's first rhythm annotation
# The de Chazal et al. (2004) inter-patient split; paced records 102, 104, 107, 217 are left out.
MITDB_DS1 = ("101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124", "201", "203",
             "205", "207", "208", "209", "215", "220", "223", "230")
MITDB_DS2 = ("100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212", "213", "214",
             "219", "221", "222", "228", "231", "232", "233", "234")
MITDB_PACED = ("102", "104", "107", "217")

SKIP_REASONS = {
    "missing_record": "listed (RECORDS or REFERENCE.csv) but has no .hea header",
    "unreadable_header": "the .hea header does not parse",
    "missing_signal_file": "the signal file named in the header does not exist",
    "truncated_signal": "the signal file holds fewer bytes than the header's sample count implies",
    "header_length_mismatch": "the signal file holds more bytes than the header's sample count implies",
    "unreadable_signal": "wfdb could not read the samples",
    "lead_not_found": "a requested lead is not among the record's ECG signals (and none may stand in for it)",
    "no_ecg_signal": "the record holds no ECG signal (only PPG, respiration, pressure, ... by name and units)",
    "nan_samples": "a run of NaN samples longer than max_nan_gap_s (shorter runs are interpolated linearly)",
    "flat_line": "a chosen lead is (almost) constant: no ECG to learn from",
    "too_short": "fewer than one 256-sample step after resampling",
    "unknown_label": "REFERENCE.csv gives a label outside N, A, O, ~",
    "no_label": "the record has no line in REFERENCE.csv (CinC 2020/2021: no ``# Dx:`` header line)",
    "bad_dx": "the header's ``# Dx:`` line holds an item that is not a SNOMED CT code",
}

# Bytes per sample of the uncompressed WFDB formats (212: 2 samples in 3 bytes; 310/311: 3 in 4).
_FORMAT_BYTES = {"8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0, "212": 1.5,
                 "310": 4 / 3, "311": 4 / 3}


class ECGDataError(ValueError):
    """Source data that cannot be used at all (unreadable archive, bad REFERENCE.csv); the message names the file."""


class RecordSkip(Exception):
    """One record cannot be used; ``reason`` is a key of SKIP_REASONS, the message says what was found."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PrepParams:
    """Everything that changes the prepared samples; hashed into the cache key."""

    fs: int = 200  # model sampling rate (Hz), 200 as in Hannun et al. 2019
    lead: str = ""  # one lead to keep (e.g. "MLII"; a record without it is skipped); "": the first ECG signal
    leads: tuple[str, ...] = ()  # several leads (or ("all",)); when set, ``lead`` is cleared
    missing_lead: str = "skip"  # with ``leads``: skip a record lacking one, or "substitute" another ECG signal
    normalize: str = "zscore"  # zscore | robust | none (per record)
    min_std: float = 0.01  # floor of the divisor (physical units, mV): near-flat records are not blown up to noise
    flat_fraction: float = 0.95  # a record with this share of samples equal to their predecessor is a flat line
    max_nan_gap_s: float = 0.5  # NaN runs up to this long are interpolated; a longer one skips the record
    step: int = STEP

    def __post_init__(self) -> None:
        if self.fs <= 0:
            raise ValueError(f"fs must be positive, got {self.fs}")
        if self.normalize not in ("zscore", "robust", "none"):
            raise ValueError(f"normalize must be zscore, robust or none, got {self.normalize!r}")
        if self.missing_lead not in ("skip", "substitute"):
            raise ValueError(f"missing_lead must be skip or substitute, got {self.missing_lead!r}")
        object.__setattr__(self, "leads", tuple(parse_leads(list(self.leads))))
        # fields that do not apply are cleared, so equal preparations have equal cache keys
        if self.leads:
            object.__setattr__(self, "lead", "")
        else:  # one lead is always strict
            object.__setattr__(self, "missing_lead", "skip")

    @property
    def wanted(self) -> list[str]:
        """The leads asked for: ``leads``, else ``[lead]``, else ``[]`` (each record's first ECG signal)."""
        return list(self.leads) if self.leads else ([self.lead] if self.lead else [])


# ---------------------------------------------------------------- hashing and archives


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the archive's identity in cache keys)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_fingerprint(folder: Path, extra: list[Path] = (), recursive: bool = False) -> str:
    """A cheap identity of an unpacked WFDB folder: names, sizes and mtimes of its record files (+ ``extra``);
    ``recursive``: of every subfolder too (names relative to ``folder``)."""
    h = hashlib.sha256()
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.suffix in (".hea", ".dat", ".mat", ".atr", ".csv")
                   or p.name == "RECORDS")
    for p in [*files, *extra]:
        st = p.stat()
        name = p.relative_to(folder).as_posix() if recursive and p.is_relative_to(folder) else p.name
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        raise ECGDataError(f"{archive}: refusing unsafe member path {name!r} (absolute or with '..')")
    if not (member.isfile() or member.isdir()):
        raise ECGDataError(f"{archive}: refusing member {name!r}: only plain files and folders are extracted")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive (any compression tarfile reads) into ``dest``.

    Refuses absolute paths, ``..`` components, links and device files, so an archive cannot write outside ``dest``.
    An unreadable or corrupt archive raises ECGDataError naming it.
    """
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, archive)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, ECGDataError):
            raise
        raise ECGDataError(f"{archive}: cannot read the archive ({type(exc).__name__}: {exc})") from exc


def _new_tmp(parent: Path, name: str) -> Path:
    _remove_stale_tmp(parent, name)
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Remove temp folders of earlier preparations of ``name`` whose process has died (killed mid-way)."""
    for tmp in parent.glob(f".tmp-{name}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "index.json").exists() or final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def unpack_archive(archive: Path, name: str) -> Path:
    """Unpack ``archive`` once into ``<cache>/ecg/raw/<name>-<sha12>/`` (atomically) and return that folder."""
    if not archive.is_file():
        raise DataNotFoundError(f"archive not found: {archive}")
    sha = file_sha256(archive)
    parent = cache_dir("ecg", "raw")
    final = parent / f"{name}-{sha[:12]}"
    if final.is_dir():
        return final
    t0 = time.perf_counter()
    tmp = _new_tmp(parent, f"{name}-{sha[:12]}")
    try:
        safe_extract(archive, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    log.info("unpacked %s into %s in %.1f s", archive, final, time.perf_counter() - t0)
    return final


# ---------------------------------------------------------------- reading one record


def _signal_files_check(header: Any, record_path: Path) -> None:
    """Compare each signal file's size with what the header's sample count implies (wfdb would silently read a
    shorter record when the header under-reports, and fail obscurely when the file is short)."""
    by_file: dict[str, list[int]] = {}
    for i, fname in enumerate(header.file_name):
        by_file.setdefault(fname, []).append(i)
    for fname, sigs in by_file.items():
        path = record_path.parent / fname
        if not path.is_file():
            raise RecordSkip("missing_signal_file", f"{record_path}.hea: signal file {path} does not exist")
        fmts = {str(header.fmt[i]) for i in sigs}
        if len(fmts) != 1 or next(iter(fmts)) not in _FORMAT_BYTES:
            continue  # compressed or mixed formats: leave the check to wfdb
        per_frame = sum(header.samps_per_frame[i] or 1 for i in sigs)
        offset = header.byte_offset[sigs[0]] or 0
        expected = offset + math.ceil(header.sig_len * per_frame * _FORMAT_BYTES[next(iter(fmts))])
        actual = path.stat().st_size
        if actual < expected:
            raise RecordSkip("truncated_signal", f"{path}: {actual} bytes, but the header's {header.sig_len} "
                             f"samples x {per_frame} signal(s) need {expected}")
        # one byte of slack: format 212 pads an odd sample count, some writers pad to an even size
        if actual > expected + 1:
            raise RecordSkip("header_length_mismatch", f"{path}: {actual} bytes, but the header says "
                             f"{header.sig_len} samples ({expected} bytes); the header under-reports the length")


def choose_lead(sig_names: list[str], lead: str, where: str) -> int:
    """Index of signal ``lead`` in ``sig_names`` (same name, case-insensitive, or an alias: MLII ~ II, see
    ``cnnapps.tasks.ecg.leads``); "" picks the first ECG signal. RecordSkip if absent."""
    try:
        return choose_leads(sig_names, None, [lead] if lead else [], where).indices[0]
    except LeadError as exc:
        raise RecordSkip(exc.reason, str(exc)) from exc


def _record_path(record_path: Path | str) -> Path:
    record_path = Path(record_path)
    if record_path.suffix in (".hea", ".dat", ".mat", ".atr"):
        record_path = record_path.with_suffix("")
    return record_path


def read_header(record_path: Path | str) -> Any:
    """The parsed ``.hea`` header of a record (``wfdb.Record`` without samples). RecordSkip (missing_record,
    unreadable_header) when it is absent, does not parse or has no signals."""
    record_path = _record_path(record_path)
    if not record_path.with_suffix(".hea").is_file():
        raise RecordSkip("missing_record", f"{record_path}.hea does not exist")
    try:
        header = wfdb.rdheader(str(record_path))
    except Exception as exc:  # wfdb raises bare ValueErrors and others on malformed headers
        raise RecordSkip("unreadable_header", f"{record_path}.hea: {type(exc).__name__}: {exc}") from exc
    if not header.n_sig or not header.sig_len:
        raise RecordSkip("unreadable_header", f"{record_path}.hea: no signals or no sample count")
    return header


def read_leads(record_path: Path | str, leads: list[str] | tuple[str, ...] = (), substitute: bool = False
               ) -> tuple[np.ndarray, float, LeadChoice]:
    """Read the ECG leads ``leads`` of a WFDB record in physical units: (samples (time, leads) float64, fs,
    LeadChoice with the names read and any lead read in place of a missing one).

    ``leads``: names matched through the alias table (``cnnapps.tasks.ecg.leads``); ``[]``: the first ECG
    signal; ``["all"]``: every ECG signal. Signals that are not ECG are never read. Raises RecordSkip with the
    reason when the header, the signal file or the leads are unusable (``no_ecg_signal``, ``lead_not_found``).
    """
    record_path = _record_path(record_path)
    header = read_header(record_path)
    try:
        choice = choose_leads(list(header.sig_name), list(header.units or []), list(leads),
                              f"{record_path}.hea", substitute=substitute)
    except LeadError as exc:
        raise RecordSkip(exc.reason, str(exc)) from exc
    _signal_files_check(header, record_path)
    try:
        rec = wfdb.rdrecord(str(record_path), channels=choice.indices, physical=True)
    except FileNotFoundError as exc:
        raise RecordSkip("missing_signal_file", f"{record_path}: {exc}") from exc
    except Exception as exc:
        raise RecordSkip("unreadable_signal", f"{record_path}: {type(exc).__name__}: {exc}") from exc
    x = np.asarray(rec.p_signal, dtype=np.float64).reshape(-1, len(choice.indices))
    return x, float(rec.fs), choice


def read_lead(record_path: Path, lead: str = "") -> tuple[np.ndarray, float, str]:
    """Read one lead of a WFDB record in physical units: (samples (time,) float64, fs, lead name).

    ``lead``: a name (aliases match: MLII ~ II); "": the first ECG signal. Raises RecordSkip with the reason
    when the header, the signal file or the lead is unusable.
    """
    x, fs, choice = read_leads(record_path, [lead] if lead else [])
    return x[:, 0], fs, choice.names[0]


def fill_nan_gaps(x: np.ndarray, max_gap: int, where: str) -> tuple[np.ndarray, int]:
    """Interpolate NaN runs of at most ``max_gap`` samples linearly; return (signal, NaN count filled).

    A longer run (or an all-NaN record) raises RecordSkip("nan_samples"): inventing seconds of ECG would teach
    the model a flat line with a rhythm label.
    """
    nan = np.isnan(x)
    n = int(nan.sum())
    if n == 0:
        return x, 0
    if n == len(x):
        raise RecordSkip("nan_samples", f"{where}: every sample is NaN")
    edges = np.diff(np.concatenate([[0], nan.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    longest = int((ends - starts).max())
    if longest > max_gap:
        raise RecordSkip("nan_samples", f"{where}: a run of {longest} NaN samples at sample {int(starts[0])} "
                         f"(at most {max_gap} are interpolated)")
    good = np.flatnonzero(~nan)
    x = x.copy()
    x[nan] = np.interp(np.flatnonzero(nan), good, x[good])
    return x, n


def resample(x: np.ndarray, fs_in: float, fs_out: int) -> np.ndarray:
    """Polyphase resampling (scipy ``resample_poly``, anti-aliased) from ``fs_in`` to ``fs_out``: (time',)."""
    if abs(fs_in - fs_out) < 1e-9:
        return x
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return resample_poly(x, ratio.numerator, ratio.denominator)


def normalise(x: np.ndarray, mode: str, min_std: float) -> np.ndarray:
    """Per-record normalisation: ``zscore`` (mean, std) or ``robust`` (median, 1.4826 MAD); the divisor never
    drops below ``min_std`` so a near-flat record stays near zero instead of becoming amplified noise."""
    if mode == "none":
        return x
    if mode == "robust":
        centre = float(np.median(x))
        scale = 1.4826 * float(np.median(np.abs(x - centre)))
    else:
        centre, scale = float(x.mean()), float(x.std())
    return (x - centre) / max(scale, min_std)


def prepare_signal(x: np.ndarray, fs_in: float, params: PrepParams, where: str) -> tuple[np.ndarray, int]:
    """Raw lead -> model input: NaN gaps filled, flat lines refused, resampled, normalised: (float32 (time,), nans).

    Raises RecordSkip for long NaN runs, flat lines and records shorter than one step after resampling.
    """
    x, n_nan = fill_nan_gaps(x, int(round(params.max_nan_gap_s * fs_in)), where)
    if len(x) > 1:
        same = float(np.mean(np.diff(x) == 0))
        if same >= params.flat_fraction or float(np.ptp(x)) == 0.0:
            raise RecordSkip("flat_line", f"{where}: {same:.0%} of samples repeat their predecessor "
                             f"(range {float(np.ptp(x)):.3g})")
    y = resample(x, fs_in, params.fs)
    if len(y) < params.step:
        raise RecordSkip("too_short", f"{where}: {len(y)} samples at {params.fs} Hz, fewer than one "
                         f"{params.step}-sample step")
    return normalise(y, params.normalize, params.min_std).astype(np.float32), n_nan


def prepare_signals(x: np.ndarray, fs_in: float, params: PrepParams, where: str,
                    names: list[str] | None = None) -> tuple[np.ndarray, int]:
    """``prepare_signal`` for each lead of ``x`` (time, leads): (float32 (time', leads), NaNs filled in all).

    A lead with a long NaN run, a flat lead or too short a record raises RecordSkip naming the lead (when there
    are several).
    """
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    out, filled = [], 0
    for k in range(x.shape[1]):
        label = where if x.shape[1] == 1 else f"{where} lead {names[k] if names else k}"
        y, n = prepare_signal(x[:, k], fs_in, params, label)
        out.append(y)
        filled += n
    return (out[0][:, None] if len(out) == 1 else np.stack(out, axis=1)), filled


def read_for_model(path: str, model_leads: list[str], n_leads: int, lead: str | None, params: PrepParams
                   ) -> tuple[str, np.ndarray, float, LeadChoice, np.ndarray]:
    """One WFDB record (path with or without .hea/.dat/.mat) as ``predict`` and ``explain`` read it for a model
    of ``n_leads`` leads: (record path without suffix, raw (time, leads) in physical units, its fs, the lead
    choice, prepared (time', leads) float32). The model's leads (``model_leads``; [] for its first ECG signal)
    stand in for themselves where a record has them, another ECG signal in place of a missing one with a
    warning; ``lead`` (comma-separated names) reads those instead, which must be there. RecordSkip when the
    record or its leads are unusable (``lead_not_found`` for a count the model does not read); ValueError for a
    ``lead`` list that repeats a lead."""
    record = str(Path(path).with_suffix("")) if Path(path).suffix in (".hea", ".dat", ".mat") else path
    wanted = parse_leads(lead) if lead else list(model_leads)
    if wanted and len(wanted) != n_leads:
        raise RecordSkip("lead_not_found", f"--lead {lead}: the model reads {n_leads} lead(s) "
                         f"({', '.join(model_leads) or 'the first ECG signal'})")
    raw, fs_in, choice = read_leads(Path(record), wanted, substitute=not lead)
    if choice.substituted:
        log.warning("%s has no lead %s; read %s in its place", record, ", ".join(choice.substituted),
                    ", ".join(choice.substituted.values()))
    x, _ = prepare_signals(raw, fs_in, params, record, choice.names)
    return record, raw, fs_in, choice, x


def clean_rhythm(aux: str) -> str:
    """``'(AFIB\\x00'`` -> ``'AFIB'``: MIT-BIH aux notes carry a NUL terminator on most but not all lines."""
    return aux.replace("\x00", "").strip().lstrip("(").strip()


def read_annotations(record_path: Path, fs_in: float, fs_out: int, n_out: int,
                     vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rhythm per output sample and AAMI beats from ``<record>.atr``, on the ``fs_out`` time base.

    Returns (rhythm codes (n_out,) uint8 indexing ``vocab`` (extended in place), NO_RHYTHM before the first
    rhythm annotation; beats (n_beats, 2) int32 of [sample, AAMI class index]).
    """
    ann = wfdb.rdann(str(record_path), "atr")
    scale = fs_out / fs_in
    samples = np.round(np.asarray(ann.sample, dtype=np.float64) * scale).astype(np.int64)
    rhythm = np.full(n_out, NO_RHYTHM, dtype=np.uint8)
    changes = [(int(s), clean_rhythm(a or "")) for s, sym, a in zip(samples, ann.symbol, ann.aux_note)
               if sym == "+" and clean_rhythm(a or "")]
    for k, (start, name) in enumerate(changes):
        if name not in vocab:
            if len(vocab) >= NO_RHYTHM:
                raise ECGDataError(f"{record_path}.atr: more than {NO_RHYTHM} distinct rhythm names")
            vocab[name] = len(vocab)
        end = changes[k + 1][0] if k + 1 < len(changes) else n_out
        rhythm[max(start, 0):max(min(end, n_out), 0)] = vocab[name]
    beats = [(int(s), BEAT_CLASSES.index(AAMI_SYMBOLS[sym])) for s, sym in zip(samples, ann.symbol)
             if sym in AAMI_SYMBOLS and 0 <= s < n_out]
    return rhythm, np.asarray(beats, dtype=np.int32).reshape(-1, 2)


# ---------------------------------------------------------------- labels and sources


def read_reference(path: Path) -> dict[str, str]:
    """``REFERENCE.csv`` (``record,label`` lines, CRLF, no header) -> {record: label}. Errors name the file."""
    if not path.is_file():
        raise DataNotFoundError(f"label file not found: {path} (the CinC 2017 REFERENCE.csv)")
    labels: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0]:
            raise ECGDataError(f"{path}:{n}: expected 'record,label', got {line!r}")
        if parts[0].lower() in ("record", "data_source"):  # a header line some copies carry
            continue
        labels[parts[0]] = parts[1]
    if not labels:
        raise ECGDataError(f"{path}: no 'record,label' lines")
    return labels


def list_records(folder: Path, recursive: bool = False) -> list[str]:
    """Record names of a WFDB folder: its ``RECORDS`` file if present, else every ``*.hea`` stem, sorted.
    ``recursive``: every ``*.hea`` below ``folder``, named by its path relative to it without the suffix
    (``georgia/g1/E00001``), as the Challenge 2020/2021 sets are laid out."""
    if recursive:
        # hidden folders are unfinished unpacking or tools' state, not records
        return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.hea")
                      if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    records_file = folder / "RECORDS"
    if records_file.is_file():
        names = [ln.strip() for ln in records_file.read_text().splitlines() if ln.strip()]
        if names:
            return names
    return sorted(p.stem for p in folder.glob("*.hea"))


def _has_records(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.hea"))


@dataclass
class Source:
    """Where a data set's records are, its labels file, and the identity of what they came from."""

    dataset: str
    record_dir: Path
    fingerprint: str
    reference: Path | None = None
    # "dx": each record's label is the SNOMED CT codes of its header's ``# Dx:`` line (CinC 2020/2021), kept
    # comma-joined as the header writes them; records are found in subfolders too
    dx_labels: bool = False


def cinc2017_source(data_root: Path) -> Source:
    """Locate CinC 2017: ``cinc2017/training2017/`` if unpacked (e.g. by data_prep's download), else unpack
    ``cinc2017/training2017.tar.xz`` into the cache. Labels: ``cinc2017/REFERENCE.csv``, else the archive's copy."""
    base = Path(data_root) / "cinc2017"
    unpacked = base / "training2017"
    archive = base / "training2017.tar.xz"
    if _has_records(unpacked):
        record_dir, ident = unpacked, "dir:" + folder_fingerprint(unpacked)
    elif archive.is_file():
        record_dir = unpack_archive(archive, "cinc2017") / "training2017"
        ident = "tar:" + file_sha256(archive)
        if not _has_records(record_dir):
            raise ECGDataError(f"{archive}: holds no training2017/*.hea records")
    else:
        raise DataNotFoundError(f"CinC 2017 not found: neither {unpacked}/ (WFDB records) nor {archive}")
    reference = base / "REFERENCE.csv"
    if not reference.is_file():
        reference = record_dir / "REFERENCE.csv"
    if not reference.is_file():
        raise DataNotFoundError(f"label file not found: {base / 'REFERENCE.csv'} (nor {reference})")
    return Source("cinc2017", record_dir, f"{ident}+ref:{file_sha256(reference)}", reference)


def mitdb_source(data_root: Path) -> Source:
    """Locate MIT-BIH: ``mitdb/*.hea`` if unpacked (PhysioNet's layout), else unpack ``mitdb/mitdb.tar.xz``."""
    base = Path(data_root) / "mitdb"
    archive = base / "mitdb.tar.xz"
    if _has_records(base):
        return Source("mitdb", base, "dir:" + folder_fingerprint(base))
    if archive.is_file():
        record_dir = unpack_archive(archive, "mitdb") / "mitdb"
        if not _has_records(record_dir):
            raise ECGDataError(f"{archive}: holds no mitdb/*.hea records")
        return Source("mitdb", record_dir, "tar:" + file_sha256(archive))
    raise DataNotFoundError(f"MIT-BIH not found: neither {base}/*.hea nor {archive}")


def folder_source(folder: Path) -> Source:
    """Any folder of WFDB records (``evaluate --split all``); a ``REFERENCE.csv`` in it gives record labels."""
    folder = Path(folder)
    if not _has_records(folder):
        raise DataNotFoundError(f"no WFDB records (*.hea) in {folder}")
    ref = folder / "REFERENCE.csv"
    return Source("folder", folder, "dir:" + folder_fingerprint(folder), ref if ref.is_file() else None)


def cinc2021_source(folder: Path) -> Source:
    """PhysioNet/CinC Challenge 2020/2021 12-lead records: every ``*.hea`` below ``folder`` (the Challenge sets
    keep each source in its own subfolders), labels from each header's ``# Dx:`` line."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.rglob("*.hea")):
        raise DataNotFoundError(f"no WFDB records (*.hea) in {folder} or its subfolders (CinC 2020/2021 12-lead "
                                f"records; data_prep/ecg.py --download DEST --dataset cinc2021 fetches them)")
    return Source("cinc2021", folder, "dir:" + folder_fingerprint(folder, recursive=True), dx_labels=True)


def dataset_source(data_root: Path, dataset: str, path: str = "") -> Source:
    """The Source of ``dataset`` ("cinc2017" | "mitdb" | "cinc2021") under a data root; ``path``: cinc2021's
    record folder (absolute, or relative to the data root; default ``cinc2021``)."""
    if dataset == "cinc2021":
        folder = Path(path or "cinc2021").expanduser()
        return cinc2021_source(folder if folder.is_absolute() else Path(data_root) / folder)
    if dataset == "cinc2017":
        return cinc2017_source(data_root)
    if dataset == "mitdb":
        return mitdb_source(data_root)
    raise ValueError(f"unknown ECG dataset {dataset!r}; known: cinc2017, mitdb, cinc2021")


# ---------------------------------------------------------------- the prepared cache


@dataclass
class RecordInfo:
    """One record of a prepared cache (offsets and lengths in samples at the cache's ``fs``). ``lead``: the first
    signal read; ``leads``: every signal read, in the cache's lead order; ``substituted``: {wanted lead: signal
    read in its place} where the record lacked a wanted lead."""

    name: str
    offset: int
    length: int
    label: str | None
    orig_fs: float
    orig_length: int
    lead: str
    beat_offset: int = 0
    beat_count: int = 0
    nan_filled: int = 0
    leads: list[str] = field(default_factory=list)
    substituted: dict[str, str] = field(default_factory=dict)


class PreparedCache:
    """Read side of a prepared cache: the index plus lazily opened memmaps (safe to pickle into workers).

    ``signals(i)`` -> float32 (length, n_leads) (a view of the memmap); ``signal(i, lead=0)`` -> float32 (length,)
    of one lead; ``rhythm(i)`` -> uint8 (length,), ``beats(i)`` -> int32 (n, 2). ``lead_names``: the leads, in
    channel order (the names asked for; with ``all``, those of the first record read).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        try:
            self.index: dict[str, Any] = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ECGDataError(f"{index_file}: cannot read the cache index ({exc})") from exc
        self.records = [RecordInfo(**r) for r in self.index["records"]]
        self.fs: int = int(self.index["params"]["fs"])
        self.rhythm_names: list[str] = list(self.index.get("rhythm_names", []))
        self.has_annotations: bool = bool(self.index.get("has_annotations"))
        self.n_leads: int = int(self.index.get("n_leads", 1))
        self.lead_names: list[str] = list(self.index.get("leads", []))
        self._signal: np.ndarray | None = None
        self._rhythm: np.ndarray | None = None
        self._beats: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # memmaps would be pickled as full copies; reopen them in the worker instead
        return {**self.__dict__, "_signal": None, "_rhythm": None, "_beats": None}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def _memmap(self, fname: str, dtype: Any, width: int = 0) -> np.ndarray:
        total = int(self.index["n_samples"])
        shape = (total, width) if width else (total,)
        if total == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path / fname, dtype=dtype, mode="r", shape=shape)

    def signals(self, i: int) -> np.ndarray:
        """Every lead of record ``i``: float32 (length, n_leads), a read-only view of the memmap."""
        if self._signal is None:
            self._signal = self._memmap("signal.f32", np.float32, self.n_leads)
        r = self.records[i]
        return self._signal[r.offset:r.offset + r.length]

    def signal(self, i: int, lead: int = 0) -> np.ndarray:
        """One lead of record ``i``: float32 (length,) (strided when the cache holds several leads)."""
        return self.signals(i)[:, lead]

    def rhythm(self, i: int) -> np.ndarray:
        if not self.has_annotations:
            raise ECGDataError(f"{self.path}: this cache has no rhythm annotations")
        if self._rhythm is None:
            self._rhythm = self._memmap("rhythm.u8", np.uint8)
        r = self.records[i]
        return self._rhythm[r.offset:r.offset + r.length]

    def beats(self, i: int) -> np.ndarray:
        if not self.has_annotations:
            raise ECGDataError(f"{self.path}: this cache has no beat annotations")
        if self._beats is None:
            self._beats = np.load(self.path / "beats.npy", mmap_mode="r")
        r = self.records[i]
        return np.asarray(self._beats[r.beat_offset:r.beat_offset + r.beat_count])

    @property
    def skipped(self) -> dict[str, list[str]]:
        return dict(self.index.get("skipped", {}))

    def skip_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in self.skipped.items()}


def _cache_key(source: Source, params: PrepParams, annotations: bool) -> str:
    blob = json.dumps({"version": PREP_VERSION, "source": source.fingerprint, "params": dataclasses.asdict(params),
                       "annotations": annotations}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="rec", disable=not sys.stderr.isatty(), leave=False)


@dataclass
class _Writer:
    """Streams prepared records into the temp cache folder, collecting the index."""

    folder: Path
    annotations: bool
    records: list[dict] = field(default_factory=list)
    beats: list[np.ndarray] = field(default_factory=list)
    n_samples: int = 0
    n_beats: int = 0

    def __post_init__(self) -> None:
        self._sig = open(self.folder / "signal.f32", "wb")
        self._rhy = open(self.folder / "rhythm.u8", "wb") if self.annotations else None

    def add(self, info: RecordInfo, x: np.ndarray, rhythm: np.ndarray | None, beats: np.ndarray | None) -> None:
        """``x``: (length, leads), written time-major."""
        self._sig.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
        if self._rhy is not None:
            self._rhy.write(np.ascontiguousarray(rhythm, dtype=np.uint8).tobytes())
            info.beat_offset, info.beat_count = self.n_beats, len(beats)
            self.beats.append(beats)
            self.n_beats += len(beats)
        info.offset = self.n_samples
        self.n_samples += len(x)
        self.records.append(dataclasses.asdict(info))

    def close(self) -> None:
        self._sig.close()
        if self._rhy is not None:
            self._rhy.close()
            beats = np.concatenate(self.beats) if self.beats else np.zeros((0, 2), np.int32)
            np.save(self.folder / "beats.npy", beats.astype(np.int32))


def prepare_source(source: Source, params: PrepParams, *, annotations: bool | None = None,
                   force: bool = False) -> PreparedCache:
    """Prepare (or reuse) the cache of every record in ``source``; return it opened.

    ``annotations``: read ``.atr`` rhythm and beat annotations (default: when the source is MIT-BIH, or a folder
    whose records all have ``.atr`` files). Labels come from ``source.reference`` when it is set.
    """
    if annotations is None:
        names = list_records(source.record_dir, source.dx_labels)
        annotations = source.dataset == "mitdb" or (
            source.dataset == "folder" and bool(names)
            and all((source.record_dir / f"{n}.atr").is_file() for n in names))
    key = _cache_key(source, params, annotations)
    parent = cache_dir("ecg", "prepared")
    final = parent / f"{source.dataset}-{key[:16]}"
    if final.is_dir() and not force:
        try:
            cache = PreparedCache(final)
            if cache.index.get("key") == key:
                return cache
        except (ECGDataError, KeyError, TypeError):
            pass
        log.warning("cache %s is stale or damaged; rebuilding", final)
    if final.is_dir():
        shutil.rmtree(final, ignore_errors=True)
    tmp = _new_tmp(parent, f"{source.dataset}-{key[:16]}")
    try:
        index = _build(source, params, annotations, tmp, key)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return PreparedCache(final)


def _build(source: Source, params: PrepParams, annotations: bool, tmp: Path, key: str) -> dict:
    t0 = time.perf_counter()
    labels = read_reference(source.reference) if source.reference is not None else None
    names = list_records(source.record_dir, source.dx_labels)
    if labels is not None:
        names = sorted(set(names) | set(labels))  # a labelled record without files must show up as a skip
    skipped: dict[str, list[str]] = {}
    messages: dict[str, str] = {}
    vocab: dict[str, int] = {}
    # "all" becomes the ECG leads of the first record read, so every record gives the same channels
    wanted: list[str] | None = None if params.leads == (ALL,) else params.wanted
    substitute = bool(params.leads) and params.missing_lead == "substitute"
    substitutions: dict[str, dict[str, str]] = {}
    writer = _Writer(tmp, annotations)
    with _progress(len(names), f"preparing {source.dataset}") as bar:
        for name in names:
            try:
                label = None
                if labels is not None:
                    if name not in labels:
                        raise RecordSkip("no_label", f"{source.record_dir / name}: not in {source.reference}")
                    label = labels[name]
                    if label not in CINC_CLASSES:
                        raise RecordSkip("unknown_label", f"{source.reference}: record {name} has label "
                                         f"{label!r}, not one of {', '.join(CINC_CLASSES)}")
                path = source.record_dir / name
                if source.dx_labels:
                    label = _dx_label(path)
                raw, fs_in, choice = read_leads(path, [ALL] if wanted is None else wanted, substitute)
                x, n_nan = prepare_signals(raw, fs_in, params, str(path), choice.names)
                rhythm = beats = None
                if annotations:
                    rhythm, beats = read_annotations(path, fs_in, params.fs, len(x), vocab)
                if wanted is None:
                    wanted = list(choice.names)
                    log.info("leads = all: %d ECG leads of %s (%s)", len(wanted), name, ", ".join(wanted))
                if choice.substituted:
                    substitutions[name] = dict(choice.substituted)
                    log.warning("%s has no lead %s; read %s in its place", path,
                                ", ".join(choice.substituted), ", ".join(choice.substituted.values()))
                writer.add(RecordInfo(name, 0, len(x), label, fs_in, len(raw), choice.names[0], nan_filled=n_nan,
                                      leads=list(choice.names), substituted=dict(choice.substituted)),
                           x, rhythm, beats)
            except RecordSkip as skip:
                skipped.setdefault(skip.reason, []).append(name)
                messages[name] = str(skip)
                log.warning("skipping %s (%s): %s", name, skip.reason, skip)
            bar.update(1)
    writer.close()
    counts: dict[str, int] = {}
    for r in writer.records:
        # Dx labels are several codes: count each code
        for lab in (r["label"].split(",") if source.dx_labels and r["label"] else [r["label"]]):
            if lab is not None:
                counts[lab] = counts.get(lab, 0) + 1
    seconds = time.perf_counter() - t0
    log.info("prepared %s: %d records kept, %d skipped%s, in %.1f s", source.dataset, len(writer.records),
             sum(map(len, skipped.values())), _reasons({k: len(v) for k, v in skipped.items()}), seconds)
    return {
        "version": PREP_VERSION, "key": key, "dataset": source.dataset, "source": source.fingerprint,
        "record_dir": str(source.record_dir), "reference": str(source.reference) if source.reference else None,
        "params": dataclasses.asdict(params), "has_annotations": annotations, "n_samples": writer.n_samples,
        "n_leads": len(wanted) if wanted else 1, "leads": list(wanted or []), "lead_substitutions": substitutions,
        "n_beats": writer.n_beats, "dtype": "float32", "label_counts": counts, "skipped": skipped,
        "skip_messages": messages, "rhythm_names": sorted(vocab, key=vocab.get), "beat_classes": list(BEAT_CLASSES),
        "prep_seconds": round(seconds, 2), "records": writer.records,
    }


def _dx_label(path: Path) -> str:
    """The SNOMED CT codes of a record's ``# Dx:`` header line, comma-joined ("" for an empty line). RecordSkip:
    no header (missing_record), no Dx line (no_label), an item that is not a code (bad_dx)."""
    from cnnapps.tasks.ecg.cinc2021 import dx_codes

    header = read_header(path)
    try:
        codes = dx_codes(header.comments or [])
    except ValueError as exc:
        raise RecordSkip("bad_dx", f"{path}.hea: {exc}") from exc
    if codes is None:
        raise RecordSkip("no_label", f"{path}.hea: no '# Dx:' line (the record's diagnoses)")
    return ",".join(codes)


def prepare(data_root: Path, dataset: str, params: PrepParams, force: bool = False) -> PreparedCache:
    """Prepare (or reuse) ``dataset`` ("cinc2017" | "mitdb") found under ``data_root``."""
    return prepare_source(dataset_source(Path(data_root), dataset), params, force=force)


def _reasons(counts: dict[str, int]) -> str:
    """`` (reason n, ...)`` for a log line, or nothing when there are no skips."""
    return " (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")" if counts else ""
