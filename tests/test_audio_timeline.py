"""Audio beyond one clip: long recordings as timelines (gate, windows, segments, sequence), silence and noise as no
digit, broken files in the long-file path, an hour-long file in bounded memory, files at any rate, channel count
and sample format, and the timeline benchmark's scoring."""
from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from cnnapps.engine.config import ConfigError, load_config
from cnnapps.tasks.audio.bench import (build_recordings, edit_distance, match_events, score_timelines,
                                       write_recording)
from cnnapps.tasks.audio.data import FileEntry, fix_length, list_fsdd, read_audio
from cnnapps.tasks.audio.features import AudioFrontEnd
from cnnapps.tasks.audio.task import AudioConfig, AudioTask
from cnnapps.tasks.audio.timeline import (GateSettings, LevelTrack, Stretch, _silence_neighbours, level_track,
                                          masked_window, speech_regions, window_offsets)
from cnnapps.tasks.base import DataSplits

from conftest import FSDD, needs_fsdd

SR = 8000




@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    yield
    torch.set_num_threads(old)


def _state() -> dict:
    return {"classes": [str(i) for i in range(10)], "sample_rate": SR, "clip_samples": SR,
            "norm_mean": [-40.0] * 64, "norm_std": [20.0] * 64}


def _random_model() -> nn.Module:
    return AudioTask().build_model(AudioConfig(), DataSplits(None, None, None, state=_state())).eval()


class TemplateModel(nn.Module):
    """A nearest-neighbour classifier over reference clips, standing in for a trained network: a window's
    embedding is the log of its mean mel power over frames (so neither its place in the window nor the zeros
    around it matter), and the logit of class c is minus the distance to the closest reference of class c. Right
    answers from it mean that each window held the right clip's samples, nothing of its neighbours, and was
    merged into the right segment; the format checks need no training."""

    def __init__(self, refs: list[np.ndarray], labels: list[int], classes: int = 10) -> None:
        super().__init__()
        self.fe = AudioFrontEnd(sample_rate=SR).eval()
        self.register_buffer("templates", self.embed(torch.from_numpy(np.stack([fix_length(r, SR) for r in refs]))))
        self.register_buffer("labels", torch.tensor(labels))
        self.classes = classes

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.fe.prepare(wave).unsqueeze(1)
        mel = self.fe.spec(x)[:, 0]  # (batch, mels, frames) power
        return torch.log(mel.mean(-1) + 1e-6)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(self.embed(wave), self.templates)  # (batch, refs)
        logits = torch.full((wave.shape[0], self.classes), -1e4)
        for k in range(self.templates.shape[0]):
            c = int(self.labels[k])
            logits[:, c] = torch.maximum(logits[:, c], -d[:, k])
        return logits


def _predict(model: nn.Module, paths: list[Path], cfg: AudioConfig | None = None, **kw) -> list[dict]:
    return list(AudioTask().predict(model, [str(p) for p in paths], _state(), cfg or AudioConfig(),
                                    torch.device("cpu"), **kw))


@pytest.fixture(scope="module")
def jackson() -> list[FileEntry]:
    """One test recording (index 0) of each digit by one speaker."""
    if FSDD is None:
        pytest.skip("FSDD not found: set CNNAPPS_DATA to the shared data folder")
    return sorted((e for e in list_fsdd(FSDD, Counter()) if e.speaker == "jackson" and e.index == 0),
                  key=lambda e: e.label)


# ---------------------------------------------------------------- the gate and the windows


def _track(db: np.ndarray) -> LevelTrack:
    return LevelTrack(db.astype(np.float32), 80, SR, len(db) * 80, 1.0)


def test_gate_finds_stretches_joins_short_gaps_drops_clicks_and_splits_long_ones():
    g = GateSettings()
    db = np.full(800, -60.0)  # 8 s of background at -60 dB
    db[100:140] = -30  # a word
    db[150:190] = -30  # another after a 0.1-s gap: separate (gap not below min_gap 0.1 s)
    db[300:330] = -30
    db[334:360] = -30  # a 40-ms closure inside a word: joined
    db[420:423] = -20  # a 30-ms click: dropped
    db[450:600] = -30  # 1.5 s of sound: split at its quietest frame
    db[520] = -45
    regions = speech_regions(_track(db), g)
    assert regions[:3] == [(100, 140), (150, 190), (300, 360)]
    assert regions[3:] == [(450, 520), (520, 600)]
    assert speech_regions(_track(np.full(300, -60.0)), g) == []


def test_gate_hysteresis_needs_the_start_margin_once_and_the_hold_margin_throughout():
    g = GateSettings(gate_margin_db=12, hold_margin_db=6)
    db = np.full(500, -60.0)
    db[100:200] = -52  # 8 dB over the background: never starts a stretch
    db[300:400] = -52
    db[340:350] = -40  # ... unless it rises 12 dB somewhere: then the whole run above 6 dB counts
    assert speech_regions(_track(db), g) == [(300, 400)]
    assert speech_regions(_track(db), g, single_threshold=True) == [(100, 200), (300, 400)]


def test_windows_hold_only_their_stretch_within_the_trained_shift():
    assert window_offsets(4000, 1200, 400) == [-1200, -800, -400, 0, 400, 800, 1200]
    assert window_offsets(1000, 1200, 400) == [-400, 0, 400]  # no further than half the stretch
    samples = np.arange(1, 2001, dtype=np.float32)  # the stretch's samples, from sample 10000 on
    w = masked_window(samples, 10000, 11000, 8000)  # centred on the stretch
    assert w.shape == (8000,) and w[3000] == 1 and w[4999] == 2000
    assert not w[:3000].any() and not w[5000:].any()
    w = masked_window(samples, 10000, 14500, 8000)  # window [10500, 18500): only the stretch's tail, at its start
    assert w[0] == 501 and w[1499] == 2000 and not w[1500:].any()


def test_background_context_keeps_the_room_and_zeroes_the_neighbouring_words():
    spans = [Stretch(1000, 2000, 900, 2100), Stretch(3000, 4000, 2900, 4100, read_lo=0, read_hi=7000),
             Stretch(5000, 5500, 4900, 5600)]
    out = _silence_neighbours(np.ones(7000, dtype=np.float32), spans, 1)
    assert not out[900:2100].any() and not out[4900:5600].any()  # the other words
    assert out[2100:4900].all() and out[:900].all() and out[5600:].all()  # its own span and the room around


# ---------------------------------------------------------------- long files made of known clips


@needs_fsdd
def test_long_file_of_known_test_clips_yields_their_sequence_and_times(jackson: list[FileEntry],
                                                                      tmp_path: Path):
    clips = [read_audio(e.path, SR) for e in jackson]
    model = TemplateModel(clips, [int(e.label) for e in jackson])
    # A quiet noise bed (20 dB under the clips' own background): the template stand-in is no noise-robust model
    (rec,) = build_recordings(jackson, SR, len(jackson), (0.3, 1.0), seed=3, noise_db=-20)
    assert sorted(t[2] for t in rec.truth) == [str(d) for d in range(10)]
    path = write_recording(rec, tmp_path / "digits.wav")
    (row,) = _predict(model, [path], draw=True, out_dir=tmp_path / "pictures")
    assert row["mode"] == "timeline" and row["seconds"] == pytest.approx(len(rec.wave) / SR, abs=1e-3)
    assert row["sequence"] == [t[2] for t in rec.truth]
    for seg, (start, end, label) in zip(row["segments"], rec.truth):
        assert seg["label"] == label and seg["windows"] >= 1 and 0 < seg["confidence"] <= 1
        assert abs(seg["start_s"] - start) < 0.2 and abs(seg["end_s"] - end) < 0.2
    scores = score_timelines([(row["segments"], rec.truth)])
    assert scores["event_f1"] == 1.0 and scores["sequence_accuracy"] == 1.0 and scores["exact_sequences"] == 1.0
    assert Path(row["picture"]).stat().st_size > 0
    json.dumps(row)


@needs_fsdd
def test_a_silent_stretch_yields_no_digit(jackson: list[FileEntry], tmp_path: Path):
    clips = [read_audio(e.path, SR) for e in jackson]
    model = TemplateModel(clips, [int(e.label) for e in jackson])
    rng = np.random.default_rng(0)
    pause = np.zeros(SR // 2, dtype=np.float32)
    quiet = np.zeros(5 * SR, dtype=np.float32)  # five seconds of room noise only
    wave = np.concatenate([pause, clips[1], pause, clips[2], quiet, clips[3], pause])
    wave = wave + (rng.standard_normal(len(wave)) * 3e-4).astype(np.float32)
    sf.write(tmp_path / "gap.wav", wave, SR, subtype="PCM_16")
    (row,) = _predict(model, [tmp_path / "gap.wav"])
    assert row["sequence"] == ["1", "2", "3"]
    gap_start = (len(pause) * 2 + len(clips[1]) + len(clips[2])) / SR
    assert not [s for s in row["segments"] if gap_start + 0.1 < s["start_s"] < gap_start + 4.9]


def test_silence_and_steady_noise_predict_no_digit_with_a_reason(tmp_path: Path):
    rng = np.random.default_rng(1)
    files = {"zeros_clip.wav": np.zeros(SR // 2), "zeros_long.wav": np.zeros(6 * SR),
             "hiss_clip.wav": rng.standard_normal(SR) * 0.01, "hiss_long.wav": rng.standard_normal(6 * SR) * 0.01,
             "hum_long.wav": 0.2 * np.sin(2 * np.pi * 50 * np.arange(4 * SR) / SR)}
    for name, x in files.items():
        sf.write(tmp_path / name, x.astype(np.float32), SR, subtype="PCM_16")
    rows = {Path(r["input"]).name: r for r in _predict(_random_model(), [tmp_path / n for n in files])}
    for name, row in rows.items():
        assert "error" not in row and row["sequence"] == [] and row["segments"] == [], name
        assert row["reason"].startswith("silent" if name.startswith("zeros") else "no speech"), (name, row)
    assert rows["zeros_clip.wav"]["label"] is None and rows["hiss_clip.wav"]["label"] is None
    assert rows["hiss_long.wav"]["mode"] == "timeline"


@needs_fsdd
def test_the_silence_gate_of_one_clip_accepts_every_fsdd_recording():
    g = GateSettings()
    refused = [p.name for p in sorted(FSDD.glob("*.wav"))
               if not speech_regions(level_track(p, SR, g.frame_seconds, SR), g, single_threshold=True)]
    assert refused == []


def test_min_confidence_turns_unsure_segments_into_no_digit(tmp_path: Path):
    rng = np.random.default_rng(4)
    wave = np.zeros(3 * SR, dtype=np.float32)
    wave[SR:SR + 3000] = rng.standard_normal(3000) * 0.3  # a burst: the untrained model is unsure of it
    sf.write(tmp_path / "burst.wav", wave + 1e-4 * rng.standard_normal(len(wave)).astype(np.float32), SR)
    (row,) = _predict(_random_model(), [tmp_path / "burst.wav"], min_confidence=0.99)
    assert len(row["segments"]) == 1 and row["segments"][0]["label"] is None
    assert "below predict.min_confidence" in row["segments"][0]["reason"] and row["sequence"] == []
    assert row["reason"] == "no segment reached predict.min_confidence"


# ---------------------------------------------------------------- broken files in the long-file path


def test_broken_long_files_give_one_line_errors_and_the_rest_go_on(tmp_path: Path):
    rng = np.random.default_rng(5)
    good = (rng.standard_normal(3 * SR) * 0.01).astype(np.float32)
    good[SR:SR + 2000] *= 30
    sf.write(tmp_path / "good.wav", good, SR, subtype="PCM_16")
    full = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(full[:len(full) // 2])
    nan = good.copy()
    nan[int(2.5 * SR)] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 100)
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), SR)
    names = ["truncated.wav", "good.wav", "nan.wav", "text.wav", "empty.wav"]
    rows = _predict(_random_model(), [tmp_path / n for n in names])
    assert [Path(r["input"]).name for r in rows] == names
    expect = {"truncated.wav": "truncated: the header declares", "nan.wav": "holds NaN or infinite samples",
              "text.wav": "not a readable audio file", "empty.wav": "empty audio"}
    for name, row in zip(names, rows):
        if name == "good.wav":
            assert "error" not in row and row["mode"] == "timeline" and len(row["segments"]) == 1
            continue
        assert set(row) == {"input", "error"}, row
        assert row["error"].startswith(str(tmp_path / name)) and expect[name] in row["error"]
        assert "\n" not in row["error"] and "Traceback" not in row["error"]


# ---------------------------------------------------------------- an hour-long file


def test_hour_long_file_predicts_in_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An hour at 8 kHz is 115 MB as float32 samples; predict holds one block, one stretch and one batch."""
    rng = np.random.default_rng(6)
    path = tmp_path / "hour.wav"
    bursts = [60.0, 900.5, 1800.25, 2700.0, 3590.0]  # seconds
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, subtype="PCM_16") as f:
        for minute in range(60):
            x = (rng.standard_normal(60 * SR) * 1e-3).astype(np.float32)
            for b in bursts:
                if minute * 60 <= b < (minute + 1) * 60:
                    at = int((b - minute * 60) * SR)
                    x[at:at + 3200] += (rng.standard_normal(3200) * 0.2 * np.hanning(3200)).astype(np.float32)
            f.write(x)
    model = _random_model()
    batch_sizes: list[int] = []
    forward = model.forward

    def spy(wave: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(wave.shape[0])
        return forward(wave)

    monkeypatch.setattr(model, "forward", spy)
    reads: list[int] = []
    read = sf.SoundFile.read

    def read_spy(self, frames=-1, *a, **k):
        reads.append(frames)
        return read(self, frames, *a, **k)

    monkeypatch.setattr(sf.SoundFile, "read", read_spy)
    bound = 8
    tracemalloc.start()
    try:
        (row,) = _predict(model, [path], batch_size=bound)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert row["seconds"] == 3600.0 and row["mode"] == "timeline"
    assert len(row["segments"]) == len(bursts)
    assert all(abs(s["start_s"] - b) < 0.3 for s, b in zip(row["segments"], bursts))
    assert reads and all(0 < n <= bound * SR for n in reads)  # never the whole file at once
    assert max(batch_sizes) <= bound and sum(batch_sizes) == row["windows"]
    # NumPy buffers (traced): the level track (1.4 MB) plus a few blocks, far below the whole signal
    assert peak < 20 * 2 ** 20, f"peak traced allocation {peak / 2 ** 20:.1f} MiB"


# ---------------------------------------------------------------- any rate, channels and format


@needs_fsdd
def test_any_rate_channels_and_format_keep_the_labels(jackson: list[FileEntry], tmp_path: Path):
    """FSDD test clips converted to 8-48 kHz, mono or stereo (left = x + n, right = x - n: only a true mean mix
    gives back x), 16/24-bit or float, are read into the same front-end features and labels as the originals."""
    import torchaudio.functional as AF

    entries = jackson[:5]
    clips = [read_audio(e.path, SR) for e in entries]
    model = TemplateModel(clips, [int(e.label) for e in entries])
    original = [r["label"] for r in _predict(model, [e.path for e in entries])]
    assert original == [e.label for e in entries]
    fe = AudioFrontEnd(sample_rate=SR).eval()

    def feats(x: np.ndarray) -> torch.Tensor:
        return fe.features(fe.prepare(torch.from_numpy(fix_length(x, SR))[None]))[0, 0]

    rng = np.random.default_rng(7)
    for rate in (8000, 16000, 22050, 44100, 48000):
        for channels in (1, 2):
            for subtype in ("PCM_16", "PCM_24", "FLOAT"):
                paths = []
                for e, x in zip(entries, clips):
                    y = AF.resample(torch.from_numpy(x), SR, rate).numpy() * 0.9
                    if channels == 2:
                        n = rng.standard_normal(len(y)).astype(np.float32) * 0.05
                        y = np.stack([y + n, y - n], axis=1)
                    paths.append(tmp_path / f"{e.path.stem}_{rate}_{channels}_{subtype}.wav")
                    sf.write(paths[-1], y, rate, subtype=subtype)
                assert sf.info(str(paths[0])).samplerate == rate and sf.info(str(paths[0])).channels == channels
                rows = _predict(model, paths)
                assert [r["label"] for r in rows] == original, (rate, channels, subtype)
                for p, x in zip(paths, clips):
                    back = read_audio(p, SR)
                    assert abs(len(back) - len(x)) <= 1
                    diff = (feats(back) - feats(x)).abs()
                    # the top mel bands lie where resampling filters roll off; below them within a dB or two
                    assert diff[:56].mean() < 1.0 and diff[:56].median() < 0.5, (p.name, float(diff[:56].mean()))


# ---------------------------------------------------------------- the benchmark's recordings and scores


def test_edit_distance_and_event_matching():
    assert edit_distance("12345", "12345") == 0
    assert edit_distance("12345", "1245") == 1 and edit_distance("", "123") == 3 and edit_distance("12", "21") == 2
    truth = [(1.0, 1.5, "3"), (2.0, 2.4, "4"), (3.0, 3.5, "3")]
    pred = [{"start_s": 1.05, "end_s": 1.5, "label": "3"}, {"start_s": 2.3, "end_s": 2.5, "label": "4"},
            {"start_s": 3.1, "end_s": 3.4, "label": "5"}, {"start_s": 4.0, "end_s": 4.2, "label": None}]
    assert match_events(pred, truth, 0.2) == [(0, 0)]
    assert sorted(match_events(pred, truth, 0.2, labels=False)) == [(0, 0), (2, 2)]
    s = score_timelines([(pred, truth)])
    assert s["event_precision"] == pytest.approx(1 / 3, abs=1e-4) and s["event_recall"] == pytest.approx(1 / 3,
                                                                                                        abs=1e-4)
    assert s["event_f1"] == pytest.approx(1 / 3, abs=1e-4) and s["detection_f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["sequence_accuracy"] == pytest.approx(2 / 3, abs=1e-4) and s["exact_sequences"] == 0
    perfect = [{"start_s": a, "end_s": b, "label": c} for a, b, c in truth]
    assert score_timelines([(perfect, truth)])["event_f1"] == 1.0


@needs_fsdd
def test_benchmark_recordings_use_each_test_clip_once_with_seeded_pauses():
    entries = [e for e in list_fsdd(FSDD, Counter()) if e.index < 5 and e.speaker in ("theo", "lucas")]
    recs = build_recordings(entries, SR, 10, (0.3, 1.5), seed=0)
    assert len(recs) == 10 and {r.speaker for r in recs} == {"theo", "lucas"}
    assert sorted(f for r in recs for f in r.files) == sorted(str(e.path) for e in entries)
    again = build_recordings(entries, SR, 10, (0.3, 1.5), seed=0)
    assert all(np.array_equal(a.wave, b.wave) and a.truth == b.truth for a, b in zip(recs, again))
    rec = recs[0]
    for (start, end, label), f in zip(rec.truth, rec.files):
        clip = read_audio(f, SR)
        a = int(round(start * SR))
        assert int(round(end * SR)) - a == len(clip) and Path(f).name.startswith(f"{label}_")
        # the clip sits there under the noise bed (at its own background level: far below its speech)
        assert np.corrcoef(rec.wave[a:a + len(clip)], clip)[0, 1] > 0.9
    gaps = [b[0] - a[1] for a, b in zip(rec.truth, rec.truth[1:])]
    assert all(0.3 - 1e-3 <= g <= 1.5 + 1e-3 for g in gaps) and len(set(gaps)) == len(gaps)


def test_bench_and_predict_config_values_are_checked():
    for bad, key in (("predict.hop_seconds=0", "predict.hop_seconds"), ("model.speed=0.7", "model.speed"),
                     ("bench.timeline_pauses=[[1.0, 0.5]]", "bench.timeline_pauses"),
                     ("model.resample_rates=[0]", "model.resample_rates"), ("data.sample_rate=-8000",
                                                                            "data.sample_rate")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(AudioConfig, None, [bad])
