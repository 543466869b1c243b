"""Facts recorded beside every result: machine, commit, time, library versions."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files outside ``results/`` differ from it (results are
    what benchmarks write, so one bench's output must not mark the next one's code as changed); ``unknown``
    outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """Where results files go: ``path`` if given; else the checkout's ``results/`` when the package runs from a
    checkout of this repository; else ``./results`` (an installed package writes beside its user)."""
    if path is not None:
        return Path(path)
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "results").is_dir():
        return REPO_ROOT / "results"
    return Path("results")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    """E.g. ``cpu: Intel Xeon ... (2 cores, 2 torch threads)`` or ``cuda: NVIDIA H100 ...``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def load_average() -> str:
    """The 1-minute load average against the core count, e.g. ``4.1 on 2 cores``: timings taken while other
    jobs share the cores are slower, and results say so."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def run_facts(device: torch.device | str = "cpu") -> dict[str, str]:
    """Machine, commit, UTC time, versions and the machine's load at that moment, for results files."""
    return {"machine": machine_description(device), "device": str(device), "commit": git_commit(),
            "load_at_start": load_average(),
            "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "torch": torch.__version__, "python": platform.python_version()}

