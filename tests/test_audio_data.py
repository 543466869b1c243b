"""Audio data: reading real FSDD recordings and bad files, the FSDD splits, folder datasets, the decode cache."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cnnapps.tasks.audio import data as audio_data
from cnnapps.tasks.audio.data import (AudioReadError, ClipDataset, SplitLists, build_clip_datasets, decode_files,
                                      fix_length, iter_audio_blocks, list_class_folders, list_fsdd, read_audio,
                                      split_fsdd_speaker, split_fsdd_usual, split_stratified)

from conftest import FSDD, needs_fsdd




@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Caches of test files go to a temporary folder, not the user's ~/.cache.
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


# ---------------------------------------------------------------- reading


@needs_fsdd
def test_reads_real_recording_at_8khz_mono():
    path = FSDD / "7_jackson_32.wav"
    x = read_audio(path, 8000)
    info = sf.info(str(path))
    assert info.samplerate == 8000 and info.channels == 1
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == info.frames
    assert 0.01 < np.abs(x).max() <= 1.0
    # Same samples as soundfile's own int16 reading, scaled to [-1, 1].
    ref, _ = sf.read(str(path), dtype="int16")
    np.testing.assert_allclose(x, ref / 32768.0, atol=1e-6)


@needs_fsdd
def test_fsdd_labels_come_from_the_file_name():
    entries = list_fsdd(FSDD, Counter())
    assert len(entries) == 3000
    e = next(e for e in entries if e.path.name == "7_jackson_32.wav")
    assert (e.label, e.speaker, e.index) == ("7", "jackson", 32)
    assert all(e.path.name.startswith(f"{e.label}_{e.speaker}_{e.index}.") for e in entries)
    assert {e.speaker for e in entries} == {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}


def test_resampled_stereo_44k_is_mixed_to_mono(tmp_path: Path):
    left, right = _tone(0.5, 44100, 440.0, 0.6), _tone(0.5, 44100, 440.0, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    x = read_audio(path, 8000)
    assert len(x) == 4000  # 0.5 s at 8 kHz
    assert abs(_dominant_hz(x, 8000) - 440.0) < 5
    mid = x[1000:3000]  # away from the resampler's edges: the mix is the mean, amplitude 0.4
    assert abs(np.abs(mid).max() - 0.4) < 0.02


def test_corrupt_file_error_names_the_file(tmp_path: Path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio at all" + os.urandom(200))
    with pytest.raises(AudioReadError, match="corrupt.wav"):
        read_audio(path, 8000)


def test_empty_file_error_names_the_file(tmp_path: Path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), 8000)
    with pytest.raises(AudioReadError, match=r"empty\.wav: empty audio"):
        read_audio(path, 8000)
    with pytest.raises(AudioReadError, match="empty"):
        list(iter_audio_blocks(path, 8000, 1000))


def test_text_file_with_wav_name_is_rejected(tmp_path: Path):
    path = tmp_path / "notes.wav"
    path.write_text("this is text\n")
    with pytest.raises(AudioReadError, match="notes.wav: not a readable audio file"):
        read_audio(path, 8000)


def test_block_reading_matches_whole_file(tmp_path: Path):
    x = _tone(3.0, 8000, 300.0)
    path = tmp_path / "tone.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    blocks = list(iter_audio_blocks(path, 8000, 5000))
    assert [len(b) for b in blocks] == [5000, 5000, 5000, 5000, 4000]
    np.testing.assert_array_equal(np.concatenate(blocks), read_audio(path, 8000))


def test_fix_length_pads_centred_and_crops():
    x = np.arange(1, 5, dtype=np.float32)
    np.testing.assert_array_equal(fix_length(x, 8), [0, 0, 1, 2, 3, 4, 0, 0])
    np.testing.assert_array_equal(fix_length(np.arange(10, dtype=np.float32), 4), [3, 4, 5, 6])
    np.testing.assert_array_equal(fix_length(np.arange(10, dtype=np.float32), 4, offset=0), [0, 1, 2, 3])
    np.testing.assert_array_equal(fix_length(x, 8, offset=-4), [0, 0, 0, 0, 1, 2, 3, 4])


# ---------------------------------------------------------------- splits


@needs_fsdd
def test_usual_split_puts_exactly_indices_0_to_4_in_test():
    s = split_fsdd_usual(list_fsdd(FSDD, Counter()), val_indices=[5, 6, 7, 8, 9])
    assert len(s.test) == 6 * 10 * 5 == 300
    assert {e.index for e in s.test} == {0, 1, 2, 3, 4}
    assert Counter((e.speaker, e.label) for e in s.test) == Counter({k: 5 for k in
                                                                     {(e.speaker, e.label) for e in s.test}})
    assert len({(e.speaker, e.label) for e in s.test}) == 60
    assert {e.index for e in s.val} == {5, 6, 7, 8, 9} and len(s.val) == 300
    assert min(e.index for e in s.train) == 10 and len(s.train) == 2400
    paths = [e.path for e in s.train + s.val + s.test]
    assert len(paths) == len(set(paths)) == 3000


@needs_fsdd
def test_speaker_split_keeps_speakers_apart():
    entries = list_fsdd(FSDD, Counter())
    s = split_fsdd_speaker(entries, test_speakers=["theo"], val_speakers=[], val_indices=[5, 6, 7, 8, 9])
    assert {e.speaker for e in s.test} == {"theo"} and len(s.test) == 500
    assert "theo" not in {e.speaker for e in s.train + s.val}
    assert len(s.train) + len(s.val) == 2500

    s2 = split_fsdd_speaker(entries, test_speakers=["theo", "lucas"], val_speakers=["nicolas"], val_indices=[])
    train, val, test = ({e.speaker for e in x} for x in (s2.train, s2.val, s2.test))
    assert test == {"theo", "lucas"} and val == {"nicolas"} and train == {"george", "jackson", "yweweler"}
    assert not (train & test) and not (train & val) and not (val & test)


@needs_fsdd
def test_unknown_speaker_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown speaker.*bob.*george"):
        split_fsdd_speaker(list_fsdd(FSDD, Counter()), ["bob"], [], [5])


def _write_class_folder(root: Path, classes: dict[str, float], n: int, sr: int = 8000) -> None:
    for name, freq in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            sf.write(root / name / f"{i}.wav", _tone(0.3, sr, freq * (1 + 0.01 * i)), sr, subtype="PCM_16")


def test_folder_dataset_stratified_split_and_broken_files_skipped(tmp_path: Path):
    _write_class_folder(tmp_path, {"low": 200.0, "high": 1500.0}, n=10)
    (tmp_path / "low" / "broken.wav").write_bytes(b"garbage" * 10)
    sf.write(tmp_path / "high" / "silent.wav", np.zeros(800, dtype=np.float32), 8000)
    sf.write(tmp_path / "high" / "empty.wav", np.zeros((0, 1), dtype=np.float32), 8000)
    entries = list_class_folders(tmp_path)
    assert len(entries) == 23 and {e.label for e in entries} == {"low", "high"}
    s = split_stratified(entries, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert s == split_stratified(entries, val_fraction=0.2, test_fraction=0.2, seed=0)  # seeded
    for part in (s.train, s.val, s.test):
        assert {e.label for e in part} == {"low", "high"}
    skipped: Counter = Counter()
    everything = SplitLists(test=entries)
    built = build_clip_datasets(everything, None, 8000, 4000, 0, skipped)
    assert len(built.test) == 20
    assert built.classes == ["high", "low"]
    assert built.skipped == {"not a readable audio file": 1, "empty audio": 1, "silent (every sample is zero)": 1}


def test_folder_with_unknown_label_is_skipped_when_classes_are_fixed(tmp_path: Path):
    _write_class_folder(tmp_path, {"a": 300.0, "b": 900.0, "c": 2000.0}, n=2)
    skipped: Counter = Counter()
    built = build_clip_datasets(SplitLists(test=list_class_folders(tmp_path)), ["a", "b"], 8000, 4000, 0, skipped)
    assert len(built.test) == 4
    assert skipped == {"label not among the model's classes": 2}


# ---------------------------------------------------------------- cache and clips


def test_decode_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write_class_folder(tmp_path / "data", {"x": 500.0}, n=3)
    paths = sorted((tmp_path / "data" / "x").glob("*.wav"))
    first = decode_files(paths, 8000, tmp_path / "cache")
    assert isinstance(first.waves, np.memmap)

    def no_decoding(*a, **k):
        raise AssertionError("a current cache must not decode any file")

    monkeypatch.setattr(audio_data, "read_audio", no_decoding)
    again = decode_files(paths, 8000, tmp_path / "cache")
    np.testing.assert_array_equal(again.signal(2), first.signal(2))

    monkeypatch.undo()
    sf.write(paths[0], _tone(0.5, 8000, 700.0), 8000)  # new content, size and mtime
    rebuilt = decode_files(paths, 8000, tmp_path / "cache")
    assert len(rebuilt.signal(0)) == 4000 and len(first.signal(0)) == 2400
    other_rate = decode_files(paths, 16000, tmp_path / "cache")
    assert len(other_rate.signal(1)) == 2 * len(first.signal(1))


def test_clip_dataset_crops_centred_in_eval_and_randomly_in_training(tmp_path: Path):
    sf.write(tmp_path / "long.wav", np.linspace(-0.5, 0.5, 12000, dtype=np.float32), 8000, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", _tone(0.25, 8000), 8000, subtype="FLOAT")
    decoded = decode_files([tmp_path / "long.wav", tmp_path / "short.wav"], 8000, tmp_path / "cache")
    files = decoded.files
    ev = ClipDataset(decoded, [0, 1], [0, 1], files, clip_samples=8000, train=False)
    a, b = ev[0], ev[0]
    assert a["wave"].shape == (8000,) and a["y"].item() == 0 and a["file"].endswith("long.wav")
    np.testing.assert_array_equal(a["wave"].numpy(), b["wave"].numpy())
    np.testing.assert_array_equal(a["wave"].numpy(), decoded.signal(0)[2000:10000])
    tr = ClipDataset(decoded, [0, 1], [0, 1], files, clip_samples=8000, train=True, max_shift=2000)
    starts = {float(tr[0]["wave"][0]) for _ in range(20)}
    assert len(starts) > 5  # random crops of the long file
    placements = {int(np.flatnonzero(tr[1]["wave"].numpy())[0]) for _ in range(20)}
    assert len(placements) > 5 and all(abs(p - 3000) <= 2001 for p in placements)  # shifted near the centre
