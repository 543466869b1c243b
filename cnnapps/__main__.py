"""Command line: ``python -m cnnapps list | summary ...``; one function and one sub-parser per subcommand.

Adding a subcommand (e.g. ``bench``):

1. write ``def cmd_bench(args: argparse.Namespace) -> int`` that does the work, prints to stdout and returns an
   exit status (0 on success);
2. in ``build_parser`` add ``p = sub.add_parser("bench", help=...)``, its ``p.add_argument(...)`` calls and
   ``p.set_defaults(func=cmd_bench)``.

``main`` dispatches on ``args.func``; errors a user can fix (unknown name, bad value) become one line on
stderr and exit status 2 instead of a traceback. ``cnnapps TASK ...`` goes to the task's own command line
(``cnnapps.tasks.cli``).
"""
from __future__ import annotations

import argparse
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
    """``["k=v", ...]`` -> ``{k: v}``; values are TOML literals where they parse (``2``, ``0.5``, ``true``,
    ``[1, 2]``), text otherwise: the same rule as every task command's ``--set``."""
    from cnnapps.engine.config import literal

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = literal(value.strip())
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
    """Every task's ci benchmark (--all), the speed report (--speed), the engine's cost (--engine); floors
    checked with --check-floors."""
    import logging

    from cnnapps.data.root import find_data_root

    if not (args.all or args.speed or args.engine or args.deploy):
        raise ValueError("bench: say --all (every task's ci benchmark), --speed, --engine and/or --deploy")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    status = 0
    if args.all:
        from cnnapps.bench.results import check_floors
        from cnnapps.bench.run import run_all

        records = run_all(find_data_root(args.data_dir), args.results, device=args.device, tasks=args.tasks or None)
        for r in records:
            print(f"{r['task']:12s} {r['monitor']} = {r['test'].get(r['monitor'])}  ({r['train_seconds']} s)")
        failures = check_floors(records) if args.check_floors else []
        for f in failures:
            print(f"below floor: {f}", file=sys.stderr)
        status = 1 if failures else 0
    if args.speed:
        from cnnapps.bench.speed import run_speed

        root = None
        try:
            root = find_data_root(args.data_dir)
        except FileNotFoundError:
            pass
        print(f"wrote {run_speed(args.device or 'cpu', root, args.results, quick=args.quick)}")
    if args.engine:
        from cnnapps.bench.engine import run_engine_bench

        print(f"wrote {run_engine_bench(find_data_root(args.data_dir), args.results, quick=args.quick)}")
    if args.deploy:
        from cnnapps.bench.deploy import run_deploy

        print(f"wrote {run_deploy(args.results, quick=args.quick)} (deployment section)")
    return status


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint (ONNX or torch.export) with its preprocessing JSON; check it against eager outputs."""
    import logging

    from cnnapps.backbones import PretrainedError
    from cnnapps.data.root import find_data_root
    from cnnapps.engine.checkpoint import CheckpointError
    from cnnapps.engine.config import ConfigError
    from cnnapps.export import ExportError, export_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", force=True)
    try:
        root = None if args.input else find_data_root(args.data_dir)
        result = export_checkpoint(args.checkpoint, args.format, args.out, data_root=root, examples=args.examples,
                                   input_file=args.input, tolerance=args.tolerance)
    except (ExportError, CheckpointError, ConfigError, PretrainedError, FileNotFoundError) as err:
        print(f"cnnapps export: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    """Best single checkpoint, ensemble, uniform soup and greedy soup, ranked on validation; results/soup.md."""
    from cnnapps.data.root import find_data_root
    from cnnapps.bench.soup import soup_report, write_soup_report
    from cnnapps.tasks import get_task

    record = soup_report(get_task(args.task), args.checkpoints, find_data_root(args.data_dir), greedy=args.greedy)
    for row in record["rows"]:
        print(f"{row['candidate']:40s} val {row['val']:.4f}  test {row['test']:.4f}")
    print(f"wrote {write_soup_report(record, args.results, args.name)}")
    return 0


def _understand_errors(fn: Any, *args: Any, **kw: Any) -> Any:
    """Run an understand command; a missing or foreign checkpoint or data folder becomes a one-line error."""
    from cnnapps.engine.checkpoint import CheckpointError

    try:
        return fn(*args, **kw)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ValueError(str(exc)) from None


def cmd_explain(args: argparse.Namespace) -> int:
    """Attribution maps of a task checkpoint for input files: overlays, ECG strips, spectrograms; JSON lines."""
    import json

    from cnnapps.understand.cli import run_explain

    rows = _understand_errors(run_explain, args.checkpoint, args.inputs, args.method, args.out, stage=args.stage,
                              target=args.target, steps=args.steps, window=args.window, device=args.device,
                              start_s=args.start, max_seconds=args.seconds, lead=args.lead)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 1 if any("error" in r for r in rows) else 0


def cmd_visualize(args: argparse.Namespace) -> int:
    """First-layer filters, activation maximisation or top-k patches of a task checkpoint."""
    import json

    from cnnapps.understand.cli import run_visualize

    row = _understand_errors(run_visualize, args.checkpoint, args.out, what=args.what, stage=args.stage,
                             channel=args.channel, target=args.target, k=args.k, steps=args.steps, split=args.split,
                             data_dir=args.data_dir, max_examples=args.max_examples, device=args.device)
    print(json.dumps(row))
    return 0


def cmd_understand_report(args: argparse.Namespace) -> int:
    """Position-information and equivariance probes plus pictures: results/understanding.md/.json."""
    from cnnapps.understand.report import write_report

    path = _understand_errors(write_report, results_dir=args.results, data_dir=args.data_dir, quick=args.quick,
                              cache_dir=args.cache, checkpoints=args.checkpoint,
                              timings=False if args.no_timings else None)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def add_understand_parsers(sub: Any) -> None:
    """The sub-parsers of ``explain``, ``visualize`` and ``understand-report`` (issue #8)."""
    from cnnapps.understand.attribution import METHODS
    from cnnapps.understand.cli import VISUALS

    p = sub.add_parser("explain", help="attribution maps of a task checkpoint for images, ECG records or audio files")
    p.add_argument("--checkpoint", required=True, help="a checkpoint any task wrote (it names its task)")
    p.add_argument("inputs", nargs="+", help="image files, WFDB record paths or audio files")
    p.add_argument("--method", default="gradcam", choices=METHODS)
    p.add_argument("--out", required=True, help="folder for the PNGs, raw maps and explain.jsonl")
    p.add_argument("--stage", type=int, default=None,
                   help="Grad-CAM: backbone stage index (default: the deepest whose map is wider than one unit)")
    p.add_argument("--target", default=None,
                   help="class index or name (default: the prediction; ECG: each predicted rhythm in turn)")
    p.add_argument("--steps", type=int, default=32, help="integrated gradients: points on the path")
    p.add_argument("--window", type=int, default=None,
                   help="occlusion window in samples (default: 1/8 of the image side, 0.25 s of ECG)")
    p.add_argument("--start", type=float, default=0.0, help="ECG: first second to explain")
    p.add_argument("--seconds", type=float, default=30.0, help="ECG: seconds to explain (0: the whole record)")
    p.add_argument("--lead", default=None, help="ECG: leads to read, comma-separated (default: the leads the model "
                   "was trained on)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("visualize", help="first-layer filters, activation maximisation, top-k patches")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--what", default="filters", choices=VISUALS)
    p.add_argument("--stage", type=int, default=None, help="stage index (topk default: the middle stage)")
    p.add_argument("--channel", type=int, default=None,
                   help="channel of --stage (maximize: a channel instead of classes; topk default 0)")
    p.add_argument("--target", default=None, help="maximize: one class (index or name; default: up to 10 classes)")
    p.add_argument("--k", type=int, default=16, help="topk: patches to show")
    p.add_argument("--steps", type=int, default=64, help="maximize: gradient-ascent steps")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="topk: which data split")
    p.add_argument("--max-examples", type=int, default=512, help="topk: examples to scan")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("understand-report", help="results/understanding.md: position information, equivariance, "
                       "pictures")
    p.add_argument("--results", default=None, help="results folder (default: the checkout's results/)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="where trained probe backbones are kept (default: the cache dir)")
    p.add_argument("--quick", action="store_true", help="tiny probe (seconds): for tests, not for results")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="a task checkpoint to use in place of its task's ci run (repeatable; default: every task "
                        "with explain hooks trains its ci config)")
    p.add_argument("--no-timings", action="store_true", help="skip timing every command on the ci checkpoints")
    p.set_defaults(func=cmd_understand_report)


def build_parser() -> argparse.ArgumentParser:
    """The ``cnnapps`` parser for the commands that are not a task's; every subcommand sets ``func``."""
    from cnnapps._version import __version__
    from cnnapps.tasks import list_tasks

    parser = argparse.ArgumentParser(
        prog="cnnapps", description="CNN backbones, tasks and tools. A task's own commands: `cnnapps TASK "
        "train|evaluate|predict|bench|config` (see `cnnapps TASK --help`); installed tasks: "
        + ", ".join(list_tasks()) + ".")
    parser.add_argument("--version", action="version", version=f"cnnapps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list backbones and tasks")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch filter on backbone names, e.g. 'resnet*'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("summary", help="per-layer output shapes, parameters and multiply-adds of a backbone")
    p.add_argument("name", help="backbone name (see `list`)")
    p.add_argument("--input", type=parse_shape, default=None,
                   help="input shape without batch, e.g. 3,224,224 or 1,8192 (default: the backbone's)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the family's)")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="backbone keyword arguments as TOML values, e.g. lrn=false")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("bench", help="every task's ci benchmark and/or the speed report, into results/")
    p.add_argument("--all", action="store_true", help="run each task's ci config; write results/README.md")
    p.add_argument("--speed", action="store_true", help="write results/speed.md (ours against torchvision, ...)")
    p.add_argument("--engine", action="store_true",
                   help="our Trainer against a bare loop and Lightning, same model and steps (results/speed.md)")
    p.add_argument("--deploy", action="store_true",
                   help="eager vs torch.compile vs ONNX Runtime on the CPU: the deployment section of results/speed.md")
    p.add_argument("--quick", action="store_true",
                   help="--speed / --engine / --deploy with fewer models, steps and repeats")
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

    p = sub.add_parser("export", help="a checkpoint as ONNX or torch.export, checked against the eager model")
    p.add_argument("--checkpoint", required=True, help="a cnnapps checkpoint of any task (e.g. runs/.../best.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "exported"],
                   help="onnx (dynamo exporter, run with ONNX Runtime; the `export` extra) or exported (.pt2)")
    p.add_argument("--out", default=None, help="output file (default: the checkpoint's path with .onnx / .pt2); "
                                               "the preprocessing JSON is written beside it as FILE.json")
    p.add_argument("--data-dir", default=None, help="data root for the task's test examples")
    p.add_argument("--examples", type=int, default=8, help="test examples to check the export on (default 8)")
    p.add_argument("--input", default=None, help="check on this NumPy batch (.npy, the model's input layout) "
                                                 "instead of the task's test examples")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |exported - eager| allowed, relative to the outputs' largest magnitude (>= 1)")
    p.set_defaults(func=cmd_export)

    add_understand_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cnnapps`` and the ``cnnapps`` script; returns the exit status. ``cnnapps TASK
    ...`` hands the rest to that task's command line (the parser ``python -m cnnapps.tasks.TASK`` uses too)."""
    from cnnapps.tasks import list_tasks
    from cnnapps.tasks.cli import main as task_main, run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in list_tasks():
        return task_main(argv[0], argv[1:], prog=f"cnnapps {argv[0]}")
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.func(args), extra=(KeyError, TypeError))


if __name__ == "__main__":
    sys.exit(main())
