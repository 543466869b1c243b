"""The on-device audio front end: waveform augmentation, log-mel or MFCC features, per-frequency normalisation
fitted on the training split (stored as buffers, so checkpoints carry it) and SpecAugment."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
import torchaudio.functional as AF
import torchaudio.transforms as TT
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("logmel", "mfcc", "waveform")


# ---------------------------------------------------------------- augmentations (batched, training only)


def speed_perturb(wave: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each clip played ``factors[i]`` times as fast about its centre (tempo and pitch together, as a tape run
    faster or slower): (batch, samples) -> (batch, samples). Linear interpolation between samples; where the
    source position falls outside the clip the output is zero (silence, as the padding of short clips)."""
    b, n = wave.shape
    centre = (n - 1) / 2
    pos = centre + (torch.arange(n, device=wave.device, dtype=torch.float32) - centre)[None] * factors[:, None]
    valid = (pos >= 0) & (pos <= n - 1)
    lo = pos.floor().clamp(0, n - 1)
    frac = pos - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n - 1)
    out = wave.gather(1, lo) * (1 - frac) + wave.gather(1, hi) * frac
    return out * valid


def frequency_warp(power: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Vocal-tract-length perturbation (Jaitly and Hinton 2013) of power spectrograms (batch, 1, freqs, frames):
    each clip's frequency axis is scaled by ``factors[i]`` (content at bin k moves to bin k * factor), which
    raises or lowers pitch and formants together without changing tempo. Linear interpolation between bins; bins
    whose source lies above the top bin are zero. Returns the same shape."""
    b, c, nf, t = power.shape
    k = torch.arange(nf, device=power.device, dtype=torch.float32)
    src = k[None] / factors[:, None]  # (batch, freqs)
    valid = (src <= nf - 1).to(power.dtype)
    lo = src.floor().clamp(0, nf - 1)
    frac = (src - lo).to(power.dtype)
    lo = lo.long()
    hi = (lo + 1).clamp(max=nf - 1)

    def take(idx: torch.Tensor) -> torch.Tensor:
        return power.gather(2, idx[:, None, :, None].expand(b, c, nf, t))

    w = frac[:, None, :, None]
    return (take(lo) * (1 - w) + take(hi) * w) * valid[:, None, :, None]


def random_equalise(wave: torch.Tensor, sample_rate: int, max_db: float) -> torch.Tensor:
    """A random linear filter per clip, as different microphones and rooms colour a voice: (batch, samples) ->
    (batch, samples). The filter's gain over frequency is a smooth curve in dB (a tilt of up to +-max_db/2 per
    two octaves around 1 kHz plus two bumps or dips of up to +-max_db, each 0.3 to 1.5 octaves wide, at random
    places), clamped to +-max_db, applied to the clip's spectrum (zero phase)."""
    b, n = wave.shape
    dev = wave.device
    spec = torch.fft.rfft(wave, dim=1)
    freqs = torch.fft.rfftfreq(n, d=1.0 / sample_rate).to(dev)
    octave = torch.log2(freqs.clamp_min(50.0) / 1000.0)[None]  # (1, bins)
    curve = (torch.rand(b, 1, device=dev) * 2 - 1) * (max_db / 2) * octave / 2
    top = math.log2(0.45 * sample_rate / 1000.0)
    for _ in range(2):
        centre = math.log2(0.1) + torch.rand(b, 1, device=dev) * (top - math.log2(0.1))
        width = 0.3 + torch.rand(b, 1, device=dev) * 1.2
        gain = (torch.rand(b, 1, device=dev) * 2 - 1) * max_db
        curve = curve + gain * torch.exp(-0.5 * ((octave - centre) / width) ** 2)
    curve = curve.clamp(-max_db, max_db)
    return torch.fft.irfft(spec * torch.pow(10.0, curve / 20), n=n, dim=1)


def coloured_noise(batch: int, samples: int, exponents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Noise with power falling as 1 / f**exponents[i] (0 white, 1 pink, 2 brown), each row scaled to unit RMS:
    (batch, samples)."""
    white = torch.randn(batch, samples, device=device)
    spec = torch.fft.rfft(white, dim=1)
    k = torch.arange(spec.shape[1], device=device, dtype=torch.float32).clamp_min(1.0)[None]
    noise = torch.fft.irfft(spec * k.pow(-exponents[:, None] / 2), n=samples, dim=1)
    return noise / noise.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)


def resample_through(wave: torch.Tensor, sample_rate: int, rates: Sequence[int], choice: torch.Tensor) -> torch.Tensor:
    """Clips resampled to another rate and back, as a recording made or sent at that rate: row i goes through
    ``rates[choice[i]]`` (choice -1: unchanged). A lower rate removes the band above its half; a higher one
    only the filter's roll-off. (batch, samples) -> (batch, samples), torchaudio's windowed-sinc resampler (the
    one every file is read with)."""
    out = wave.clone()
    n = wave.shape[1]
    for j, rate in enumerate(rates):
        rows = (choice == j).nonzero().flatten()
        if len(rows) == 0 or int(rate) == sample_rate:
            continue
        y = AF.resample(AF.resample(wave[rows], sample_rate, int(rate)), int(rate), sample_rate)
        out[rows] = y[:, :n] if y.shape[1] >= n else torch.nn.functional.pad(y, (0, n - y.shape[1]))
    return out


# ---------------------------------------------------------------- the front end


class AudioFrontEnd(nn.Module):
    """Waveforms (batch, samples) -> model inputs.

    ``kind='logmel'``: (batch, 1, n_mels, frames) log-mel power in dB; ``'mfcc'``: (batch, 1, n_mfcc, frames);
    ``'waveform'``: (batch, 1, samples). ``frames = 1 + samples // hop_length``.

    Order: per-clip peak normalisation (optional; levels differ by 20 dB between FSDD speakers, and loudness must
    not identify the speaker) -> in training, the waveform augmentations (speed perturbation, resampling through
    other rates, random equalisation, gain, white or coloured noise) -> features (in training with a random
    frequency warp of the power spectrum) -> per-bin standardisation with ``norm_mean``/``norm_std`` (buffers
    fitted by ``fit_normalisation``) -> in training, SpecAugment frequency and time masks (masked cells become
    0, the training mean). Every random part runs only when ``self.training``; in eval mode the output of a clip
    does not depend on the rest of the batch."""

    def __init__(self, sample_rate: int = 8000, kind: str = "logmel", n_fft: int = 256, hop_length: int = 128,
                 n_mels: int = 64, n_mfcc: int = 40, f_min: float = 20.0, f_max: float = 0.0, top_db: float = 80.0,
                 peak_normalize: bool = True, gain_db: float = 0.0, noise_prob: float = 0.0,
                 noise_snr_db: tuple[float, float] = (10.0, 40.0), freq_mask: int = 0, time_mask: int = 0,
                 num_freq_masks: int = 1, num_time_masks: int = 1, speed: float = 0.0, pitch: float = 0.0,
                 eq_db: float = 0.0, eq_prob: float = 0.0, noise_colour: str = "white",
                 resample_rates: Sequence[int] = (), resample_prob: float = 0.0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"model.features: unknown {kind!r}; choose one of {', '.join(KINDS)}")
        if n_fft <= 0 or hop_length <= 0 or n_mels <= 0:
            raise ValueError(f"n_fft ({n_fft}), hop_length ({hop_length}) and n_mels ({n_mels}) must be positive")
        if kind == "mfcc" and not 0 < n_mfcc <= n_mels:
            raise ValueError(f"model.n_mfcc ({n_mfcc}) must be in 1..n_mels ({n_mels})")
        if noise_colour not in ("white", "coloured"):
            raise ValueError(f"model.noise_colour: unknown {noise_colour!r}; choose white or coloured")
        self.sample_rate, self.kind, self.hop_length = sample_rate, kind, hop_length
        self.peak_normalize = peak_normalize
        self.gain_db, self.noise_prob = gain_db, noise_prob
        self.noise_snr_db = (float(noise_snr_db[0]), float(noise_snr_db[1]))
        self.speed, self.pitch, self.eq_db, self.eq_prob = speed, pitch, eq_db, eq_prob
        self.noise_colour = noise_colour
        self.resample_rates, self.resample_prob = tuple(int(r) for r in resample_rates), resample_prob
        f_max = f_max or sample_rate / 2
        melkw = dict(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_min=f_min,
                     f_max=f_max, power=2.0)
        if kind == "logmel":
            self.spec = TT.MelSpectrogram(**melkw)
            self.to_db = TT.AmplitudeToDB(stype="power", top_db=top_db)
        elif kind == "mfcc":
            self.spec = TT.MFCC(sample_rate=sample_rate, n_mfcc=n_mfcc, log_mels=False,
                                melkwargs={k: v for k, v in melkw.items() if k != "sample_rate"})
            self.spec.amplitude_to_DB = TT.AmplitudeToDB(stype="power", top_db=top_db)  # MFCC fixes it at 80
        self.bins = {"logmel": n_mels, "mfcc": n_mfcc, "waveform": 0}[kind]
        self.register_buffer("norm_mean", torch.zeros(self.bins))
        self.register_buffer("norm_std", torch.ones(self.bins))
        self.freq_masks = nn.ModuleList([TT.FrequencyMasking(freq_mask, iid_masks=True)
                                         for _ in range(num_freq_masks if freq_mask > 0 else 0)])
        self.time_masks = nn.ModuleList([TT.TimeMasking(time_mask, iid_masks=True)
                                         for _ in range(num_time_masks if time_mask > 0 else 0)])

    # ---- pieces
    def output_shape(self, samples: int) -> tuple[int, int, int] | tuple[int, int]:
        """Shape of one example's output (without batch): (1, bins, frames) or (1, samples) for waveforms."""
        if self.kind == "waveform":
            return (1, samples)
        return (1, self.bins, 1 + samples // self.hop_length)

    def prepare(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, samples), each clip scaled to peak 1 (silent clips stay zero)."""
        if wave.dim() != 2:
            raise ValueError(f"audio front end expects (batch, samples), got shape {tuple(wave.shape)}")
        wave = wave.float()
        if self.peak_normalize:
            peak = wave.abs().amax(dim=1, keepdim=True)
            wave = wave / peak.clamp_min(1e-8)
        return wave

    def _chosen(self, b: int, prob: float, device: torch.device) -> torch.Tensor:
        """(b, 1) float mask: 1 for the clips an augmentation of probability ``prob`` touches."""
        return (torch.rand(b, 1, device=device) < prob).float()

    def augment_wave(self, wave: torch.Tensor) -> torch.Tensor:
        """The waveform augmentations, each per clip: speed factor uniform in 1 +- speed; with probability
        resample_prob, resampling through one of resample_rates; with probability eq_prob, a random filter of up
        to +-eq_db; gain uniform in +-gain_db; with probability noise_prob, white (or, for noise_colour =
        'coloured', 1/f**e noise with e uniform in 0..2) noise at an SNR uniform in noise_snr_db relative to the
        clip's RMS. (batch, samples) -> (batch, samples)."""
        b, dev = wave.shape[0], wave.device
        if self.speed > 0:
            wave = speed_perturb(wave, 1 + (torch.rand(b, device=dev) * 2 - 1) * self.speed)
        if self.resample_prob > 0 and self.resample_rates:
            pick = torch.randint(0, len(self.resample_rates), (b,), device=dev)
            pick = torch.where(torch.rand(b, device=dev) < self.resample_prob, pick, torch.full_like(pick, -1))
            wave = resample_through(wave, self.sample_rate, self.resample_rates, pick)
        if self.eq_db > 0 and self.eq_prob > 0:
            on = self._chosen(b, self.eq_prob, dev)
            wave = on * random_equalise(wave, self.sample_rate, self.eq_db) + (1 - on) * wave
        if self.gain_db > 0:
            g = (torch.rand(b, 1, device=dev) * 2 - 1) * self.gain_db
            wave = wave * torch.pow(10.0, g / 20)
        if self.noise_prob > 0:
            lo, hi = self.noise_snr_db
            snr = lo + torch.rand(b, 1, device=dev) * (hi - lo)
            rms = wave.pow(2).mean(dim=1, keepdim=True).sqrt()
            on = self._chosen(b, self.noise_prob, dev)
            if self.noise_colour == "coloured":
                noise = coloured_noise(b, wave.shape[1], torch.rand(b, device=dev) * 2, dev)
            else:
                noise = torch.randn_like(wave)
            wave = wave + on * noise * rms * torch.pow(10.0, -snr / 20)
        return wave

    def _mel(self) -> TT.MelSpectrogram:
        return self.spec if self.kind == "logmel" else self.spec.MelSpectrogram

    def features(self, wave: torch.Tensor, warp: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised features of prepared waveforms: (batch, samples) -> (batch, 1, bins, frames).
        ``warp`` (batch,): frequency-warp factors applied to the power spectrum first (training)."""
        # The 4D shape makes AmplitudeToDB's top_db clamp per clip, not per batch.
        mel = self._mel()
        power = mel.spectrogram(wave.unsqueeze(1))
        if warp is not None:
            power = frequency_warp(power, warp)
        mel_power = mel.mel_scale(power)
        if self.kind == "logmel":
            return self.to_db(mel_power)
        db = self.spec.amplitude_to_DB(mel_power)
        return torch.matmul(db.transpose(-1, -2), self.spec.dct_mat).transpose(-1, -2)

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        """(batch, 1, bins, frames) standardised per bin with the fitted buffers."""
        return (feats - self.norm_mean[:, None]) / self.norm_std[:, None]

    def spec_augment(self, feats: torch.Tensor) -> torch.Tensor:
        """SpecAugment masks on (batch, 1, bins, frames); independent per clip."""
        for m in self.freq_masks:
            feats = m(feats)
        for m in self.time_masks:
            feats = m(feats)
        return feats

    @torch.no_grad()
    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-bin statistics (bins,) in the buffers."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != self.bins or std.numel() != self.bins:
            raise ValueError(f"normalisation statistics have {mean.numel()}/{std.numel()} bins; the front end has "
                             f"{self.bins}")
        self.norm_mean.copy_(mean)
        self.norm_std.copy_(std.clamp_min(1e-5))

    # ---- the whole pipeline
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, 1, bins, frames) or (batch, 1, samples); see the class docstring."""
        wave = self.prepare(wave)
        if self.training:
            wave = self.augment_wave(wave)
        if self.kind == "waveform":
            return wave.unsqueeze(1)
        warp = None
        if self.training and self.pitch > 0:
            warp = 1 + (torch.rand(wave.shape[0], device=wave.device) * 2 - 1) * self.pitch
        x = self.normalize(self.features(wave, warp))
        if self.training:
            x = self.spec_augment(x)
        return x


@torch.no_grad()
def fit_normalisation(frontend: AudioFrontEnd, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and std (each (bins,)) of the unaugmented features of ``batches`` (each (batch, samples)),
    accumulated in float64 over clips and frames; also stored into ``frontend``'s buffers."""
    if frontend.bins == 0:
        return torch.zeros(0), torch.ones(0)
    s = torch.zeros(frontend.bins, dtype=torch.float64)
    ss = torch.zeros(frontend.bins, dtype=torch.float64)
    n = 0
    for wave in batches:
        f = frontend.features(frontend.prepare(wave)).double()  # (batch, 1, bins, frames)
        s += f.sum(dim=(0, 1, 3)).cpu()
        ss += f.pow(2).sum(dim=(0, 1, 3)).cpu()
        n += f.shape[0] * f.shape[3]
    if n == 0:
        raise ValueError("cannot fit feature normalisation on an empty training split")
    mean = s / n
    std = (ss / n - mean.pow(2)).clamp_min(0).sqrt()
    frontend.set_normalisation(mean.float(), std.float())
    return frontend.norm_mean.clone(), frontend.norm_std.clone()
