"""Audio front end: output shapes, fitted per-bin normalisation (and its survival in a state_dict), augmentation only
in training, batch independence in evaluation."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnapps.tasks.audio.data import fix_length, list_fsdd, read_audio
from cnnapps.tasks.audio.features import (AudioFrontEnd, coloured_noise, fit_normalisation, frequency_warp,
                                          random_equalise, resample_through, speed_perturb)

from conftest import FSDD, needs_fsdd




@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    """(120, 8000): real recordings (indices 10-11 of every speaker and digit), centred 1-s clips."""
    if FSDD is None:
        pytest.skip("FSDD not found: set CNNAPPS_DATA to the shared data folder")
    entries = [e for e in list_fsdd(FSDD, Counter()) if e.index in (10, 11)]
    return torch.from_numpy(np.stack([fix_length(read_audio(e.path, 8000), 8000) for e in entries]))


def _quiet(**kw) -> AudioFrontEnd:
    """A front end without random parts unless asked for."""
    base = dict(gain_db=0.0, noise_prob=0.0, freq_mask=0, time_mask=0)
    return AudioFrontEnd(**{**base, **kw})


@pytest.mark.parametrize("kind, shape", [("logmel", (3, 1, 64, 63)), ("mfcc", (3, 1, 40, 63)),
                                         ("waveform", (3, 1, 8000))])
def test_output_shapes(kind: str, shape: tuple[int, ...]):
    fe = _quiet(kind=kind).eval()
    out = fe(torch.randn(3, 8000) * 0.1)
    assert out.shape == shape
    assert fe.output_shape(8000) == shape[1:]
    assert torch.isfinite(out).all()


def test_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        _quiet().eval()(torch.randn(2, 1, 8000))


@needs_fsdd
@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_fitted_normalisation_standardises_training_features(clips: torch.Tensor, kind: str):
    fe = _quiet(kind=kind).eval()
    mean, std = fit_normalisation(fe, clips.split(32))
    assert mean.shape == std.shape == (fe.bins,)
    assert torch.equal(fe.norm_mean, mean) and torch.equal(fe.norm_std, std)
    with torch.no_grad():
        feats = fe(clips)  # (clips, 1, bins, frames), standardised
    per_bin_mean = feats.mean(dim=(0, 1, 3))
    per_bin_std = feats.std(dim=(0, 1, 3))
    assert per_bin_mean.abs().max() < 1e-3
    assert (per_bin_std - 1).abs().max() < 1e-2
    # Before the fit the features were far from standard (dB values around -40 for logmel).
    raw = fe.features(fe.prepare(clips))
    assert raw.mean(dim=(0, 1, 3)).abs().max() > 1


@needs_fsdd
def test_normalisation_buffers_survive_state_dict_save_and_load(clips: torch.Tensor, tmp_path: Path):
    fe = _quiet().eval()
    fit_normalisation(fe, [clips])
    assert {"norm_mean", "norm_std"} <= set(fe.state_dict())
    torch.save(fe.state_dict(), tmp_path / "fe.pt")
    fresh = _quiet().eval()
    assert not torch.allclose(fresh.norm_mean, fe.norm_mean)
    fresh.load_state_dict(torch.load(tmp_path / "fe.pt", weights_only=True))
    torch.testing.assert_close(fresh(clips[:8]), fe(clips[:8]), rtol=0, atol=0)


def test_spec_augment_masks_only_in_training_mode():
    torch.manual_seed(0)
    fe = _quiet(freq_mask=10, time_mask=10, num_freq_masks=2, num_time_masks=2)
    x = torch.randn(6, 8000) * 0.1
    fe.eval()
    clean = fe(x)
    torch.testing.assert_close(fe(x), clean, rtol=0, atol=0)  # eval: no randomness
    fe.train()
    masked = fe(x)
    changed = masked != clean
    assert changed.any()
    assert (masked[changed] == 0).all()  # masked cells hold 0, the fitted mean
    assert not torch.equal(fe(x), masked)  # fresh masks each call
    fe.eval()
    torch.testing.assert_close(fe(x), clean, rtol=0, atol=0)


def test_gain_and_noise_only_in_training_mode():
    fe = _quiet(kind="waveform", gain_db=6.0, noise_prob=1.0, noise_snr_db=(10.0, 20.0))
    x = torch.randn(4, 8000) * 0.1
    fe.eval()
    peak1 = fe(x)
    assert torch.allclose(peak1.abs().amax(dim=-1), torch.ones(4, 1))  # eval: only peak normalisation
    fe.train()
    aug = fe(x)
    noise = aug - peak1 * (aug * peak1).sum(-1, keepdim=True) / (peak1 * peak1).sum(-1, keepdim=True)
    snr = 10 * torch.log10(peak1.pow(2).mean(-1) / noise.pow(2).mean(-1))
    assert not torch.equal(aug, peak1)
    assert (snr > 7).all() and (snr < 25).all()


def test_eval_features_of_a_clip_do_not_depend_on_its_batch():
    fe = _quiet(kind="logmel").eval()
    loud, quiet = torch.randn(1, 8000) * 0.5, torch.randn(1, 8000) * 1e-3
    alone = fe(quiet)
    together = fe(torch.cat([loud, quiet]))[1:]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_peak_normalisation_removes_level_and_keeps_silence_finite():
    fe = _quiet().eval()
    x = torch.randn(1, 8000) * 0.3
    torch.testing.assert_close(fe(x * 0.01), fe(x), rtol=1e-4, atol=1e-3)
    assert torch.isfinite(fe(torch.zeros(2, 8000))).all()


def test_normalisation_statistics_must_match_bins():
    with pytest.raises(ValueError, match="bins"):
        _quiet(n_mels=32).set_normalisation(torch.zeros(64), torch.ones(64))


# ---------------------------------------------------------------- augmentations for new voices and recording chains


def _tone(freq: float, n: int = 8000, sr: int = 8000) -> torch.Tensor:
    return torch.sin(2 * torch.pi * freq * torch.arange(n) / sr)


def _peak_hz(x: torch.Tensor, sr: int = 8000) -> float:
    spec = torch.fft.rfft(x * torch.hann_window(len(x))).abs()
    return float(torch.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


def test_speed_perturbation_scales_pitch_and_duration_about_the_centre():
    x = _tone(500.0)[None]
    torch.testing.assert_close(speed_perturb(x, torch.tensor([1.0])), x)
    fast = speed_perturb(x, torch.tensor([1.2]))[0]
    assert abs(_peak_hz(fast[1000:7000]) - 600) < 15  # 500 Hz played 1.2 times as fast
    burst = torch.zeros(1, 8000)
    burst[0, 3000:5000] = 1.0  # 0.25 s in the middle
    slow = speed_perturb(burst, torch.tensor([0.8]))[0]
    assert abs(int((slow > 0.5).sum()) - 2500) <= 2  # lasts 1 / 0.8 as long, still centred
    assert abs(float((slow > 0.5).nonzero().float().mean()) - 3999.5) < 2


def test_frequency_warp_moves_spectral_content_without_changing_time():
    fe = _quiet(kind="logmel").eval()
    x = _tone(1000.0)[None]
    power = fe.spec.spectrogram(x.unsqueeze(1))  # (1, 1, 129, frames)
    torch.testing.assert_close(frequency_warp(power, torch.tensor([1.0])), power)
    warped = frequency_warp(power, torch.tensor([1.1]))
    assert int(power[0, 0].mean(-1).argmax()) == 32 and int(warped[0, 0].mean(-1).argmax()) in (35, 36)
    assert warped.shape == power.shape


def test_random_filter_stays_within_its_gain_and_is_a_linear_filter():
    torch.manual_seed(1)
    x = torch.randn(8, 8000) * 0.1
    torch.testing.assert_close(random_equalise(x, 8000, 0.0), x, rtol=0, atol=1e-5)
    torch.manual_seed(3)
    y = random_equalise(x, 8000, 6.0)
    gain_db = 20 * torch.log10(torch.fft.rfft(y).abs() / torch.fft.rfft(x).abs())
    assert gain_db.abs().max() < 6.0 + 1e-3 and gain_db.std() > 0.5  # shaped, and bounded by +-6 dB
    torch.manual_seed(3)
    twice = random_equalise(2 * x, 8000, 6.0)
    torch.testing.assert_close(twice, 2 * y, rtol=1e-4, atol=1e-5)


def test_coloured_noise_has_unit_rms_and_the_asked_slope():
    torch.manual_seed(2)
    n = coloured_noise(3, 8000, torch.tensor([0.0, 1.0, 2.0]), torch.device("cpu"))
    torch.testing.assert_close(n.pow(2).mean(1), torch.ones(3), rtol=1e-4, atol=1e-4)
    power = torch.fft.rfft(n).abs().pow(2)
    low, high = power[:, 40:400].mean(1), power[:, 2000:4000].mean(1)  # ~40-400 Hz against 2-4 kHz
    ratio_db = 10 * torch.log10(low / high)
    assert abs(float(ratio_db[0])) < 1.5 and 10 < float(ratio_db[1]) < 20 and float(ratio_db[2]) > 25


def test_resampling_through_a_lower_rate_removes_the_band_above_its_half():
    x = torch.stack([_tone(1000.0) + _tone(3000.0), _tone(1000.0) + _tone(3000.0)])
    y = resample_through(x, 8000, [4000], torch.tensor([0, -1]))
    spec = torch.fft.rfft(y).abs()
    assert y.shape == x.shape
    assert spec[0, 3000] < 0.01 * spec[0, 1000]  # 3 kHz is above 4 kHz / 2: gone
    assert spec[0, 1000] > 0.9 * torch.fft.rfft(x[0]).abs()[1000]  # 1 kHz kept
    torch.testing.assert_close(y[1], x[1])  # choice -1: untouched


def test_every_augmentation_runs_only_in_training():
    fe = _quiet(speed=0.1, pitch=0.1, eq_db=6.0, eq_prob=1.0, noise_prob=1.0, noise_colour="coloured",
                resample_rates=(4000, 11025), resample_prob=1.0, gain_db=3.0)
    x = torch.randn(4, 8000) * 0.1
    fe.eval()
    clean = fe(x)
    torch.testing.assert_close(fe(x), clean, rtol=0, atol=0)
    torch.testing.assert_close(clean, _quiet().eval()(x), rtol=0, atol=0)
    fe.train()
    aug = fe(x)
    assert aug.shape == clean.shape and torch.isfinite(aug).all() and not torch.equal(aug, clean)
