"""Task plugins: a tiny task from a separately installed package appears in `cnnapps list` and trains through
the shared engine and CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

TINY_TASK = textwrap.dedent('''
    """A tiny third-party task: logistic regression on scikit-learn's bundled 8x8 digits."""
    from dataclasses import dataclass, field

    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    from cnnapps.engine.config import TrainConfig
    from cnnapps.metrics import ClassificationMetrics
    from cnnapps.tasks.base import DataSplits, Task, TaskConfig


    @dataclass
    class TinyData:
        n_val: int = 300


    @dataclass
    class TinyConfig(TaskConfig):
        data: TinyData = field(default_factory=TinyData)
        model: dict = field(default_factory=dict)
        train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.1, batch_size=64))


    class TinyTask(Task):
        name = "tiny"
        Config = TinyConfig

        def build_data(self, cfg, data_root, state=None, split=None):
            d = load_digits()
            x = torch.tensor(d.data, dtype=torch.float32) / 16.0
            y = torch.tensor(d.target)
            n = cfg.data.n_val
            return DataSplits(train=TensorDataset(x[2 * n:], y[2 * n:]), val=TensorDataset(x[:n], y[:n]),
                              test=TensorDataset(x[n:2 * n], y[n:2 * n]), state={"classes": list(range(10))})

        def build_model(self, cfg, data):
            return torch.nn.Linear(64, 10)

        def step(self, model, batch, cfg):
            x, y = batch
            out = model(x)
            return {"loss": F.cross_entropy(out, y), "output": out}

        def metrics(self, cfg, data):
            return ClassificationMetrics([str(c) for c in data.state["classes"]])
''')

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["setuptools>=68"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "cnnapps-tiny-task"
    version = "0.0.1"

    [project.entry-points."cnnapps.tasks"]
    tiny = "tinytask:TinyTask"

    [tool.setuptools]
    py-modules = ["tinytask"]
''')


def test_installed_third_party_task_is_listed_and_trains(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "tinytask.py").write_text(TINY_TASK)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(pkg)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    listed = subprocess.run([sys.executable, "-m", "cnnapps", "list"], env=env, cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    assert "tiny" in listed and "classify" in listed

    run = tmp_path / "run"
    code = ("from cnnapps.tasks.cli import main; import sys; "
            f"sys.exit(main('tiny', ['train', '--out', r'{run}', '--quiet', '--data-dir', r'{tmp_path}']))")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.8  # a linear model on 8x8 digits; chance is 0.1
