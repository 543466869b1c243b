"""Audio benchmarks: spectrograms per second of the front end, and training-step throughput of the whole model."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from cnnapps.tasks.audio.task import AudioConfig, AudioModel, make_frontend


def _threads(threads: int) -> int:
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def frontend_throughput(cfg: AudioConfig | None = None, batch_size: int = 64, batches: int = 20,
                        threads: int = 0, device: str = "cpu", warmup: int = 2) -> dict[str, Any]:
    """Time the evaluation front end (peak normalisation, features, per-bin normalisation) on batches of
    ``batch_size`` random clips (batch, clip_samples) of the config's length.

    Returns ``{"spectrograms_per_s", "ms_per_batch", "batch_size", "clip_seconds", "features", "output_shape",
    "threads", "device"}``; ``threads`` > 0 sets torch's intra-op threads first."""
    cfg = cfg or AudioConfig()
    n_threads = _threads(threads)
    fe = make_frontend(cfg.model, cfg.data.sample_rate).to(device).eval()
    clip = int(round(cfg.data.clip_seconds * cfg.data.sample_rate))
    x = (torch.randn(batch_size, clip) * 0.1).to(device)
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
            "batch_size": batch_size, "clip_seconds": cfg.data.clip_seconds, "features": fe.kind,
            "output_shape": list(fe.output_shape(clip)), "threads": n_threads, "device": device}


def train_step_throughput(cfg: AudioConfig | None = None, num_classes: int = 10, batch_size: int = 0,
                          steps: int = 5, threads: int = 0, warmup: int = 1) -> dict[str, Any]:
    """Clips per second of full training steps (front end with augmentation, backbone, loss, backward, AdamW) on
    the CPU with random clips; the normalisation is left unfitted, which does not change the cost.

    Returns ``{"train_clips_per_s", "ms_per_step", "batch_size", "backbone", "threads"}``."""
    from cnnapps import create_backbone

    cfg = cfg or AudioConfig()
    n_threads = _threads(threads)
    bs = batch_size or cfg.train.batch_size
    fe = make_frontend(cfg.model, cfg.data.sample_rate)
    model = AudioModel(fe, create_backbone(cfg.model.backbone, num_classes=num_classes, in_chans=1,
                                           **cfg.model.kwargs)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clip = int(round(cfg.data.clip_seconds * cfg.data.sample_rate))
    x, y = torch.randn(bs, clip) * 0.1, torch.randint(0, num_classes, (bs,))

    def one() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    dt = time.perf_counter() - t0
    return {"train_clips_per_s": round(bs * steps / dt, 1), "ms_per_step": round(1000 * dt / steps, 1),
            "batch_size": bs, "backbone": cfg.model.backbone, "threads": n_threads}
