"""The on-device audio front end: waveform augmentation, log-mel or MFCC features, per-frequency normalisation
fitted on the training split (stored as buffers, so checkpoints carry it) and SpecAugment."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torchaudio.transforms as TT
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("logmel", "mfcc", "waveform")


class AudioFrontEnd(nn.Module):
    """Waveforms (batch, samples) -> model inputs.

    ``kind='logmel'``: (batch, 1, n_mels, frames) log-mel power in dB; ``'mfcc'``: (batch, 1, n_mfcc, frames);
    ``'waveform'``: (batch, 1, samples). ``frames = 1 + samples // hop_length``.

    Order: per-clip peak normalisation (optional; levels differ by 20 dB between FSDD speakers, and loudness must
    not identify the speaker) -> in training, gain and additive-noise augmentation -> features -> per-bin
    standardisation with ``norm_mean``/``norm_std`` (buffers fitted by ``fit_normalisation``) -> in training,
    SpecAugment frequency and time masks (masked cells become 0, the training mean). Every random part runs only
    when ``self.training``; in eval mode the output of a clip does not depend on the rest of the batch."""

    def __init__(self, sample_rate: int = 8000, kind: str = "logmel", n_fft: int = 256, hop_length: int = 128,
                 n_mels: int = 64, n_mfcc: int = 40, f_min: float = 20.0, f_max: float = 0.0, top_db: float = 80.0,
                 peak_normalize: bool = True, gain_db: float = 0.0, noise_prob: float = 0.0,
                 noise_snr_db: tuple[float, float] = (10.0, 40.0), freq_mask: int = 0, time_mask: int = 0,
                 num_freq_masks: int = 1, num_time_masks: int = 1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"model.features: unknown {kind!r}; choose one of {', '.join(KINDS)}")
        if n_fft <= 0 or hop_length <= 0 or n_mels <= 0:
            raise ValueError(f"n_fft ({n_fft}), hop_length ({hop_length}) and n_mels ({n_mels}) must be positive")
        if kind == "mfcc" and not 0 < n_mfcc <= n_mels:
            raise ValueError(f"model.n_mfcc ({n_mfcc}) must be in 1..n_mels ({n_mels})")
        self.sample_rate, self.kind, self.hop_length = sample_rate, kind, hop_length
        self.peak_normalize = peak_normalize
        self.gain_db, self.noise_prob = gain_db, noise_prob
        self.noise_snr_db = (float(noise_snr_db[0]), float(noise_snr_db[1]))
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

    def augment_wave(self, wave: torch.Tensor) -> torch.Tensor:
        """Random gain (uniform in +-gain_db) and, with probability noise_prob, white noise at an SNR uniform in
        noise_snr_db relative to the clip's RMS. (batch, samples) -> (batch, samples)."""
        b = wave.shape[0]
        if self.gain_db > 0:
            g = (torch.rand(b, 1, device=wave.device) * 2 - 1) * self.gain_db
            wave = wave * torch.pow(10.0, g / 20)
        if self.noise_prob > 0:
            lo, hi = self.noise_snr_db
            snr = lo + torch.rand(b, 1, device=wave.device) * (hi - lo)
            rms = wave.pow(2).mean(dim=1, keepdim=True).sqrt()
            on = (torch.rand(b, 1, device=wave.device) < self.noise_prob).float()
            wave = wave + on * torch.randn_like(wave) * rms * torch.pow(10.0, -snr / 20)
        return wave

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """Unnormalised features of prepared waveforms: (batch, samples) -> (batch, 1, bins, frames)."""
        # The 4D shape makes AmplitudeToDB's top_db clamp per clip, not per batch.
        x = wave.unsqueeze(1)
        if self.kind == "logmel":
            return self.to_db(self.spec(x))
        return self.spec(x)

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
        x = self.normalize(self.features(wave))
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
