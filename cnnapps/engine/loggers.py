"""Loggers: callbacks that write a fit's numbers where people read them, chosen with ``train.loggers``.

``jsonl``        metrics.jsonl, one JSON object per epoch (always written: bench and the report read it)
``csv``          metrics.csv, one row per epoch, a column per value
``tensorboard``  tensorboard/ event files: loss and learning rate per step, every epoch value, the test metrics,
                 the resolved config as text and the task's report pictures as images

On resume every logger continues exactly where the checkpoint left off: the files are rewritten from the
checkpoint's history (an epoch logged after the last checkpoint was written is not repeated), and TensorBoard
purges events after the checkpoint's step.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from cnnapps.engine.callbacks import Callback, picture_paths
from cnnapps.engine.config import ConfigError, dumps_toml, to_dict
from cnnapps.engine.state import FitResult, FitState


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class JsonlLogger(Callback):
    """metrics.jsonl: one line per epoch, appended and fsync'd as each epoch ends."""

    name = "metrics.jsonl"

    def on_fit_start(self, trainer: FitState) -> None:
        if trainer.is_rank0:
            # a fresh fit starts an empty file; a resumed one keeps exactly the epochs its checkpoint holds
            trainer.run.write_text(self.name, "".join(json.dumps(r) + "\n" for r in trainer.history))

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> None:
        if trainer.is_rank0:
            with open(trainer.run_dir / self.name, "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


class CSVLogger(Callback):
    """metrics.csv: a row per epoch and a column per value (the union over epochs; blank where absent),
    rewritten atomically after every epoch since columns can appear later (validation every N epochs)."""

    name = "metrics.csv"

    def _write(self, trainer: FitState) -> None:
        columns: list[str] = []
        for row in trainer.history:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(trainer.history)
        trainer.run.write_text(self.name, buf.getvalue())

    def on_fit_start(self, trainer: FitState) -> None:
        if trainer.is_rank0:
            self._write(trainer)

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> None:
        if trainer.is_rank0:
            self._write(trainer)


class TensorBoardLogger(Callback):
    """tensorboard/: scalars ``train/loss`` and ``train/lr`` per optimiser step; every numeric value of an epoch's
    row under its metrics.jsonl name (``epoch`` too) at the epoch's last optimiser step; ``test/<metric>`` at the
    end; the resolved config as text; the report's pictures as images. One step axis (optimiser steps) for all,
    so a resumed run purges exactly what came after its checkpoint. Needs the ``tensorboard`` package."""

    folder = "tensorboard"

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:  # the package is a dependency; a broken install gets one line
            raise ConfigError(f"train.loggers: tensorboard needs the tensorboard package ({exc})") from None
        self.writer: Any = None

    def on_fit_start(self, trainer: FitState) -> None:
        if not trainer.is_rank0:
            return
        from torch.utils.tensorboard import SummaryWriter

        # on resume, events a killed process wrote after its last checkpoint's step are dropped
        self.writer = SummaryWriter(str(trainer.run_dir / self.folder),
                                    purge_step=trainer.global_step + 1 if trainer.resuming else None)
        if not trainer.resuming:
            self.writer.add_text("config", "```toml\n" + dumps_toml(to_dict(trainer.cfg)) + "```", 0)

    def on_train_batch_end(self, trainer: FitState, loss: float) -> None:
        if self.writer is not None:
            step = trainer.global_step
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", trainer.optimizer.param_groups[-1]["lr"], step)

    def on_epoch_end(self, trainer: FitState, row: dict[str, Any]) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if _number(value):
                    self.writer.add_scalar(key, value, trainer.global_step)
            self.writer.flush()

    def on_fit_end(self, trainer: FitState, result: FitResult) -> None:
        if self.writer is None:
            return
        import matplotlib.image

        step = trainer.global_step
        for key, value in result.test_metrics.items():
            if _number(value):
                self.writer.add_scalar(f"test/{key}", value, step)
        for png in picture_paths(trainer.run_dir, trainer.pictures):
            image = matplotlib.image.imread(png)[..., :3]
            self.writer.add_image(f"report/{png.stem}", image, step, dataformats="HWC")
        self.writer.close()
        self.writer = None


LOGGERS = {"jsonl": JsonlLogger, "csv": CSVLogger, "tensorboard": TensorBoardLogger}


def make_loggers(names: list[str]) -> list[Callback]:
    """The logger callbacks for ``train.loggers``; metrics.jsonl is always among them."""
    wanted = ["jsonl", *[n for n in names if n != "jsonl"]]
    unknown = [n for n in wanted if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"train.loggers: unknown {', '.join(unknown)} (choose from {', '.join(LOGGERS)})")
    return [LOGGERS[n]() for n in dict.fromkeys(wanted)]
