"""``bench``: train and evaluate a task's small benchmark config, then write results/<name>.md and .json."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cnnapps.engine.config import dumps_toml, load_config, to_dict
from cnnapps.engine.runinfo import REPO_ROOT, config_path, load_average, run_facts
from cnnapps.engine.trainer import fit, resolve_device
from cnnapps.tasks.base import Task

log = logging.getLogger(__name__)


def run_task_bench(task: Task, config: Path | None, data_root: Path, overrides: list[str] | None = None,
                   results_dir: Path | None = None, name: str | None = None, quiet: bool = False) -> Path:
    """Run the benchmark config of ``task``; returns the path of the Markdown report written."""
    config = config or config_path(task.name, task.bench_config)
    cfg = load_config(task.Config, config, overrides)
    results_dir = Path(results_dir or REPO_ROOT / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    name = name or task.name
    facts = run_facts(resolve_device(cfg.train.device))  # the commit and time the run started from
    with tempfile.TemporaryDirectory(prefix=f"cnnapps-bench-{task.name}-") as tmp:
        t0 = time.perf_counter()
        result = fit(task, cfg, Path(tmp) / "run", data_root, quiet=quiet)
        wall = time.perf_counter() - t0
    history = result.history
    throughput = sum(h["samples_per_s"] for h in history) / max(len(history), 1)
    extra: dict[str, Any] = task.bench_extra(cfg, data_root)
    record = {
        "task": task.name, "config": str(Path(config).resolve().relative_to(REPO_ROOT))
        if Path(config).resolve().is_relative_to(REPO_ROOT) else str(config),
        "overrides": overrides or [], **facts,
        "load_at_end": load_average(), "wall_seconds": round(wall, 2), "train_seconds": round(result.train_seconds, 2),
        "epochs": result.epochs_run, "train_samples_per_s": round(throughput, 2),
        "monitor": cfg.train.monitor or task.monitor, "test": result.test_metrics, "extra": extra,
        "resolved_config": to_dict(cfg),
    }
    return write_run(record, results_dir, name)


def record_finished_run(task: Task, run_dir: Path, config_name: str, results_dir: Path | None = None,
                        name: str | None = None, data_root: Path | None = None) -> Path:
    """Record a run that ``train`` finished (its folder's config.toml, metrics.jsonl, metrics.json and run.json,
    all written by the engine) as the ``config_name`` section of results/<name>.md. For long runs made with
    ``train`` rather than ``bench``: the run's numbers are taken as they are; only the task's extra measurements
    (``bench_extra``, e.g. data-pipeline throughput) are made now, where ``data_root`` is given, and the record
    says so."""
    run_dir = Path(run_dir)
    for needed in ("config.toml", "metrics.jsonl", "metrics.json"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(f"{run_dir}: no {needed}; is this a finished run folder?")
    cfg = load_config(task.Config, run_dir / "config.toml")
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    test = json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "run.json").is_file():
        facts = json.loads((run_dir / "run.json").read_text())
        facts.pop("task", None)
        if "wall_seconds" not in facts:  # runs from before the engine wrote its end: the files' times tell
            facts["wall_seconds"] = round((run_dir / "metrics.json").stat().st_mtime
                                          - (run_dir / "run.json").stat().st_mtime, 1)
            facts["wall_seconds_from"] = "file times: run.json (start) to metrics.json (end)"
    else:  # runs started before the engine wrote run.json: say what is not known rather than guess
        started = time.gmtime((run_dir / "config.toml").stat().st_mtime)
        facts = {"machine": "not recorded by this run", "device": cfg.train.device, "commit": "not recorded",
                 "time_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", started), "torch": "not recorded",
                 "load_at_start": "not recorded"}
    named = to_dict(load_config(task.Config, config_name)) if Path(config_name).is_file() else {}
    overrides = [f"{sec}.{k}={v}" for sec, values in to_dict(cfg).items() if isinstance(values, dict)
                 for k, v in values.items() if named and named.get(sec, {}).get(k) != v]
    config_name = str(Path(config_name).resolve().relative_to(REPO_ROOT)) \
        if Path(config_name).resolve().is_relative_to(REPO_ROOT) else config_name
    record = {"task": task.name, "config": config_name,
              "overrides": [f"recorded from run folder {run_dir}", *overrides],
              "load_at_end": "not recorded", "wall_seconds": "not recorded", **facts,
              "train_seconds": round(sum(h["seconds"] for h in history), 2),
              "epochs": len(history),
              "train_samples_per_s": round(sum(h["samples_per_s"] for h in history) / max(len(history), 1), 2),
              "monitor": cfg.train.monitor or task.monitor, "test": test, "extra": {},
              "resolved_config": to_dict(cfg)}
    if data_root is not None:
        now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        record["extra"] = {**task.bench_extra(cfg, Path(data_root)),
                           "extra measurements": f"made when recorded, {now} (load {load_average()})"}
    return write_run(record, Path(results_dir or REPO_ROOT / "results"), name or task.name)


def run_key(config: str) -> str:
    """A run's key inside its task's results file: the config file's stem (``ci``, ``default``, ...)."""
    return Path(config).stem


def write_run(record: dict, results_dir: Path, name: str) -> Path:
    """Put ``record`` into ``results/<name>.json`` (one entry per config, others kept) and re-render the
    Markdown twin. Returns the Markdown path."""
    json_path = Path(results_dir) / f"{name}.json"
    doc = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if doc.get("task") != record["task"] or "runs" not in doc:
        doc = {"task": record["task"], "runs": {}}
    doc["runs"][run_key(record["config"])] = record
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(format_markdown(doc))
    return md_path


def table_row(cells: list) -> str:
    """A Markdown table row; floats with four decimals, a missing value as n/a."""
    return "| " + " | ".join("n/a" if c is None else f"{c:.4f}" if isinstance(c, float) else str(c)
                             for c in cells) + " |"


def format_markdown(doc: dict) -> str:
    """The human-readable twin of a task's results JSON: a summary table, then one section per config."""
    task, runs = doc["task"], sorted(doc["runs"].values(), key=lambda r: r["time_utc"])
    lines = [f"# Results: {task}", "",
             f"Written by `python -m cnnapps.tasks.{task} bench [--config ...]` - do not edit by hand. One section "
             "per config; `ci` is the small-subset benchmark that CI repeats.", "",
             "| config | monitor | test value | training time (s) | epochs | machine | commit | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [table_row([f"`{r['config']}`", r["monitor"], r["test"].get(r["monitor"]), r["train_seconds"],
                         r["epochs"], r["machine"], r["commit"], r["time_utc"]]) for r in runs]
    for r in runs:
        lines += ["", f"## `{r['config']}`", "", "| fact | value |", "| --- | --- |"]
        for key in ("machine", "device", "commit", "time_utc", "torch", "load_at_start", "load_at_end",
                    "wall_seconds", "wall_seconds_from", "resumed", "train_seconds", "epochs",
                    "train_samples_per_s", "monitor"):
            if key in r:  # records from before the load was recorded lack it
                lines.append(f"| {key} | {r[key]} |")
        if r["overrides"]:
            lines.append(f"| overrides | {' '.join(r['overrides'])} |")
        lines += ["", "Test split:", "", "| metric | value |", "| --- | --- |"]
        for k, v in r["test"].items():
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) and not float(v).is_integer()
                         else f"| {k} | {v:g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |")
        if r["extra"]:
            lines += ["", "Extra measurements:", "", "| measurement | value |", "| --- | --- |"]
            for k, v in r["extra"].items():
                lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines += ["", "<details><summary>resolved config</summary>", "", "```toml",
                  dumps_toml(r["resolved_config"]).rstrip(), "```", "", "</details>"]
    return "\n".join(lines) + "\n"
