"""GPU readiness (``bash scripts/gpu_check.sh``): every task's bench config on CUDA in bf16 with channels_last
and ``torch.compile``, the extra runs a task asks for (``Task.gpu_check_runs``: one epoch of the ECG task's full
34-layer network), our backbones against torchvision's on the GPU, and a one-process NCCL DDP run through
``torchrun``; results/gpu.md with the device's name.

Without a CUDA device it says so, checks that every step would start (each config resolves with the GPU
settings; torchrun, inductor and NCCL are importable) and exits 0 having measured nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cnnapps.engine.config import load_config
from cnnapps.engine.runinfo import REPO_ROOT, results_dir, run_facts
from cnnapps.tasks import get_task, list_tasks

GPU_SETTINGS = ["train.device=cuda", "train.precision=bf16", "train.channels_last=true", "train.compile=true"]


def plan() -> list[dict[str, Any]]:
    """The runs of the check: ``{"what", "task", "config", "overrides"}`` (every task's bench config and the extra
    runs it asks for), each config resolved (so a dry run catches a config that no longer loads)."""
    steps = []
    for name in list_tasks():
        task = get_task(name)
        if (task.config_dir() / f"{task.bench_config}.toml").is_file():
            steps.append({"what": f"{name} {task.bench_config} on CUDA", "task": name, "config": task.bench_config,
                          "overrides": list(GPU_SETTINGS)})
        for config, extra in task.gpu_check_runs:
            steps.append({"what": f"{name} {config} ({' '.join(extra)})", "task": name, "config": config,
                          "overrides": [*GPU_SETTINGS, *extra]})
    for step in steps:
        task = get_task(step["task"])
        load_config(task.Config, step["config"], step["overrides"], search=task.config_dir())
    return steps


def dry_run() -> list[str]:
    """What can be checked without a GPU; returns one line per check (raises on a failed check)."""
    lines = []
    for step in plan():
        lines.append(f"ok: {step['what']}: `{step['task']} {step['config']}` resolves with {' '.join(step['overrides'])}")
    import torch._inductor  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import torchvision  # noqa: F401

    lines.append("ok: torch.compile (inductor), torchrun and torchvision import")
    lines.append(f"ok: NCCL built into this torch: {torch.distributed.is_nccl_available()}")
    return lines


def _timed_fit(task_name: str, config: str, overrides: list[str], data_root: Path) -> dict[str, Any]:
    from cnnapps.engine.trainer import fit

    task = get_task(task_name)
    cfg = load_config(task.Config, config, overrides, search=task.config_dir())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnnapps-gpu-") as tmp:
        try:
            result = fit(task, cfg, Path(tmp) / "run", data_root, quiet=True)
        except Exception as exc:  # noqa: BLE001 - one failing run is a row of the report, the others go on
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                    "wall_seconds": round(time.perf_counter() - t0, 1)}
    monitor = cfg.train.monitor or task.monitor
    return {"monitor": monitor, "value": result.test_metrics.get(monitor), "train_seconds": result.train_seconds,
            "samples_per_s": round(sum(h["samples_per_s"] for h in result.history) / max(len(result.history), 1), 1),
            "epochs": result.epochs_run, "wall_seconds": round(time.perf_counter() - t0, 1)}


def _ddp_run(data_root: Path) -> dict[str, Any]:
    """One NCCL process through torchrun, one epoch of the first engine-benchmark case (a small, quick config)."""
    from cnnapps.bench.engine import cases

    case = cases()[0]
    with tempfile.TemporaryDirectory(prefix="cnnapps-ddp-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "cnnapps", case.task, "train", "--config", case.config, "--out", f"{tmp}/run", "--data-dir",
               str(data_root), "--set", "train.device=cuda", "--set", "train.epochs=1", "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        row: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_status": proc.returncode,
                               "wall_seconds": round(time.perf_counter() - t0, 1)}
        metrics = Path(tmp) / "run" / "metrics.json"
        if metrics.is_file():
            task = get_task(case.task)
            row["monitor"] = task.monitor
            row["value"] = json.loads(metrics.read_text()).get(task.monitor)
        if proc.returncode:
            row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "no output"
    return row


def run_gpu_check(data_root: Path, out: Path | None = None) -> Path:
    """Measure everything on the first CUDA device; results/gpu.md and .json. Returns the Markdown path."""
    from cnnapps.bench.speed import compare_with_torchvision

    device = torch.device("cuda", 0)
    started = time.perf_counter()
    record: dict[str, Any] = {**run_facts(device), "device_name": torch.cuda.get_device_name(device), "runs": []}
    for step in plan():
        record["runs"].append({**step, **_timed_fit(step["task"], step["config"], step["overrides"], data_root)})
    record["speed"] = compare_with_torchvision(["resnet18", "resnet50", "vgg16"], 224, 64, device, 20,
                                               ["fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"])
    record["ddp"] = _ddp_run(data_root)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    folder = results_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    md = folder / "gpu.md"
    md.write_text(format_gpu(record))
    return md


def format_gpu(r: dict) -> str:
    lines = ["# GPU readiness", "", "Written by `bash scripts/gpu_check.sh` - do not edit by hand.", "",
             f"device: {r['device_name']}; commit: {r['commit']}; time: {r['time_utc']}; torch {r['torch']}; "
             f"whole check {r['wall_seconds']} s", "",
             "## Every task's bench config (and the extra runs tasks ask for) in bf16 + channels_last + "
             "torch.compile", "",
             "| run | config | monitor | test value | training time (s) | samples/s | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in r["runs"]:
        if "error" in run:
            lines.append(f"| {run['what']} | `{run['config']}` | failed: {run['error']} | | | | {run['wall_seconds']} |")
        else:
            lines.append(f"| {run['what']} | `{run['config']}` | {run['monitor']} | {run['value']} | "
                         f"{run['train_seconds']} | {run['samples_per_s']} | {run['wall_seconds']} |")
    lines += ["", "## Backbones against torchvision on the GPU (batch 64, 224 px)", "",
              "| model | mode | variant | ours (images/s) | torchvision (images/s) | ratio |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {b['model']} | {b['mode']} | {b['variant']} | {b.get('ours_per_s')} | {b.get('torchvision_per_s')} | "
              f"{b.get('ratio', b.get('error'))} |" for b in r["speed"]]
    d = r["ddp"]
    lines += ["", "## One-process NCCL DDP through torchrun", "", f"`{d['command']}`: exit status {d['exit_status']}, "
              f"{d['wall_seconds']} s, test {d.get('monitor')} {d.get('value')}" +
              (f"; {d['error']}" if "error" in d else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default=None, help="results folder (default: the checkout's results/)")
    p.add_argument("--dry-run", action="store_true", help="only check that every step would start")
    args = p.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device here: a dry run only (nothing is measured, results/gpu.md is not written)")
        for line in dry_run():
            print(line)
        return 0
    from cnnapps.data.root import find_data_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "cnnapps-inductor"))
    print(f"wrote {run_gpu_check(find_data_root(args.data_dir), Path(args.results) if args.results else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
