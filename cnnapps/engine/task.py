"""The task contract: what a task plugin supplies to the shared engine. It sits at the engine's floor (it imports
only the config and metric types), so the trainer, the callbacks and every task can import it without a cycle."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cnnapps.engine.config import ConfigError, TrainConfig
from cnnapps.metrics.base import Metric

if TYPE_CHECKING:
    from cnnapps.understand.views import ExplainSamples, ExplainView, LoadedInput


# the names a batch dict's model input goes by in the built-in tasks (``Task.example_inputs``)
_INPUT_KEYS = ("x", "input", "image", "wave", "signal")


@dataclass
class TaskConfig:
    """A task's config: three sections. Tasks subclass it and replace ``data`` and ``model`` with their own
    dataclasses; ``train`` is the engine's and the same for every task."""

    data: Any = None
    model: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DataSplits:
    """What ``Task.build_data`` returns.

    ``state`` is the preprocessing a model needs to be used later (class names, sampling rate, fitted
    normalisation, ...): plain Python/NumPy/tensor values, saved in every checkpoint and handed back to
    ``build_data(..., state=...)`` and ``predict`` so evaluation on new data repeats the training-time pipeline.
    ``sample_weights`` (optional, one per training example) turns on a weighted sampler for rare classes.
    """

    train: Dataset | None
    val: Dataset | None
    test: Dataset | None
    state: dict[str, Any] = field(default_factory=dict)
    collate_fn: Callable | None = None
    sample_weights: torch.Tensor | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, shown in the report


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP and ``torch.compile`` wrappers (a task's ``step`` receives the wrapped one)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class Task:
    """Base class of task plugins. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    monitor: ClassVar[str] = "accuracy"  # eval metric that picks best.pt and drives early stopping
    monitor_mode: ClassVar[str] = "max"
    bench_config: ClassVar[str] = "ci"  # the shipped config `bench` runs by default
    # the shipped config `bench --engine` times through our Trainer, a bare loop and Lightning (None: not timed)
    engine_bench_config: ClassVar[str | None] = None
    # runs `scripts/gpu_check.sh` makes beyond the task's bench config: (config, extra --set overrides)
    gpu_check_runs: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()

    @classmethod
    def config_dir(cls) -> Path:
        """The folder of the configs this task ships: ``configs/`` beside the module that defines the class
        (``cnnapps/tasks/<task>/configs`` for the built-in tasks; a third-party task ships its own)."""
        module = sys.modules[cls.__module__]
        return Path(module.__file__).resolve().parent / "configs"

    # ---- required ----
    def build_data(self, cfg: TaskConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        """Datasets for train/val/test. ``state`` (from a checkpoint) overrides anything fitted on data.
        ``split='all'`` asks for every example of the folder ``data_root`` in ``test`` (evaluate --split all)."""
        raise NotImplementedError

    def build_model(self, cfg: TaskConfig, data: DataSplits) -> nn.Module:
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Any, cfg: TaskConfig) -> dict[str, Any]:
        """One forward pass on a batch already on the device: ``{"loss": scalar tensor, "output": ...}``."""
        raise NotImplementedError

    def metrics(self, cfg: TaskConfig, data: DataSplits) -> Metric:
        raise NotImplementedError

    # ---- optional ----
    def param_groups(self, model: nn.Module, cfg: TaskConfig) -> Iterable[dict] | None:
        """Optimiser parameter groups (e.g. a lower learning rate for a pretrained backbone); None: one group."""
        return None

    def callbacks(self, cfg: TaskConfig) -> list[Any]:
        """The task's own callbacks (``cnnapps.engine.callbacks.Callback``), run in every fit of this task beside
        the engine's (e.g. per-class thresholds calibrated after each validation)."""
        return []

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: TaskConfig,
                device: torch.device, **kw: Any) -> Iterator[dict]:
        """Yield one JSON-ready dict per input path."""
        raise NotImplementedError(f"task {self.name!r} has no predict")

    def predict_options(self, parser: Any) -> None:
        """Add task-specific ``predict`` flags to an argparse parser."""

    def bench_extra(self, cfg: TaskConfig, data_root: Path) -> dict[str, Any]:
        """Task-specific measurements that ``bench`` adds to the results file (pipeline throughput, ...)."""
        return {}

    def bench_runs(self, cfg: TaskConfig, data_root: Path) -> list[tuple[str, TaskConfig]]:
        """The trainings one ``bench`` record is made of: ``[("", cfg)]``, one run, by default. A task may return
        several named configs (the folds of a cross-validation; ``group/fold`` names for variants over the same
        folds); bench then trains and tests each, and reports the mean of their test metrics with the monitor's
        minimum, maximum and spread, and a table of one row per run."""
        return [("", cfg)]

    def bench_report(self, cfg: TaskConfig, run_dir: Path, results_dir: Path, key: str,
                     data_root: Path | None = None) -> dict[str, Any]:
        """What the task adds to its results section, made from a finished run folder ``run_dir`` (what
        ``report`` wrote there, and ``run_dir/checkpoints/best.pt``) before a bench run's folder is deleted:
        ``{"notes": [Markdown paragraphs], "tables": [{"title": str, "columns": [...], "rows": [[...], ...],
        "note": str (optional)}], "pictures": {caption: file name the hook wrote into results_dir}, "extra":
        {measurement: value}}``, any part optional; other keys are kept in the JSON only. ``key``: the section's
        name in the results file; ``data_root``: the data folder (None when a finished ``train`` run is recorded
        without it). Called once per run of ``bench_runs``. Default: {}."""
        return {}

    def speed_measurements(self, data_root: Path | None) -> dict[str, Any]:
        """Task-specific speed numbers for ``bench --speed`` (data pipelines, front ends): {name: value}.
        ``data_root`` is None where no data is present; return what can be measured without it."""
        return {}

    def example_inputs(self, model: nn.Module, data: DataSplits, count: int = 8) -> torch.Tensor:
        """Up to ``count`` examples of the test split (else validation, else training) as the one tensor the
        model's ``forward`` takes in evaluation, e.g. (count, C, H, W); ``cnnapps export`` checks an exported
        model against eager outputs on them. The default batches the split with ``data.collate_fn`` and takes
        the batch's first item (a tuple), its input entry (a dict: the first of ``"x"``, ``"input"``, ``"image"``,
        ``"wave"``, ``"signal"`` it has) or the batch itself (a tensor), passed through
        ``model.prepare`` where the model has one (nets that take normalised floats from uint8 images).
        A task whose model takes anything else overrides this; ValueError when there is nothing to take."""
        dataset = next((d for d in (data.test, data.val, data.train) if d is not None and len(d)), None)
        if dataset is None:
            raise ValueError(f"task {self.name!r}: no examples to export with (every split is empty)")
        batch = next(iter(DataLoader(dataset, batch_size=count, shuffle=False, collate_fn=data.collate_fn)))
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"task {self.name!r}: its batches hold no single input tensor to export with")
        prepare = getattr(model, "prepare", None)
        return prepare(batch) if callable(prepare) else batch.float()

    def deployment_example(self) -> tuple[str, nn.Module, tuple[int, ...]] | None:
        """For ``bench --deploy``: (label, the task's model as its default config builds it, in eval mode, one
        input's shape without the batch) to time in eager, torch.compile and ONNX Runtime; None (the default):
        the task's nets are the zoo backbones the benchmark already times."""
        return None

    def deployment_info(self, cfg: TaskConfig, state: dict[str, Any]) -> dict[str, Any]:
        """Task-specific facts for the preprocessing JSON that ``cnnapps export`` writes beside a model, beyond
        the generic ones it reads from the data state (classes, mean/std, image size, sampling rate): e.g. what
        the outputs mean. Plain JSON values; the default adds nothing."""
        return {}

    def report(self, run_dir: Path, metric: Metric, data: DataSplits) -> dict[str, str]:
        """Write plots for a finished evaluation into ``run_dir``; return {what: relative path}."""
        return {}

    # ---- explain hooks: `cnnapps explain`, `visualize`, `understand-report` (types: cnnapps.understand.views)
    def explain_view(self, model: nn.Module, cfg: TaskConfig, state: dict) -> ExplainView:
        """A checkpoint's model (eval mode) as attribution sees it: a tensor-in, logits-out model, its backbone,
        the kind of input, class names, input shape, sampling rate, front end."""
        raise no_explain_hook(self, "explain_view")

    def explain_input(self, view: ExplainView, path: str, **options: Any) -> LoadedInput:
        """One input file read with the task's own preprocessing, as ``view.model`` takes it. ``options``: the
        command line's (``start_s``, ``max_seconds``, ``lead``); a task ignores those it has no use for. Raises
        ValueError naming the file when it cannot be read."""
        raise no_explain_hook(self, "explain_input")

    def explain_examples(self, view: ExplainView, data: DataSplits, split: str,
                         max_examples: int) -> Iterator[LoadedInput]:
        """The first ``max_examples`` examples of ``split`` of ``data`` (built with the checkpoint's state), each
        as ``explain_input`` would return it (``visualize --what topk``)."""
        raise no_explain_hook(self, "explain_examples")

    def explain_samples(self, data_root: Path, out_dir: Path) -> ExplainSamples:
        """A few input files of the task's own data (written into ``out_dir`` where they are not files already)
        for ``understand-report``'s pictures and timings."""
        raise no_explain_hook(self, "explain_samples")


def no_explain_hook(task: Task, hook: str) -> ConfigError:
    """The one-line error for a task that lacks the explain hook ``hook`` (the hook's default raises it)."""
    return ConfigError(f"task {task.name!r} has no explain hook: it would need Task.{hook} (see "
                       "cnnapps.understand.views) to be explained")
