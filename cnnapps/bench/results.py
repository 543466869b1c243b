"""Results files: one section per config in results/<task>.md and .json, the summary table of every task's ci
benchmark (results/README.md), and the floors that fail CI."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

from cnnapps.engine.config import dumps_toml
from cnnapps.engine.runinfo import REPO_ROOT

FLOORS = REPO_ROOT / "results" / "floors.toml"


def run_key(config: str, seed: int | None = None) -> str:
    """A run's key inside its task's results file: the config file's stem (``ci``, ``default``, ...), with
    ``@seed<N>`` for a run whose seed was chosen apart from its config's (repeats kept beside each other)."""
    return Path(config).stem + (f"@seed{seed}" if seed is not None else "")


def _config_of_key(key: str) -> str:
    return key.split("@", 1)[0]


def write_run(record: dict, results_dir: Path, name: str) -> Path:
    """Put ``record`` into ``results/<name>.json`` (one entry per config, others kept) and re-render the
    Markdown twin. Returns the Markdown path."""
    json_path = Path(results_dir) / f"{name}.json"
    doc = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if doc.get("task") != record["task"] or "runs" not in doc:
        doc = {"task": record["task"], "runs": {}}
    doc["runs"][record.get("key") or run_key(record["config"])] = record
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(format_markdown(doc))
    return md_path


def cell(value: object) -> str:
    """One value as people read it: counts as integers, other numbers with up to four decimals (13.95, 0.841),
    a missing value as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return str(int(value)) if value.is_integer() else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def table_row(cells: list) -> str:
    """A Markdown table row of ``cell`` values."""
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def format_markdown(doc: dict) -> str:
    """The human-readable twin of a task's results JSON: a summary table, then one section per config."""
    task, runs = doc["task"], sorted(doc["runs"].values(), key=lambda r: r["time_utc"])
    lines = [f"# Results: {task}", "",
             f"Written by `cnnapps {task} bench [--config ...]` - do not edit by hand. One section "
             "per config; `ci` is the small-subset benchmark that CI repeats.", "",
             "| config | monitor | test value | training time (s) | epochs | machine | commit | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [table_row([f"`{r.get('key') or r['config']}`", r["monitor"], r["test"].get(r["monitor"]),
                         r["train_seconds"], r["epochs"], r["machine"], r["commit"], r["time_utc"]]) for r in runs]
    lines += _repeats_table(runs)
    for r in runs:
        lines += ["", f"## `{r.get('key') or r['config']}`", "", "| fact | value |", "| --- | --- |"]
        for key in ("machine", "device", "commit", "time_utc", "torch", "load_at_start", "load_at_end",
                    "wall_seconds", "wall_seconds_from", "resumed", "train_seconds", "epochs",
                    "train_samples_per_s", "monitor"):
            if key in r:  # records from before the load was recorded lack it
                lines.append(f"| {key} | {r[key]} |")
        if r["overrides"]:
            lines.append(f"| overrides | {' '.join(r['overrides'])} |")
        several = int(r["extra"].get("runs", 1)) > 1  # folds: the test values are their mean
        lines += ["", "Test split (mean over the runs below):" if several else "Test split:", "", "| metric | value |",
                  "| --- | --- |"]
        for k, v in r["test"].items():
            lines.append(f"| {k} | {cell(v)} |")
        if r["extra"]:
            lines += ["", "Extra measurements:", "", "| measurement | value |", "| --- | --- |"]
            for k, v in r["extra"].items():
                lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines += _report_lines(r.get("report") or {})
        lines += ["", "<details><summary>resolved config</summary>", "", "```toml",
                  dumps_toml(r["resolved_config"]).rstrip(), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _report_lines(report: dict) -> list[str]:
    """A task's ``bench_report`` as Markdown: its notes, tables (each with an optional note under its title) and
    pictures."""
    lines: list[str] = []
    for note in report.get("notes", []):
        lines += ["", note]
    for table in report.get("tables", []):
        lines += ["", f"{table['title']}:", ""]
        if table.get("note"):
            lines += [table["note"], ""]
        lines += [table_row(table["columns"]), "| " + " | ".join("---" for _ in table["columns"]) + " |"]
        lines += [table_row(row) for row in table["rows"]]
    for caption, file in report.get("pictures", {}).items():
        lines += ["", f"![{caption}]({file})"]
    return lines


def _repeats_table(runs: list[dict]) -> list[str]:
    """Configs run with several seeds: mean, sample standard deviation, min and max of the monitored test value
    and the mean training time, over the runs of each."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(_config_of_key(r.get("key") or run_key(r["config"])), []).append(r)
    rows = []
    for config, group in groups.items():
        values = [r["test"].get(r["monitor"]) for r in group]
        if len(group) < 2 or any(v is None for v in values) or len({r["monitor"] for r in group}) > 1:
            continue
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        seeds = ", ".join(str(r["resolved_config"].get("train", {}).get("seed", "?")) for r in group)
        rows.append(table_row([f"`{config}`", seeds, group[0]["monitor"], mean, sd, min(values), max(values),
                               sum(r["train_seconds"] for r in group) / len(group)]))
    if not rows:
        return []
    return ["", "Repeated runs (the same config, different train.seed):", "",
            "| config | seeds | monitor | mean | sd | min | max | mean training time (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows]


def _dataset_of(record: dict) -> str:
    data = record["resolved_config"].get("data") or {}
    return str(data.get("dataset") or data.get("source") or "")


def write_summary(records: list[dict], results_dir: Path) -> Path:
    """results/README.md: task, data set, metric, value, training time, throughput, device, commit."""
    lines = ["# Results", "", "Written by `cnnapps bench --all` - do not edit by hand. Each row is a task's "
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
