"""The command line every task shares: ``python -m cnnapps.tasks.<task> train|evaluate|predict|bench``."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

from cnnapps.data.root import find_data_root
from cnnapps.engine.checkpoint import CheckpointError
from cnnapps.engine.config import ConfigError, load_config
from cnnapps.engine.trainer import TrainingDiverged, evaluate_checkpoints, fit, model_from_checkpoint, resolve_device
from cnnapps.metrics.base import headline
from cnnapps.tasks import get_task
from cnnapps.engine.task import Task

log = logging.getLogger("cnnapps")


def build_parser(task: Task) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m cnnapps.tasks.{task.name}",
                                description=f"cnnapps task '{task.name}': train, evaluate, predict, bench")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; ends with a test-split report")
    t.add_argument("--config", help="a shipped config's name (e.g. ci) or a TOML file (default: built-in defaults)")
    t.add_argument("--data-dir", type=Path, help="data root (default: $CNNAPPS_DATA, then ./data, ../shared/data)")
    t.add_argument("--out", type=Path, help=f"run folder (default: runs/{task.name}/<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=0.1 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")

    e = sub.add_parser("evaluate", help="evaluate checkpoint(s) (several: an ensemble of their outputs)")
    e.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    e.add_argument("--data-dir", type=Path)
    e.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="'all': every example of the folder --data-dir, with the checkpoint's preprocessing")
    e.add_argument("--out", type=Path, help="write metrics.json and plots here")
    e.add_argument("--quiet", action="store_true")

    pr = sub.add_parser("predict", help="predictions for input files as JSON lines")
    pr.add_argument("--checkpoint", type=Path, required=True)
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--out", type=Path, help="folder for any pictures the task draws")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--quiet", action="store_true")
    task.predict_options(pr)

    b = sub.add_parser("bench", help="train and evaluate the small benchmark config; write results/<task>.md/.json")
    b.add_argument("--config", help=f"a shipped config's name or a TOML file (default: {task.bench_config})")
    b.add_argument("--data-dir", type=Path)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--results", type=Path, default=None, help="results folder (default: the checkout's results/)")
    b.add_argument("--name", default=None, help="results file stem (default: the task name)")
    b.add_argument("--from-run", type=Path, default=None,
                   help="record a run folder that `train` finished (with --config naming its config) instead of "
                        "training again")
    b.add_argument("--quiet", action="store_true")
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr, force=True)


def cmd_train(task: Task, args: argparse.Namespace) -> int:
    config = args.config
    out = args.out or Path("runs") / task.name / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out naming the run folder to continue")
        config = config or out / "config.toml"
    cfg = load_config(task.Config, config, args.overrides, search=task.config_dir())
    result = fit(task, cfg, out, find_data_root(args.data_dir), resume=args.resume, quiet=args.quiet)
    print(f"\n== {task.name}: finished {result.epochs_run} epoch(s) in {result.train_seconds:.1f} s of training; "
          f"best epoch {result.best_epoch}")
    _print_metrics(result.test_metrics, "test")
    pictures = sorted(p.name for p in out.glob("*.png"))
    print(f"run folder: {out}\n  metrics.json, metrics.jsonl, config.toml, checkpoints/best.pt, checkpoints/last.pt")
    if pictures:
        print("  plots: " + ", ".join(pictures))
    return 0


def _print_metrics(metrics: dict, title: str) -> None:
    """Headline numbers; per-class ones too when there are few (all of them are in metrics.json)."""
    shown = headline(metrics)
    print(f"{title} metrics:")
    for k, v in shown.items():
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    if len(shown) < len(metrics):
        print(f"  ({len(metrics) - len(shown)} per-class values in metrics.json)")


def cmd_evaluate(task: Task, args: argparse.Namespace) -> int:
    values = evaluate_checkpoints(task, args.checkpoint, find_data_root(args.data_dir), split=args.split,
                                  out_dir=args.out, quiet=args.quiet)
    _print_metrics(values, args.split)
    return 0


def cmd_predict(task: Task, args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, cfg, state = model_from_checkpoint(task, args.checkpoint, device)
    extra = {k: v for k, v in vars(args).items()
             if k not in {"command", "checkpoint", "inputs", "out", "device", "quiet"}}
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
        print(f"wrote {path} and {path.with_suffix('.json')}")
        return 0
    path = run_task_bench(task, args.config, find_data_root(args.data_dir), overrides=args.overrides,
                          results_dir=args.results, name=args.name, quiet=args.quiet)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def main(task_name: str, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cnnapps.tasks.<task_name>``; returns the exit status (and exits with it when
    run as a script)."""
    task = get_task(task_name)
    args = build_parser(task).parse_args(argv)
    _setup_logging(args.quiet)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "bench": cmd_bench}
    try:
        status = commands[args.command](task, args)
    except (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    if argv is None:
        sys.exit(status)
    return status
