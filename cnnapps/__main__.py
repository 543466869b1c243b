"""Command line: ``python -m cnnapps list | summary ...``; one function and one sub-parser per subcommand.

Adding a subcommand (e.g. ``bench``):

1. write ``def cmd_bench(args: argparse.Namespace) -> int`` that does the work, prints to stdout and returns an
   exit status (0 on success);
2. in ``build_parser`` add ``p = sub.add_parser("bench", help=...)``, its ``p.add_argument(...)`` calls and
   ``p.set_defaults(func=cmd_bench)``.

``main`` dispatches on ``args.func``; errors a user can fix (unknown name, bad value) become one line on
stderr and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from typing import Any


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> (3, 224, 224); argparse type for ``--input``."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 3,224,224, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 3,224,224, got {text!r}")
    return shape


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}``; values are Python literals where they parse (``2``, ``0.5``, ``True``,
    ``(1, 2)``), strings otherwise."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registered backbones (name, dim, default input) and the installed tasks."""
    from cnnapps.backbones import backbone_info, list_backbones
    from cnnapps.tasks import list_tasks

    names = list_backbones(args.pattern)
    width = max((len(n) for n in names), default=4)
    print("Backbones:")
    print(f"  {'name'.ljust(width)}  dim  default input")
    for name in names:
        info = backbone_info(name)
        print(f"  {name.ljust(width)}  {info.dim}D   {'x'.join(map(str, info.default_input))}")
    print("Tasks:")
    for task in list_tasks():
        print(f"  {task}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the per-layer table and totals of backbone ``args.name``."""
    from cnnapps.backbones import backbone_info
    from cnnapps.summary import summarize

    info = backbone_info(args.name)
    kwargs = parse_assignments(args.set)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    shape = args.input or info.default_input
    if len(shape) != info.dim + 1:
        raise ValueError(f"{args.name} is {info.dim}D: --input needs {info.dim + 1} sizes, channels first; got {shape}")
    kwargs.setdefault("in_chans", shape[0])
    print(summarize(args.name, shape, **kwargs).format_table())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Every task's ci benchmark (--all), the side-by-side speed report (--speed), or both; floors checked."""
    import logging

    from cnnapps.bench_suite import check_floors, run_all
    from cnnapps.data.root import find_data_root
    from cnnapps.speed import run_speed

    if not (args.all or args.speed):
        raise ValueError("bench: say --all (every task's ci benchmark) and/or --speed")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    status = 0
    if args.all:
        records = run_all(find_data_root(args.data_dir), args.results, device=args.device, tasks=args.tasks or None)
        for r in records:
            print(f"{r['task']:12s} {r['monitor']} = {r['test'].get(r['monitor'])}  ({r['train_seconds']} s)")
        failures = check_floors(records) if args.check_floors else []
        for f in failures:
            print(f"below floor: {f}", file=sys.stderr)
        status = 1 if failures else 0
    if args.speed:
        root = None
        try:
            root = find_data_root(args.data_dir)
        except FileNotFoundError:
            pass
        print(f"wrote {run_speed(args.device or 'cpu', root, args.results, quick=args.quick)}")
    return status


def cmd_soup(args: argparse.Namespace) -> int:
    """Best single checkpoint, ensemble, uniform soup and greedy soup, ranked on validation; results/soup.md."""
    from cnnapps.data.root import find_data_root
    from cnnapps.engine.averaging import soup_report, write_soup_report
    from cnnapps.tasks import get_task

    record = soup_report(get_task(args.task), args.checkpoints, find_data_root(args.data_dir), greedy=args.greedy)
    for row in record["rows"]:
        print(f"{row['candidate']:40s} val {row['val']:.4f}  test {row['test']:.4f}")
    print(f"wrote {write_soup_report(record, args.results, args.name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cnnapps`` parser; every subcommand sets ``func``."""
    parser = argparse.ArgumentParser(prog="cnnapps", description="CNN backbones, tasks and tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list backbones and tasks")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch filter on backbone names, e.g. 'resnet*'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("summary", help="per-layer output shapes, parameters and multiply-adds of a backbone")
    p.add_argument("name", help="backbone name (see `list`)")
    p.add_argument("--input", type=parse_shape, default=None,
                   help="input shape without batch, e.g. 3,224,224 or 1,8192 (default: the backbone's)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the family's)")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="backbone keyword arguments, e.g. lrn=False")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("bench", help="every task's ci benchmark and/or the speed report, into results/")
    p.add_argument("--all", action="store_true", help="run each task's tasks/<task>/ci.toml; write results/README.md")
    p.add_argument("--speed", action="store_true", help="write results/speed.md (ours against torchvision, ...)")
    p.add_argument("--quick", action="store_true", help="--speed with fewer models and repeats")
    p.add_argument("--tasks", nargs="*", default=[], help="only these tasks (default: all installed)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: each config's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default=None, help="results folder (default: the checkout's results/)")
    p.add_argument("--check-floors", action="store_true", help="exit 1 if a metric is below results/floors.toml")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("soup", help="uniform and greedy model soups of fine-tuned checkpoints (Wortsman et al. 2022)")
    p.add_argument("--task", required=True)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--greedy", action="store_true", help="also the greedy soup")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default=None)
    p.add_argument("--name", default="soup", help="results file stem")
    p.set_defaults(func=cmd_soup)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cnnapps`` and the ``cnnapps`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cnnapps {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
