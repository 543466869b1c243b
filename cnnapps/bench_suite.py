"""``python -m cnnapps bench --all``: every task's ci benchmark, one summary table, and floors that fail CI."""
from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

from cnnapps.engine.bench import run_key, run_task_bench, table_row
from cnnapps.engine.runinfo import REPO_ROOT, config_path
from cnnapps.tasks import get_task, list_tasks

log = logging.getLogger(__name__)

FLOORS = REPO_ROOT / "results" / "floors.toml"


def run_all(data_root: Path, results_dir: Path | None = None, device: str | None = None,
            tasks: list[str] | None = None, quiet: bool = True) -> list[dict]:
    """Run each task's ci config (tasks without one are listed as skipped); returns the JSON records."""
    results_dir = Path(results_dir or REPO_ROOT / "results")
    records = []
    for name in tasks or list_tasks():
        task = get_task(name)
        config = config_path(name, task.bench_config)
        if not config.is_file():
            log.warning("bench --all: task %s has no %s; skipped", name, config)
            continue
        overrides = [f"train.device={device}"] if device else []
        md = run_task_bench(task, config, data_root, overrides=overrides, results_dir=results_dir, quiet=quiet)
        records.append(json.loads(md.with_suffix(".json").read_text())["runs"][run_key(str(config))])
        log.info("bench %s: %s", name, md)
    write_summary(records, results_dir)
    return records


def _dataset_of(record: dict) -> str:
    data = record["resolved_config"].get("data") or {}
    return str(data.get("dataset") or data.get("source") or "")


def write_summary(records: list[dict], results_dir: Path) -> Path:
    """results/README.md: task, data set, metric, value, training time, throughput, device, commit."""
    lines = ["# Results", "", "Written by `python -m cnnapps bench --all` - do not edit by hand. Each row is a task's "
             "small-subset (ci) benchmark; the per-task files beside this one hold every metric and the config.", "",
             "| task | data set | metric | value | training time (s) | train samples/s | device | commit | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [table_row([r["task"], _dataset_of(r), r["monitor"], r["test"].get(r["monitor"]), r["train_seconds"],
                         r["train_samples_per_s"], r["machine"], r["commit"], r["time_utc"]]) for r in records]
    path = Path(results_dir) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_floors(records: list[dict], floors_file: Path = FLOORS) -> list[str]:
    """Messages for every task metric below its floor in ``floors_file`` (``[task] metric = floor``)."""
    floors = tomllib.loads(floors_file.read_text()) if floors_file.is_file() else {}
    failures = []
    for r in records:
        for metric, floor in floors.get(r["task"], {}).items():
            value = r["test"].get(metric)
            if value is None or value < floor:
                failures.append(f"{r['task']}: {metric} = {value} is below its floor {floor} ({floors_file.name})")
    return failures
