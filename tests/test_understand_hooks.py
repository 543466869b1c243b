"""Tasks come into ``cnnapps explain``/``visualize``/``understand-report`` through their explain hooks only: no
built-in task's name appears in the code of cnnapps/understand, a third-party task that implements the hooks is
explained through ``cnnapps explain`` (and one without them is a one-line error), and a two-lead ECG model is
explained on the leads it was trained on."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

# Folders whose code must not know a built-in task. cnnapps/bench joins once its task-specific cases move to
# task hooks.
TASK_FREE = ["cnnapps/understand"]


def builtin_tasks() -> set[str]:
    """The task names this package registers itself (entry points whose object lives in cnnapps.tasks)."""
    names = {ep.name for ep in entry_points(group="cnnapps.tasks") if ep.value.startswith("cnnapps.tasks.")}
    assert {"classify", "ecg", "audio"} <= names  # the walk below is only as good as this list
    return names


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def task_names_in_code(source: str, names: set[str], where: str = "<source>") -> list[str]:
    """Every place in ``source`` where code names one of the tasks ``names``: a string literal (f-string parts
    included) holding the name as a word (letters on neither side: ``"ecg"``, ``"filters_ecg.png"``, ``"ci-ecg"``,
    any case), an identifier with the name as one of its ``_``-separated parts (``ecg_ckpt``), or an import of
    ``cnnapps.tasks.<name>``. Comments and docstrings are prose and not looked at."""
    tree = ast.parse(source, where)
    docstrings = _docstring_nodes(tree)
    word = re.compile(r"(?<![A-Za-z])(" + "|".join(map(re.escape, sorted(names))) + r")(?![A-Za-z])", re.I)
    found = []

    def ident(name: str | None, node: ast.AST) -> None:
        if name and any(part.lower() in names for part in name.split("_")):
            found.append(f"{where}:{node.lineno}: identifier {name!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if word.search(node.value):
                found.append(f"{where}:{node.lineno}: string {node.value!r}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module or ''}.{a.name}" for a in node.names]
            hits = {".".join(m.split(".")[:3]) for m in modules
                    if m.split(".")[:2] == ["cnnapps", "tasks"] and m.count(".") >= 2 and m.split(".")[2] in names}
            found += [f"{where}:{node.lineno}: import of {m}" for m in sorted(hits)]
            for a in node.names:
                ident(a.asname, node)
        elif isinstance(node, ast.Name):
            ident(node.id, node)
        elif isinstance(node, ast.Attribute):
            ident(node.attr, node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            ident(node.name, node)
        elif isinstance(node, ast.arg):
            ident(node.arg, node)
        elif isinstance(node, ast.keyword):
            ident(node.arg, node)
    return found


def test_the_checker_finds_task_names_in_code_only():
    source = textwrap.dedent('''
        """Module docstring: the ecg and classify tasks are explained alike."""
        import cnnapps.tasks.ecg.prepare
        from cnnapps.tasks.classify import data
        from cnnapps.tasks import get_task  # the registry: fine

        def picture(ecg_ckpt, kind="biosignal"):
            """Docstring naming audio: prose."""
            # a comment naming segment
            name = f"filters_{kind}.png"
            return get_task("audio"), "ci-detect", "Segmentation and detection", f"ECG strip {name}"
    ''')
    found = task_names_in_code(source, {"classify", "ecg", "audio", "detect", "segment"})
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted([
        "import of cnnapps.tasks.ecg", "import of cnnapps.tasks.classify",
        "identifier 'ecg_ckpt'", "string 'audio'", "string 'ci-detect'", "string 'ECG strip '"])


@pytest.mark.parametrize("folder", TASK_FREE)
def test_no_builtin_task_name_in_code(folder):
    names = builtin_tasks()
    files = sorted((REPO / folder).rglob("*.py"))
    assert files
    found = [hit for f in files for hit in task_names_in_code(f.read_text(), names, str(f.relative_to(REPO)))]
    assert found == []


# ---------------------------------------------------------------- a third-party task with explain hooks

THIRD_PARTY = textwrap.dedent('''
    """Two tiny third-party tasks on scikit-learn's 8x8 digits: one with the explain hooks, one without."""
    from dataclasses import dataclass, field

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    from cnnapps.engine.config import TrainConfig
    from cnnapps.engine.task import DataSplits, Task, TaskConfig
    from cnnapps.metrics import ClassificationMetrics
    from cnnapps.understand.views import ExplainView, LoadedInput


    @dataclass
    class DigitsConfig(TaskConfig):
        data: dict = field(default_factory=dict)
        model: dict = field(default_factory=dict)
        train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.1, batch_size=64))


    class PlainDigits(Task):
        """A conv net on (1, 8, 8) digits; no explain hooks."""

        name = "plaindigits"
        Config = DigitsConfig

        def build_data(self, cfg, data_root, state=None, split=None):
            d = load_digits()
            x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
            y = torch.tensor(d.target)
            return DataSplits(train=TensorDataset(x[600:], y[600:]), val=TensorDataset(x[:300], y[:300]),
                              test=TensorDataset(x[300:600], y[300:600]), state={"classes": list(range(10))})

        def build_model(self, cfg, data):
            return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))

        def step(self, model, batch, cfg):
            x, y = batch
            out = model(x)
            return {"loss": F.cross_entropy(out, y), "output": out}

        def metrics(self, cfg, data):
            return ClassificationMetrics([str(c) for c in data.state["classes"]])


    class ExplainedDigits(PlainDigits):
        """The same task with the two explain hooks: inputs are .npy files of 8x8 values 0-16."""

        name = "explaineddigits"

        def explain_view(self, model, cfg, state):
            return ExplainView(self.name, "image", model, model, [f"digit {c}" for c in state["classes"]],
                               state, cfg, (1, 8, 8), about="8-filter conv net")

        def explain_input(self, view, path, **options):
            try:
                a = np.load(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: not a .npy array ({exc})") from None
            if a.shape != (8, 8):
                raise ValueError(f"{path}: shape {a.shape}, expected (8, 8)")
            x = torch.tensor(a, dtype=torch.float32)[None, None] / 16.0
            return LoadedInput(path, x, np.repeat(x[0].permute(1, 2, 0).numpy(), 3, axis=2))
''')

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["setuptools>=68"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "cnnapps-digits-tasks"
    version = "0.0.1"

    [project.entry-points."cnnapps.tasks"]
    explaineddigits = "digitstasks:ExplainedDigits"
    plaindigits = "digitstasks:PlainDigits"

    [tool.setuptools]
    py-modules = ["digitstasks"]
''')


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """The two tasks installed into a folder put on sys.path (entry points are looked up on each call), and a
    checkpoint of each trained through the shared engine."""
    from cnnapps.engine.trainer import fit
    from cnnapps.tasks import get_task

    base = tmp_path_factory.mktemp("thirdparty")
    pkg = base / "pkg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "digitstasks.py").write_text(THIRD_PARTY)
    site = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(pkg)], check=True, capture_output=True)
    sys.path.insert(0, str(site))
    try:
        ckpts = {}
        for name in ("explaineddigits", "plaindigits"):
            task = get_task(name)
            cfg = task.Config()
            cfg.train.threads = 1
            fit(task, cfg, base / name, base, quiet=True)
            ckpts[name] = base / name / "checkpoints" / "best.pt"
        digit = base / "digit.npy"
        from sklearn.datasets import load_digits

        d = load_digits()
        np.save(digit, d.images[0])  # a 0, from the validation split
        (base / "broken.npy").write_bytes(b"not numpy")
        yield {"ckpts": ckpts, "digit": str(digit), "label": int(d.target[0]), "broken": str(base / "broken.npy"),
               "site": site}
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("digitstasks", None)


def test_a_third_party_task_is_explained_through_cnnapps_explain(third_party, tmp_path, capsys):
    from cnnapps.__main__ import main
    from cnnapps.understand.adapters import explainable_tasks

    assert "explaineddigits" in [t.name for t in explainable_tasks()]
    assert "plaindigits" not in [t.name for t in explainable_tasks()]
    ckpt = str(third_party["ckpts"]["explaineddigits"])
    for method in ("saliency", "integrated-gradients", "occlusion"):
        status = main(["explain", "--checkpoint", ckpt, third_party["digit"], third_party["broken"],
                       "--method", method, "--out", str(tmp_path)])
        assert status == 1  # the broken file is reported in its row; the digit was explained
        good, bad = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert bad["input"] == third_party["broken"] and bad["error"].startswith(third_party["broken"])
        assert good["label"] == f"digit {third_party['label']}" and good["target"] == good["label"]
        assert np.load(good["npy"]).shape == (8, 8) and Path(good["png"]).stat().st_size > 5000
    assert main(["explain", "--checkpoint", ckpt, third_party["digit"], "--method", "gradcam", "--stage", "0",
                 "--out", str(tmp_path)]) == 2  # its model has no zoo backbone stages: a one-line error
    assert "feature_info" in capsys.readouterr().err
    assert main(["visualize", "--checkpoint", ckpt, "--what", "filters", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["weight_shape"] == [8, 1, 3, 3]
    # no explain_examples hook: topk says so in one line
    assert main(["visualize", "--checkpoint", ckpt, "--what", "topk", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path)]) == 2
    assert "task 'explaineddigits' has no explain hook: it would need Task.explain_examples" in \
        capsys.readouterr().err


def test_a_task_without_explain_hooks_is_a_one_line_error(third_party, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnapps", "explain", "--checkpoint",
                           str(third_party["ckpts"]["plaindigits"]), third_party["digit"], "--out", str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": f"{third_party['site']}:{REPO}"},
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "task 'plaindigits' has no explain hook" in proc.stderr


# ---------------------------------------------------------------- a two-lead ECG model


def _copy_mitdb(src: Path, folder: Path, names: list[str], seconds: int = 120) -> None:
    """The first ``seconds`` of MIT-BIH records (signals as read, annotations up to there) as WFDB records."""
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        rec = wfdb.rdrecord(str(src / n), sampto=seconds * 360, physical=False)
        wfdb.wrsamp(n, fs=rec.fs, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal, fmt=rec.fmt,
                    adc_gain=rec.adc_gain, baseline=rec.baseline, write_dir=str(folder))
        ann = wfdb.rdann(str(src / n), "atr", sampto=seconds * 360)
        wfdb.wrann(n, "atr", ann.sample, ann.symbol, aux_note=ann.aux_note, write_dir=str(folder))


def test_a_two_lead_ecg_model_is_explained_on_its_own_leads(data_root, tmp_path, monkeypatch, capsys):
    from cnnapps.__main__ import main
    from cnnapps.engine.config import load_config
    from cnnapps.engine.trainer import fit
    from cnnapps.tasks import get_task
    from cnnapps.tasks.ecg.prepare import mitdb_source
    from cnnapps.understand.adapters import iter_examples, load_input, load_view

    mitdb = mitdb_source(data_root).record_dir
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "root"
    _copy_mitdb(mitdb, root / "mitdb", ["100", "101", "114"])  # MLII+V5, MLII+V1, V5+MLII
    task = get_task("ecg")
    cfg = load_config(task.Config, None, [
        "model.width=4", "model.num_blocks=8", "model.subsample_every=1", "model.increase_every=4",
        "model.kernel_size=8", "data.dataset=mitdb", "data.target=rhythm", "data.lead=MLII",
        'data.leads=["MLII", "V1"]', "data.window=2048", "data.eval_window=8192", "data.train_records=[101]",
        "data.val_records=[114]", "data.test_records=[100]", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.batch_size=4", "train.threads=1", "train.monitor=seq_f1"])
    fit(task, cfg, tmp_path / "run", root, quiet=True)
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"

    view = load_view(ckpt)
    assert view.kind == "biosignal" and view.input_shape[0] == 2 and view.channel_names == ["MLII", "V1"]
    item = load_input(view, str(root / "mitdb" / "101"), max_seconds=12)
    assert item.x.shape == (1, 2, 12 * 200 + 256 - (12 * 200) % 256) and item.valid == 12 * 200
    assert item.info["channels"] == ["MLII", "V1"] and item.display.shape == (item.x.shape[-1], 2)
    with pytest.raises(ValueError, match="lead_not_found.*2 lead"):
        load_input(view, str(root / "mitdb" / "101"), lead="MLII")
    (i, x, display), *_ = iter_examples(view, root, "val", 2)
    assert x.shape[:2] == (1, 2) and display.shape[1] == 2

    # record 100 has no V1: V5 is read in its place, as predict does
    assert main(["explain", "--checkpoint", str(ckpt), str(root / "mitdb" / "100"), "--method", "saliency",
                 "--seconds", "12", "--out", str(tmp_path / "out")]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["channels"] == ["MLII", "V5"]
    saved = np.load(row["npz"])
    assert saved["signal"].shape == (12 * 200, 2) and all(saved[t].shape == (12 * 200,) for t in row["targets"])
    assert Path(row["png"]).stat().st_size > 20000
    # the leads named on the command line must be there
    assert main(["explain", "--checkpoint", str(ckpt), str(root / "mitdb" / "100"), "--lead", "MLII,V1",
                 "--out", str(tmp_path / "out")]) == 1
    (bad,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert bad["error"].startswith(str(root / "mitdb" / "100")) and "lead_not_found" in bad["error"]


def test_explain_view_rejects_an_unknown_kind():
    from cnnapps.understand.views import ExplainView

    with pytest.raises(ValueError, match="kind 'video' is not one of"):
        ExplainView("mine", "video", torch.nn.Identity(), torch.nn.Identity(), ["a"], {}, None, (1, 4, 4))
