"""Shared fixtures: the real data root ($CNNAPPS_DATA, else ../shared/data) and a small thread budget."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    env = os.environ.get("CNNAPPS_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if root.is_dir() else None


DATA_ROOT = _data_root()


def _fsdd_dir() -> Path | None:
    """FSDD's recordings folder where the package finds its data root, else None."""
    from cnnapps.data.root import DataNotFoundError, find_data_root

    try:
        folder = find_data_root() / "fsdd" / "recordings"
    except DataNotFoundError:
        return None
    return folder if folder.is_dir() else None


FSDD = _fsdd_dir()
needs_fsdd = pytest.mark.skipif(FSDD is None, reason="FSDD not found: set CNNAPPS_DATA to the shared data folder")


def ci_config(task, *overrides: str):
    """``task``'s benchmark config (its shipped ``ci`` config, found as ``bench`` finds it), so a test fits exactly what
    ``bench`` measures."""
    from cnnapps.engine.config import load_config

    return load_config(task.Config, task.bench_config, list(overrides), search=task.config_dir())


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data sets; tests needing them skip (with the reason) only where the folder is absent."""
    if DATA_ROOT is None:
        pytest.skip("no data folder: set CNNAPPS_DATA (this project keeps it in ../shared/data)")
    return DATA_ROOT


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def meets_floor():
    """``meets_floor(task, metrics)``: assert the test metrics of a fit of the task's ``ci`` config hold the floors
    in results/floors.toml (the same check as ``bench --all --check-floors``), so a test that already fits the ci
    config enforces them without CI training it twice."""
    from cnnapps.bench.results import check_floors

    def check(task: str, metrics: dict) -> None:
        failures = check_floors([{"task": task, "test": metrics}], REPO / "results" / "floors.toml")
        assert not failures, failures

    return check


def read_eval(folder: Path) -> dict:
    """The values of the one ``evaluate --out folder`` record in ``folder`` (eval-<split>-<time>.json)."""
    import json

    files = sorted(folder.glob("eval-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["values"]


def eval_pictures(folder: Path) -> Path:
    """The folder of report pictures that ``evaluate --out folder`` wrote beside its record."""
    dirs = sorted(p for p in folder.glob("eval-*") if p.is_dir())
    assert len(dirs) == 1, dirs
    return dirs[0]
