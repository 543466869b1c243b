"""Installed, not just checked out: a wheel of the project, installed without editable mode into a fresh virtual
environment (its dependencies seen through the project's environment), runs from another folder: a task trains
from a shipped config, a config prints, and bench records a user's own config that starts from a shipped one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the fresh environment's bin folder, the environment variables to run it with)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                  str(REPO)], cwd=tmp)
    # the project's metadata is clean: building prints no deprecation warning (the license is an SPDX string)
    assert "deprecat" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("cnnapps-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for task in ("classify", "ecg", "audio", "detect", "multilabel", "segment"):
        assert f"cnnapps/tasks/{task}/configs/ci.toml" in names, task
    assert "cnnapps/py.typed" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the dependencies (torch, ...) come from the project's environment; its editable cnnapps does not, since
    # .pth files of a folder added this way are not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"CNNAPPS_DATA": os.environ.get("CNNAPPS_DATA", str(REPO.parent / "shared" / "data")),
                "OMP_NUM_THREADS": "1"})
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
         cwd=tmp, env=env)
    return venv / "bin", env


def test_the_installed_package_is_the_wheel(installed, tmp_path):
    bindir, env = installed
    where = _run([str(bindir / "python"), "-c", "import cnnapps; print(cnnapps.__file__)"], cwd=tmp_path, env=env)
    assert str(bindir.parent) in where.stdout and str(REPO) not in where.stdout


def test_a_task_trains_from_a_shipped_config_in_another_folder(installed, tmp_path):
    bindir, env = installed
    _run([str(bindir / "cnnapps"), "audio", "train", "--config", "ci", "--out", "run", "--quiet",
          "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.threads=1"],
         cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert "accuracy" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_config_prints_and_bench_records_a_users_config(installed, tmp_path):
    bindir, env = installed
    shown = _run([str(bindir / "cnnapps"), "ecg", "config", "--config", "default"], cwd=tmp_path, env=env)
    assert "[data]" in shown.stdout and 'dataset = "cinc2017"' in shown.stdout
    (tmp_path / "tiny.toml").write_text('base = "ci"\n\n[data]\ntrain_subset = 256\ntest_subset = 64\n\n'
                                        '[train]\nepochs = 1\nmax_steps_per_epoch = 2\nthreads = 1\n')
    _run([str(bindir / "cnnapps"), "classify", "bench", "--config", "tiny.toml", "--results", "res", "--quiet"],
         cwd=tmp_path, env=env)
    record = json.loads((tmp_path / "res" / "classify.json").read_text())["runs"]["tiny"]
    assert record["resolved_config"]["data"]["train_subset"] == 256 and "accuracy" in record["test"]
    assert (tmp_path / "res" / "classify.md").is_file()
