"""``bench --engine``: what the engine costs. The same model, data, batch size and number of optimiser steps
through (a) our Trainer with its default callbacks, (b) a bare PyTorch loop of about twenty lines, (c)
``lightning.Trainer`` (an optional extra, ``pip install cnnapps[bench]``), in one process, timed in alternation.

All three call the task's own ``step`` for the loss, build the model with the same seed, and use the same
optimiser and schedule, so what differs is the loop around the step. Each run times the optimiser steps after a
warm-up (data building, the first steps and the end-of-fit evaluation are outside the window).
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cnnapps.engine.callbacks import Callback
from cnnapps.engine.config import load_config
from cnnapps.engine.optim import build_optimizer, build_scheduler
from cnnapps.engine.runinfo import run_facts
from cnnapps.engine.seeding import seed_everything
from cnnapps.engine.task import Task
from cnnapps.engine.trainer import fit
from cnnapps.tasks import get_task, list_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One model and data set to time: a task and a shipped config (the task's ``engine_bench_config``)."""

    task: str
    config: str


def cases() -> list[Case]:
    """Every installed task that names a config for the engine benchmark."""
    found = []
    for name in list_tasks():
        config = get_task(name).engine_bench_config
        if config:
            found.append(Case(name, config))
    return found


LOOPS = ("ours", "bare", "lightning")
WINDOW_SECONDS = 10.0  # the timed window of one run aims at about this long


class _Done(Exception):
    """Raised by the clock callback to end a timed fit once its steps are counted."""


class _Clock(Callback):
    """Seconds from the end of optimiser step ``warmup`` to the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.seconds = warmup, steps, None
        self.t0 = 0.0

    def on_train_batch_end(self, trainer: Any, loss: float) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps:
            self.seconds = time.perf_counter() - self.t0
            raise _Done


def time_ours(task: Task, cfg: Any, data_root: Path, warmup: int, steps: int) -> float:
    """Our Trainer with its default callbacks, as ``train`` runs it."""
    clock = _Clock(warmup, steps)
    with tempfile.TemporaryDirectory(prefix="cnnapps-engine-") as tmp:
        try:
            fit(task, cfg, Path(tmp) / "run", data_root, quiet=True, callbacks=[clock])
        except _Done:
            pass
    if clock.seconds is None:
        raise RuntimeError(f"{task.name}: the training split has fewer than {warmup + steps} batches")
    return clock.seconds


def time_bare(task: Task, cfg: Any, data: Any, warmup: int, steps: int) -> float:
    """A bare PyTorch loop: shuffled DataLoader, the task's step for the loss, backward, step, schedule."""
    tc = cfg.train
    seed_everything(tc.seed, tc.deterministic)
    model = task.build_model(cfg, data).train()
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    sched = build_scheduler(opt, tc, warmup + steps)
    g = torch.Generator().manual_seed(tc.seed)
    loader = DataLoader(data.train, batch_size=tc.batch_size, shuffle=True, collate_fn=data.collate_fn, generator=g)
    batches = iter(loader)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        loss = task.step(model, next(batches), cfg)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i + 1 == warmup:
            t0 = time.perf_counter()
    return time.perf_counter() - t0


def time_lightning(task: Task, cfg: Any, data: Any, warmup: int, steps: int) -> float:
    """``lightning.Trainer`` around the same model and step (its defaults, without progress bar and logger,
    which our Trainer does not run either when not on a terminal)."""
    import lightning.pytorch as pl

    tc = cfg.train

    class Module(pl.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return task.step(self.model, batch, cfg)["loss"]

        def configure_optimizers(self) -> Any:
            opt = build_optimizer([p for p in self.parameters() if p.requires_grad], tc)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": build_scheduler(opt, tc, warmup + steps), "interval": "step"}}

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.t0, self.seconds = 0.0, None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == warmup:
                self.t0 = time.perf_counter()
            elif trainer.global_step == warmup + steps:
                self.seconds = time.perf_counter() - self.t0

    seed_everything(tc.seed, tc.deterministic)
    module = Module(task.build_model(cfg, data))
    g = torch.Generator().manual_seed(tc.seed)
    loader = DataLoader(data.train, batch_size=tc.batch_size, shuffle=True, collate_fn=data.collate_fn, generator=g)
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="cnnapps-lightning-") as tmp:
        trainer = pl.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, default_root_dir=tmp, callbacks=[clock])
        trainer.fit(module, train_dataloaders=loader)
    return clock.seconds


def lightning_version() -> str | None:
    try:
        import lightning

        return lightning.__version__
    except ImportError:
        return None


def _describe(task: Task, cfg: Any) -> str:
    """``lenet5 on mnist``: what is timed, in words."""
    model, data = getattr(cfg, "model", None), getattr(cfg, "data", None)
    what = getattr(model, "backbone", "")
    dataset = getattr(data, "dataset", "")
    return f"{what} on {dataset}" if what and dataset else what or dataset or task.name


def bench_case(case: Case, data_root: Path, rounds: int, warmup: int = 10, steps: int | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Median optimiser steps/s of each loop over ``rounds`` alternating rounds (the order rotates each round).
    ``steps`` None: as many as fill about WINDOW_SECONDS (at most 150, at most what one epoch holds)."""
    task = get_task(case.task)
    extra = [f"train.threads={threads}"] if threads else []
    cfg = load_config(task.Config, case.config, [*extra, "train.epochs=1"], search=task.config_dir())
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = task.build_data(cfg, data_root)
    batches = len(data.train) // cfg.train.batch_size
    if steps is None:  # a short bare run tells the step time
        per_step = time_bare(task, cfg, data, 2, 3) / 3
        steps = int(max(20, min(150, WINDOW_SECONDS / per_step)))
    steps = min(steps, batches - warmup)
    cfg = load_config(task.Config, case.config, [*extra, "train.epochs=1",
                                                 f"train.max_steps_per_epoch={warmup + steps}"],
                      search=task.config_dir())
    loops = [loop for loop in LOOPS if loop != "lightning" or lightning_version()]
    times: dict[str, list[float]] = {loop: [] for loop in loops}
    for r in range(rounds):
        for loop in loops[r % len(loops):] + loops[:r % len(loops)]:
            if loop == "ours":
                seconds = time_ours(task, cfg, data_root, warmup, steps)
            elif loop == "bare":
                seconds = time_bare(task, cfg, data, warmup, steps)
            else:
                seconds = time_lightning(task, cfg, data, warmup, steps)
            times[loop].append(seconds)
            log.info("%s %s round %d: %.1f steps/s", case.task, loop, r + 1, steps / seconds)
    # the best round is each loop's own cost (a busy spell of the machine only ever slows a round down, as
    # timeit's documentation argues); the median is reported beside it
    best = {loop: steps / min(ts) for loop, ts in times.items()}
    median = {loop: steps / statistics.median(ts) for loop, ts in times.items()}
    row: dict[str, Any] = {"task": case.task, "config": case.config, "what": _describe(task, cfg),
                           "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(),
                           "warmup_steps": warmup, "timed_steps": steps, "rounds": rounds,
                           **{f"{loop}_steps_per_s": round(best[loop], 2) for loop in loops},
                           **{f"{loop}_median_steps_per_s": round(median[loop], 2) for loop in loops},
                           "seconds": {loop: [round(t, 3) for t in ts] for loop, ts in times.items()}}
    for rates, suffix in ((best, ""), (median, "_median")):
        row[f"ours_vs_bare{suffix}"] = round(rates["ours"] / rates["bare"], 3)
        row[f"ours_vs_lightning{suffix}"] = round(rates["ours"] / rates["lightning"], 3) if "lightning" in rates \
            else None
    return row


def run_engine_bench(data_root: Path, results_dir: Path | None = None, quick: bool = False) -> Path:
    """Every case, written as the ``engine`` section of results/speed.md and .json; returns the Markdown path.
    ``quick``: the first case only, a few steps, one round (a smoke run, not a measurement)."""
    from cnnapps.bench.speed import write_section

    started = time.perf_counter()
    record: dict[str, Any] = {**run_facts("cpu"), "lightning": lightning_version() or "not installed",
                              "goal": "ours >= 0.97 x the bare loop's steps/s and >= 1.0 x Lightning's"}
    todo = cases()
    rows = [bench_case(c, data_root, rounds=1, warmup=2, steps=5) for c in todo[:1]] if quick else \
        [bench_case(c, data_root, rounds=5) for c in todo]
    record.update({"cases": rows, "wall_seconds": round(time.perf_counter() - started, 1)})
    return write_section("engine", record, results_dir, markdown=format_engine_section(record))


def format_engine_section(r: dict) -> list[str]:
    """The engine section of results/speed.md."""
    from cnnapps.bench.speed import facts_line

    lines = ["## The engine's cost: our Trainer against a bare loop and Lightning", "",
             "The same model, data, batch size, optimiser, schedule and task step through each loop, in one "
             "process, over rounds that alternate the loops in a rotating order. Steps/s of each loop's best round "
             "(its own cost: a busy spell of a shared machine only slows rounds down), the medians over all rounds "
             "in brackets. Goal: " + r.get("goal", "") + f". Lightning: {r.get('lightning')}.", "", facts_line(r), "",
             "| case | batch | threads | timed steps x rounds | ours (steps/s) | bare loop | Lightning | "
             "ours / bare | ours / Lightning |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def both(c: dict, key: str, median_key: str) -> str:
        return "not installed" if c.get(key) is None else f"{c[key]} ({c.get(median_key)})"

    for c in r["cases"]:
        cells = [both(c, f"{loop}_steps_per_s", f"{loop}_median_steps_per_s") for loop in LOOPS]
        cells += [both(c, f"ours_vs_{o}", f"ours_vs_{o}_median") for o in ("bare", "lightning")]
        lines.append(f"| `{c['task']} {c['config']}`: {c['what']} | {c['batch_size']} | {c['threads']} | "
                     f"{c['timed_steps']} x {c['rounds']} | " + " | ".join(cells) + " |")
    return lines
