"""``bench``: train and evaluate a task's small benchmark config, then write results/<name>.md and .json."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cnnapps.bench.results import run_key, write_run, write_summary
from cnnapps.engine.config import config_label, load_config, to_dict
from cnnapps.engine.runinfo import load_average, results_dir as _results_dir, run_facts
from cnnapps.engine.trainer import fit, resolve_device
from cnnapps.engine.task import Task
from cnnapps.tasks import get_task, list_tasks

log = logging.getLogger(__name__)


def run_task_bench(task: Task, config: str | Path | None, data_root: Path, overrides: list[str] | None = None,
                   results_dir: Path | None = None, name: str | None = None, quiet: bool = False) -> Path:
    """Run the benchmark config of ``task``; returns the path of the Markdown report written."""
    config = config or task.bench_config
    cfg = load_config(task.Config, config, overrides, search=task.config_dir())
    results_dir = _results_dir(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = name or task.name
    facts = run_facts(resolve_device(cfg.train.device))  # the commit and time the run started from
    label = config_label(config, task.config_dir())
    key = run_key(label, cfg.train.seed if _sets_seed(overrides or []) else None)
    runs = task.bench_runs(cfg, data_root)
    fits, reports = [], []
    with tempfile.TemporaryDirectory(prefix=f"cnnapps-bench-{task.name}-") as tmp:
        t0 = time.perf_counter()
        for run_name, run_cfg in runs:
            t_run = time.perf_counter()
            result = fit(task, run_cfg, Path(tmp) / (run_name.replace("/", "_") or "run"), data_root, quiet=quiet)
            fits.append((run_name, run_cfg, result, time.perf_counter() - t_run))
            # the task's own measurements, made from the finished run folder before the folder goes
            reports.append(task.bench_report(run_cfg, result.run_dir, results_dir, key, data_root=data_root))
        wall = time.perf_counter() - t0
    history = [h for _, _, result, _ in fits for h in result.history]
    throughput = sum(h["samples_per_s"] for h in history) / max(len(history), 1)
    extra: dict[str, Any] = task.bench_extra(cfg, data_root)
    monitor = cfg.train.monitor or task.monitor
    report = _merge_reports([name for name, *_ in fits], reports, extra)
    if len(fits) == 1:
        test = fits[0][2].test_metrics
        train_seconds, epochs = fits[0][2].train_seconds, fits[0][2].epochs_run
    else:
        test, fold_extra, fold_table = _combine_folds(fits, monitor)
        extra.update(fold_extra)
        report["tables"] = [fold_table, *report.get("tables", [])]
        train_seconds = sum(r.train_seconds for _, _, r, _ in fits)
        epochs = max(r.epochs_run for _, _, r, _ in fits)
    record = {
        "task": task.name, "config": label, "key": key,
        "overrides": overrides or [], **facts,
        "load_at_end": load_average(), "wall_seconds": round(wall, 2), "train_seconds": round(train_seconds, 2),
        "epochs": epochs, "train_samples_per_s": round(throughput, 2),
        "monitor": monitor, "test": test, "extra": extra,
        "report": report, "resolved_config": to_dict(cfg),
    }
    return write_run(record, results_dir, name)


def _merge_reports(names: list[str], reports: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """One results section from the ``bench_report`` of each run: notes, tables and pictures kept in order (a
    table's title names its run where there are several), each run's ``extra`` measurements moved into ``extra``
    (prefixed by the run's name where there are several)."""
    merged: dict[str, Any] = {}
    several = len(reports) > 1
    for run_name, rep in zip(names, reports):
        rep = dict(rep or {})
        extra.update({f"{run_name}: {k}" if several else k: v for k, v in rep.pop("extra", {}).items()})
        for table in rep.pop("tables", []):
            merged.setdefault("tables", []).append(
                {**table, "title": f"{table['title']} ({run_name})"} if several else table)
        merged.setdefault("notes", []).extend(rep.pop("notes", []))
        merged.setdefault("pictures", {}).update(rep.pop("pictures", {}))
        merged.update(rep)  # other keys: JSON only
    return {k: v for k, v in merged.items() if v}


def _sets_seed(overrides: list[str]) -> bool:
    """Whether ``--set`` overrides choose the seed: such a run is kept beside the config's own, not over it."""
    return any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides)


def _combine_folds(fits: list, monitor: str) -> tuple[dict, dict, dict]:
    """Several bench runs (folds) as one record: the mean of every numeric test metric they share, the monitor's
    mean, minimum, maximum and standard deviation, and a table of one row per run. Runs named ``group/fold``
    (variants of an ablation, each over the same folds) are summarised per group, and the record's test values
    are those of the first group."""
    import statistics

    def value(r: Any) -> float:
        return float(r.test_metrics.get(monitor, float("nan")))

    groups: dict[str, list] = {}
    for fit_ in fits:
        groups.setdefault(fit_[0].split("/", 1)[0] if "/" in fit_[0] else "", []).append(fit_)
    first = next(iter(groups.values()))
    shared = set.intersection(*(set(r.test_metrics) for _, _, r, _ in first))
    test = {k: statistics.fmean(float(r.test_metrics[k]) for _, _, r, _ in first) for k in sorted(shared)
            if all(isinstance(r.test_metrics[k], (int, float)) for _, _, r, _ in first)}
    extra: dict[str, Any] = {}
    for group, members in groups.items():
        values = [value(r) for _, _, r, _ in members]
        worst = min(range(len(members)), key=lambda i: values[i])
        where = f"{group}: " if group else ""
        extra.update({f"{where}{monitor} mean over runs": round(statistics.fmean(values), 4),
                      f"{where}{monitor} min over runs": round(values[worst], 4),
                      f"{where}worst run": members[worst][0],
                      f"{where}{monitor} max over runs": round(max(values), 4),
                      f"{where}{monitor} std over runs": round(statistics.pstdev(values), 4)})
    extra["runs"] = len(fits)
    extra["longest run training time (s)"] = round(max(r.train_seconds for _, _, r, _ in fits), 2)
    table = {"title": "runs", "columns": ["run", monitor, "training time (s)", "wall time (s)", "epochs", "best epoch"],
             "rows": [[n, round(value(r), 4), round(r.train_seconds, 2), round(w, 2), r.epochs_run, r.best_epoch]
                      for n, _, r, w in fits]}
    return test, extra, table


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
    named = to_dict(load_config(task.Config, config_name, search=task.config_dir()))
    overrides = [f"{sec}.{k}={v}" for sec, values in to_dict(cfg).items() if isinstance(values, dict)
                 for k, v in values.items() if named and named.get(sec, {}).get(k) != v]
    config_name = config_label(config_name, task.config_dir())
    key = run_key(config_name, cfg.train.seed if named and named.get("train", {}).get("seed") != cfg.train.seed
                  else None)
    results = _results_dir(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    record = {"task": task.name, "config": config_name, "key": key,
              "overrides": [f"recorded from run folder {run_dir}", *overrides],
              "load_at_end": "not recorded", "wall_seconds": "not recorded", **facts,
              "train_seconds": round(sum(h["seconds"] for h in history), 2),
              "epochs": len(history),
              "train_samples_per_s": round(sum(h["samples_per_s"] for h in history) / max(len(history), 1), 2),
              "monitor": cfg.train.monitor or task.monitor, "test": test, "extra": {},
              "report": task.bench_report(cfg, run_dir, results, key, data_root=data_root),
              "resolved_config": to_dict(cfg)}
    if data_root is not None:
        now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        record["extra"] = {**task.bench_extra(cfg, Path(data_root)),
                           "extra measurements": f"made when recorded, {now} (load {load_average()})"}
    return write_run(record, results, name or task.name)


def run_all(data_root: Path, results_dir: Path | None = None, device: str | None = None,
            tasks: list[str] | None = None, quiet: bool = True) -> list[dict]:
    """Run each task's ci config (tasks without one are listed as skipped); returns the JSON records."""
    results_dir = _results_dir(results_dir)
    records = []
    for name in tasks or list_tasks():
        task = get_task(name)
        config = task.config_dir() / f"{task.bench_config}.toml"
        if not config.is_file():
            log.warning("bench --all: task %s ships no %s config; skipped", name, task.bench_config)
            continue
        overrides = [f"train.device={device}"] if device else []
        md = run_task_bench(task, task.bench_config, data_root, overrides=overrides, results_dir=results_dir,
                            quiet=quiet)
        records.append(json.loads(md.with_suffix(".json").read_text())["runs"][run_key(task.bench_config)])
        log.info("bench %s: %s", name, md)
    write_summary(records, results_dir)
    return records
