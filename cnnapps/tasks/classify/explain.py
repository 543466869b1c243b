"""The classification task's explain hooks (``cnnapps explain``, ``visualize``, ``understand-report``): image
checkpoints as tensor-in, logits-out models, files read and normalised as ``predict`` reads them."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnapps.data.images import read_image
from cnnapps.tasks.classify.data import fit_to_size, load_mnist, to_float_chw
from cnnapps.understand.views import ExplainSamples, ExplainView, LoadedInput, image_display, split_dataset


class ClassifyExplain:
    """Mixed into the classification task: the explain hooks of ``cnnapps.engine.task.Task``."""

    name: str

    def explain_view(self, model: nn.Module, cfg: Any, state: dict) -> ExplainView:
        size, chans = int(state["image_size"]), int(state["in_chans"])
        return ExplainView(self.name, "image", model, model, list(state["class_names"]), state, cfg,
                           (chans, size, size), mean=[float(v) for v in state["mean"]],
                           std=[float(v) for v in state["std"]], about=str(getattr(cfg.model, "backbone", "")))

    def explain_input(self, view: ExplainView, path: str, **options: Any) -> LoadedInput:
        """An image file fitted to the model's size and channels and normalised with the training statistics:
        ``x`` (1, C, S, S), ``display`` (S, S, 3) in [0, 1]. ValueError naming the file when it is unreadable."""
        chans, size, _ = view.input_shape
        x01 = fit_to_size(to_float_chw(read_image(path)[None], chans), size)  # (1, C, S, S) in [0, 1]
        return LoadedInput(path, (x01 - _stat(view.mean)) / _stat(view.std), image_display(x01[0]))

    def explain_examples(self, view: ExplainView, data: Any, split: str, max_examples: int) -> Iterator[LoadedInput]:
        dataset = split_dataset(view, data, split)
        mean, std = _stat(view.mean)[0], _stat(view.std)[0]
        for i in range(min(len(dataset), max_examples)):
            x = dataset[i][0]
            yield LoadedInput(f"{split}[{i}]", x[None], image_display(x * std + mean))

    def explain_samples(self, data_root: Path, out_dir: Path) -> ExplainSamples:
        """The first four MNIST test digits, written as PNG files (the ci config's data)."""
        from PIL import Image

        test = load_mnist(data_root).test
        files = []
        for i in range(4):
            path = out_dir / f"mnist_test_{i}_label{int(test.labels[i])}.png"
            Image.fromarray(test.images[i][..., 0]).save(path)
            files.append(str(path))
        return ExplainSamples(files, "MNIST test digits")


def _stat(values: list[float] | None) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
