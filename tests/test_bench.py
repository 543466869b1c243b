"""bench: results files with one section per config, the summary table, and floors that fail."""
from __future__ import annotations

import json

from cnnapps.bench.results import check_floors, write_summary
from cnnapps.bench.run import run_task_bench
from cnnapps.tasks.classify.task import ClassifyTask
from conftest import REPO


def test_bench_writes_a_section_per_config_and_keeps_others(tmp_path, data_root):
    sets = ["data.train_subset=320", "data.test_subset=128", "train.epochs=1", "train.max_steps_per_epoch=2"]
    md = run_task_bench(ClassifyTask(), "ci", data_root, overrides=sets,
                        results_dir=tmp_path, quiet=True)
    run_task_bench(ClassifyTask(), "mnist_lenet5", data_root, overrides=sets,
                   results_dir=tmp_path, quiet=True)
    doc = json.loads(md.with_suffix(".json").read_text())
    assert set(doc["runs"]) == {"ci", "mnist_lenet5"}
    run = doc["runs"]["ci"]
    for key in ("machine", "commit", "time_utc", "train_seconds", "train_samples_per_s"):
        assert run[key], key
    assert run["test"]["examples"] == 128 and 0 <= run["test"]["accuracy"] <= 1
    text = md.read_text()
    assert "## `ci`" in text and "## `mnist_lenet5`" in text

    summary = write_summary([run], tmp_path).read_text()
    assert f"| classify | mnist | accuracy | {run['test']['accuracy']:.4f} |" in summary


def test_floors_fail_on_a_drop(tmp_path):
    floors = tmp_path / "floors.toml"
    floors.write_text("[classify]\naccuracy = 0.97\n")
    ok = {"task": "classify", "test": {"accuracy": 0.98}}
    low = {"task": "classify", "test": {"accuracy": 0.90}}
    missing = {"task": "classify", "test": {}}
    assert check_floors([ok], floors) == []
    assert "below its floor 0.97" in check_floors([low], floors)[0]
    assert check_floors([missing], floors)
    assert check_floors([{"task": "other", "test": {}}], floors) == []


def test_a_finished_train_run_is_recorded_with_its_differences(tmp_path, data_root):
    from cnnapps.bench.run import record_finished_run
    from cnnapps.engine.config import load_config
    from cnnapps.engine.trainer import fit
    from cnnapps.tasks.classify.task import ClassifyConfig

    ci = "ci"
    cfg = load_config(ClassifyConfig, ci, search=ClassifyTask.config_dir(), overrides=["data.train_subset=320", "data.test_subset=128", "train.epochs=1"])
    result = fit(ClassifyTask(), cfg, tmp_path / "run", data_root, quiet=True)
    md = record_finished_run(ClassifyTask(), tmp_path / "run", str(ci), tmp_path, "classify")
    run = json.loads(md.with_suffix(".json").read_text())["runs"]["ci"]
    assert run["test"]["accuracy"] == result.test_metrics["accuracy"]
    assert run["train_seconds"] == round(result.train_seconds, 2)
    assert run["commit"] and run["machine"].startswith("cpu")  # from the run's own run.json
    assert "data.train_subset=320" in run["overrides"] and "train.epochs=1" in run["overrides"]
    # the engine wrote the end of the run into run.json: the record has its wall time and load
    assert isinstance(run["wall_seconds"], float) and run["wall_seconds"] >= run["train_seconds"]
    assert "on" in run["load_at_end"] and run["resumed"] is False


def test_every_floor_is_enforced_in_ci():
    """A floor nobody checks is decoration: each task in results/floors.toml is benchmarked by .ci/run or has a test
    that fits its ci config and calls meets_floor (and each of those names a floor)."""
    import re
    import tomllib

    floors = tomllib.loads((REPO / "results" / "floors.toml").read_text())
    ci = (REPO / ".ci" / "run").read_text()
    benched = set(re.search(r'^BENCHED_IN_CI="([^"]*)"', ci, re.M).group(1).split())
    tested = {m for p in (REPO / "tests").glob("test_*.py")
              for m in re.findall(r'meets_floor\("(\w+)"', p.read_text())}
    assert benched and tested
    missing = set(floors) - benched - tested
    assert not missing, f"floors that CI never checks: {sorted(missing)}"
    assert tested <= set(floors), f"tests call meets_floor for tasks without a floor: {sorted(tested - set(floors))}"
    assert benched <= set(floors)


def test_gpu_check_dry_run_without_cuda():
    import os
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "no CUDA device here: a dry run only" in out and "Traceback" not in proc.stderr
    for task in ("classify", "ecg", "audio", "detect", "multilabel", "segment"):
        assert f"ok: {task} ci on CUDA" in out
    assert "ok: ecg hannun (train.epochs=1)" in out and "torchrun" in out


def test_engine_bench_times_the_three_loops_on_the_same_steps(tmp_path, data_root):
    from cnnapps.bench.engine import cases, lightning_version, run_engine_bench

    assert [(c.task, c.config) for c in cases()] == [("classify", "ci"), ("ecg", "default")]
    md = run_engine_bench(data_root, tmp_path, quick=True)
    record = json.loads((tmp_path / "speed.json").read_text())["sections"]["engine"]
    row = record["cases"][0]
    assert row["timed_steps"] == 5 and row["ours_steps_per_s"] > 0 and row["bare_steps_per_s"] > 0
    assert row["ours_vs_bare"] == round(row["ours_steps_per_s"] / row["bare_steps_per_s"], 3) or \
        abs(row["ours_vs_bare"] - row["ours_steps_per_s"] / row["bare_steps_per_s"]) < 0.01
    assert ("lightning_steps_per_s" in row) == bool(lightning_version())
    assert "our Trainer against a bare loop and Lightning" in md.read_text()
