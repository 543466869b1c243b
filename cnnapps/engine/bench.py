"""``bench``: train and evaluate a task's small benchmark config, then write results/<name>.md and .json."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cnnapps.engine.config import dumps_toml, load_config, to_dict
from cnnapps.engine.runinfo import REPO_ROOT, config_path, run_facts
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
    extra: dict[str, Any] = task.bench_extra(cfg, data_root) if hasattr(task, "bench_extra") else {}
    record = {
        "task": task.name, "config": str(Path(config).resolve().relative_to(REPO_ROOT))
        if Path(config).resolve().is_relative_to(REPO_ROOT) else str(config),
        "overrides": overrides or [], **facts,
        "wall_seconds": round(wall, 2), "train_seconds": round(result.train_seconds, 2),
        "epochs": result.epochs_run, "train_samples_per_s": round(throughput, 2),
        "monitor": cfg.train.monitor or task.monitor, "test": result.test_metrics, "extra": extra,
        "resolved_config": to_dict(cfg),
    }
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path = results_dir / f"{name}.md"
    md_path.write_text(format_markdown(record))
    return md_path


def format_markdown(record: dict) -> str:
    """The human-readable twin of a results JSON record."""
    lines = [f"# {record['task']}: benchmark `{record['config']}`", "",
             f"Written by `python -m cnnapps.tasks.{record['task']} bench` - do not edit by hand.", "",
             "| fact | value |", "| --- | --- |"]
    for key in ("machine", "device", "commit", "time_utc", "torch", "wall_seconds", "train_seconds", "epochs",
                "train_samples_per_s", "monitor"):
        lines.append(f"| {key} | {record[key]} |")
    if record["overrides"]:
        lines.append(f"| overrides | {' '.join(record['overrides'])} |")
    lines += ["", "## Test split", "", "| metric | value |", "| --- | --- |"]
    for k, v in record["test"].items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if record["extra"]:
        lines += ["", "## Extra measurements", "", "| measurement | value |", "| --- | --- |"]
        for k, v in record["extra"].items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "## Resolved config", "", "```toml", dumps_toml(record["resolved_config"]).rstrip(), "```", ""]
    return "\n".join(lines)
