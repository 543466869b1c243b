"""The command line of every task: ``cnnapps <task> train|evaluate|predict|bench|config`` and, the same parser,
``python -m cnnapps.tasks.<task> ...``. Errors a user can fix become one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cnnapps.data.root import find_data_root
from cnnapps.engine.checkpoint import CheckpointError
from cnnapps.engine.config import ConfigError, config_names, dumps_documented, find_config, load_config
from cnnapps.engine.runfolder import RunFolderError
from cnnapps.engine.task import Task
from cnnapps.engine.trainer import TrainingDiverged, evaluate_checkpoints, fit, model_from_checkpoint, resolve_device
from cnnapps.export import ExportError
from cnnapps.metrics.base import headline
from cnnapps.tasks import UnknownTaskError, get_task

log = logging.getLogger("cnnapps")

# What a user can mend: printed as one line, exit status 2. Anything else is a bug of ours: one line too (the
# traceback with CNNAPPS_DEBUG=1), exit status 1.
USER_ERRORS = (ConfigError, CheckpointError, TrainingDiverged, RunFolderError, UnknownTaskError, FileNotFoundError,
               ValueError, ExportError)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=0.1 (repeatable; values are TOML literals: "
                        "2, 0.5, true, [1, 2], \"text\"; bare words are text)")


def _add_config(p: argparse.ArgumentParser, task: Task, default: str) -> None:
    names = ", ".join(config_names(task.config_dir()))
    p.add_argument("--config", default=None,
                   help=f"a shipped config's name ({names}) or a TOML file of your own (default: {default})")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path,
                   help="data root (default: $CNNAPPS_DATA, then ./data, then ../shared/data)")


def build_parser(task: Task, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one task's commands (``prog`` is how the user called it)."""
    p = argparse.ArgumentParser(prog=prog or f"cnnapps {task.name}",
                                description=f"cnnapps task '{task.name}': train, evaluate, predict, bench, config")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model; ends with a test-split report")
    _add_config(t, task, "the built-in defaults")
    _add_data_dir(t)
    t.add_argument("--out", type=Path, help=f"run folder (default: runs/{task.name}/<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out already holds (without it such a folder is refused)")
    _add_set(t)
    t.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")

    e = sub.add_parser("evaluate", help="evaluate checkpoint(s) on a split (several: the ensemble of their outputs)")
    e.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="checkpoint file(s) this task wrote")
    _add_data_dir(e)
    e.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="which split (default test); all: every example of the folder --data-dir, with the "
                        "checkpoint's preprocessing")
    e.add_argument("--out", type=Path, help="folder for eval-<split>-<time>.json and its pictures (a training run's "
                                            "folder is fine: its own files are never touched)")
    e.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    e.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")

    pr = sub.add_parser("predict", help="predictions for input files as JSON lines (input, task fields, picture, "
                                        "error)")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint this task wrote")
    source.add_argument("--onnx", type=Path, help="an exported model (`cnnapps export`: .onnx, or .pt2) run "
                                                  "without the eager model; its FILE.json gives the preprocessing")
    pr.add_argument("inputs", nargs="+", help="input files (or records)")
    pr.add_argument("--out", type=Path, help="folder (or .png file, for one input) for the pictures the task draws")
    pr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    pr.add_argument("--quiet", action="store_true", help="warnings only")
    task.predict_options(pr)

    b = sub.add_parser("bench", help="train and evaluate a config (default: the small ci one) and record it in "
                                     f"results/{task.name}.md and .json")
    _add_config(b, task, task.bench_config)
    _add_data_dir(b)
    _add_set(b)
    b.add_argument("--results", type=Path, default=None,
                   help="results folder (default: the checkout's results/, else ./results)")
    b.add_argument("--name", default=None, help=f"results file stem (default: {task.name})")
    b.add_argument("--from-run", type=Path, default=None,
                   help="record a run folder that `train` finished (with --config naming its config) instead of "
                        "training again")
    b.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")

    c = sub.add_parser("config", help="print a resolved config as TOML, each field's meaning and allowed values "
                                      "as comments")
    _add_config(c, task, "the built-in defaults")
    _add_set(c)
    c.add_argument("--list", action="store_true", help="list the shipped configs instead")
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr, force=True)


def _number(value: Any) -> str:
    """A metric for people: counts as integers, other numbers with four decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1):
        return str(int(value))
    return f"{value:.4f}"


def _print_metrics(metrics: dict, title: str) -> None:
    """Headline numbers; per-class ones too when there are few (all of them are in the metrics file)."""
    shown = headline(metrics)
    print(f"{title} metrics:")
    for k, v in shown.items():
        print(f"  {k:28s} {_number(v)}")
    if len(shown) < len(metrics):
        print(f"  ({len(metrics) - len(shown)} more values, per class, in the metrics file)")


def cmd_train(task: Task, args: argparse.Namespace) -> int:
    config = args.config
    out = args.out or Path("runs") / task.name / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out naming the run folder to continue")
        if args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it: choose one")
        config = config or out / "config.toml"
    cfg = load_config(task.Config, config, args.overrides, search=task.config_dir())
    result = fit(task, cfg, out, find_data_root(args.data_dir), resume=args.resume, quiet=args.quiet,
                 overwrite=args.overwrite)
    print(f"\n== {task.name}: finished {result.epochs_run} epoch(s) in {result.train_seconds:.1f} s of training; "
          f"best epoch {result.best_epoch}" + (" (stopped early)" if result.stopped_early else ""))
    _print_metrics(result.test_metrics, "test")
    print(f"run folder: {out}")
    files = [n for n in ("config.toml", "metrics.jsonl", "metrics.csv", "metrics.json", "run.json",
                         "checkpoints/best.pt", "checkpoints/last.pt", "tensorboard") if (out / n).exists()]
    print("  " + ", ".join(files))
    pictures = sorted(p.name for p in out.glob("*.png"))
    if pictures:
        print("  plots: " + ", ".join(pictures))
    return 0


def cmd_evaluate(task: Task, args: argparse.Namespace) -> int:
    result = evaluate_checkpoints(task, args.checkpoint, find_data_root(args.data_dir), split=args.split,
                                  out_dir=args.out, quiet=args.quiet, device=args.device)
    _print_metrics(result.values, args.split)
    for path in result.files:
        print(f"wrote {path}")
    return 0


def cmd_predict(task: Task, args: argparse.Namespace) -> int:
    if args.onnx is not None:
        from cnnapps.export import exported_for_task

        device = resolve_device("cpu")
        model, cfg, state = exported_for_task(task, args.onnx)
    else:
        device = resolve_device(args.device)
        model, cfg, state = model_from_checkpoint(task, args.checkpoint, device)
    extra = {k: v for k, v in vars(args).items()
             if k not in {"command", "checkpoint", "onnx", "inputs", "out", "device", "quiet"}}
    failed = 0
    for row in task.predict(model, list(args.inputs), state, cfg, device, out_dir=args.out, **extra):
        failed += "error" in row
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


def cmd_bench(task: Task, args: argparse.Namespace) -> int:
    from cnnapps.bench.run import record_finished_run, run_task_bench

    if args.from_run is not None:
        if args.config is None:
            raise ConfigError("--from-run needs --config naming the config the run was trained with")
        path = record_finished_run(task, args.from_run, str(args.config), args.results, args.name,
                                   data_root=find_data_root(args.data_dir))
    else:
        path = run_task_bench(task, args.config, find_data_root(args.data_dir), overrides=args.overrides,
                              results_dir=args.results, name=args.name, quiet=args.quiet)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def cmd_config(task: Task, args: argparse.Namespace) -> int:
    if args.list:
        for name in config_names(task.config_dir()):
            found = find_config(name, task.config_dir())
            first = next((line.lstrip("# ").strip() for line in found.read_text().splitlines()
                          if line.startswith("#")), "") if found is not None else "the built-in defaults"
            print(f"{name:22s} {first}")
        return 0
    cfg = load_config(task.Config, args.config, args.overrides, search=task.config_dir())
    head = f"# cnnapps {task.name} config" + (f" --config {args.config}" if args.config else "")
    head += "".join(f" --set {s}" for s in args.overrides)
    print(head + "\n# (every field, resolved; a file like this one works as --config)\n")
    print(dumps_documented(cfg), end="")
    return 0


COMMANDS: dict[str, Callable[[Task, argparse.Namespace], int]] = {
    "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "bench": cmd_bench, "config": cmd_config}


def run_guarded(fn: Callable[[], int], extra: tuple[type[Exception], ...] = ()) -> int:
    """Run a command: a user's error is one line on stderr and exit status 2; a file that cannot be written
    (read-only folder, full disk) names the file; anything unexpected is one line and exit status 1, with the
    traceback only when CNNAPPS_DEBUG=1."""
    try:
        return fn()
    except (*USER_ERRORS, *extra) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
        print(f"error: {where}{reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the user gets one line; the traceback is for us
        if os.environ.get("CNNAPPS_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(CNNAPPS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def main(task_name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``python -m cnnapps.tasks.<task_name>`` and of ``cnnapps <task_name>``; returns the exit
    status (and exits with it when run as a script, that is with ``argv`` None)."""
    def run() -> int:
        task = get_task(task_name)
        args = build_parser(task, prog or f"python -m cnnapps.tasks.{task_name}").parse_args(argv)
        _setup_logging(getattr(args, "quiet", False))
        return COMMANDS[args.command](task, args)

    status = run_guarded(run)
    if argv is None:
        sys.exit(status)
    return status
