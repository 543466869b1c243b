"""Task checkpoints seen as tensor-in, logits-out models, through the explain hooks of the task that wrote them
(``Task.explain_view``, ``explain_input``, ``explain_examples``, ``explain_samples``; types in
``cnnapps.understand.views``). Nothing here knows a task: a third-party task with the hooks is explained the same
way as a built-in one."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnapps.engine.task import Task, no_explain_hook
from cnnapps.understand.views import KINDS, ExplainSamples, ExplainView, LoadedInput

log = logging.getLogger(__name__)

__all__ = ["KINDS", "ExplainView", "LoadedInput", "ExplainSamples", "has_explain_hooks", "explainable_tasks",
           "load_view", "load_input", "iter_examples", "sample_inputs"]

HOOKS = ("explain_view", "explain_input")  # the two a task needs to be explained at all


def _missing(task: Task, hooks: tuple[str, ...]) -> list[str]:
    return [h for h in hooks if getattr(type(task), h) is getattr(Task, h)]


def has_explain_hooks(task: Task, hooks: tuple[str, ...] = HOOKS) -> bool:
    """Whether ``task`` implements the explain hooks ``hooks`` (overrides the Task base's defaults)."""
    return not _missing(task, hooks)


def _require(task: Task, hooks: tuple[str, ...] = HOOKS) -> None:
    """ConfigError ("task X has no explain hook: ...") for the first of ``hooks`` that ``task`` lacks."""
    missing = _missing(task, hooks)
    if missing:
        raise no_explain_hook(task, missing[0])


def explainable_tasks() -> list[Task]:
    """The installed tasks (built-in and third-party) that implement the explain hooks, by name."""
    from cnnapps.tasks import get_task, list_tasks

    tasks = []
    for name in list_tasks():
        try:
            task = get_task(name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not hide the others
            log.warning("task %s cannot be loaded (%s: %s); left out", name, type(exc).__name__, exc)
            continue
        if has_explain_hooks(task):
            tasks.append(task)
    return tasks


def _task(name: str) -> Task:
    from cnnapps.tasks import get_task

    return get_task(name)


def load_view(checkpoint: str | Path, device: torch.device | str = "cpu") -> ExplainView:
    """Rebuild the model of a task checkpoint (whichever task wrote it) and hand it to that task's
    ``explain_view``: an ``ExplainView`` in eval mode. ValueError for a checkpoint that names no task;
    ConfigError when its task has no explain hooks."""
    from cnnapps.engine.checkpoint import load_checkpoint
    from cnnapps.engine.trainer import model_from_checkpoint

    task_name = load_checkpoint(checkpoint).get("task")
    if not task_name:
        raise ValueError(f"{checkpoint}: the checkpoint does not say which task wrote it")
    task = _task(task_name)
    _require(task)
    model, cfg, state = model_from_checkpoint(task, checkpoint, device)
    model.eval()
    view = task.explain_view(model, cfg, state)
    view.model.eval()
    if view.frontend is not None:
        view.frontend.eval()
    return view


def load_input(view: ExplainView, path: str | Path, **options: Any) -> LoadedInput:
    """Read ``path`` with the task's own preprocessing (``Task.explain_input``). ``options``: ``start_s``,
    ``max_seconds``, ``lead`` and whatever else a task reads; each task ignores those it has no use for. Raises
    ValueError naming the file when it cannot be read."""
    item = _task(view.task).explain_input(view, str(path), **options)
    item.x = item.x.detach().float().cpu()
    return item


def iter_examples(view: ExplainView, data_root: Path, split: str = "val",
                  max_examples: int = 512) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(index, x (1, C, *L) as ``view.model`` takes it, display array) for the examples of one split of the task's
    own data, rebuilt with the checkpoint's preprocessing (``Task.explain_examples``); at most ``max_examples``."""
    task = _task(view.task)
    _require(task, ("explain_examples",))  # now, not at the first example: a missing hook is the first error
    data = task.build_data(view.cfg, Path(data_root), state=view.state)

    def examples() -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        for i, item in enumerate(task.explain_examples(view, data, split, max_examples)):
            if i >= max_examples:
                break
            yield i, item.x.detach().float().cpu(), item.display

    return examples()


def sample_inputs(task: Task, data_root: Path, out_dir: Path) -> ExplainSamples | None:
    """The task's sample input files for ``understand-report`` (``Task.explain_samples``), or None (logged) when
    it has no such hook or its data is missing."""
    if not has_explain_hooks(task, ("explain_samples",)):
        log.info("task %s has no explain_samples hook; left out of the report's pictures", task.name)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return task.explain_samples(Path(data_root), out_dir)
    except FileNotFoundError as exc:
        log.warning("task %s: no sample inputs (%s); left out of the report's pictures", task.name, exc)
        return None
