"""Audio benchmark: spectrograms per second of the evaluation front end."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


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
