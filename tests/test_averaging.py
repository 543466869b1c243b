"""Averaging weights and predictions: EMA beside the raw weights, ensembles, uniform and greedy soups."""
from __future__ import annotations

import json

import pytest
import torch

from cnnapps.bench.soup import average_state_dicts, soup_report, write_soup_report
from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import evaluate_checkpoints, fit
from cnnapps.tasks.classify.task import ClassifyConfig, ClassifyTask

SMALL = ["data.train_subset=640", "data.test_subset=256", "data.val_fraction=0.2", "train.batch_size=64",
         "train.epochs=1", "train.lr=0.05", "train.threads=2", "train.warmup_epochs=0"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data_root):
    """One shared start, then three fine-tunes with different seeds and learning rates."""
    root = tmp_path_factory.mktemp("soup")
    base = fit(ClassifyTask(), load_config(ClassifyConfig, None, SMALL), root / "base", data_root, quiet=True)
    paths = []
    for i, lr in enumerate([0.02, 0.03, 0.05]):
        cfg = load_config(ClassifyConfig, None, SMALL + [
            f"train.seed={i + 1}", f"train.lr={lr}", "train.reset_head=false",
            f"train.init_checkpoint={base.run_dir / 'checkpoints' / 'best.pt'}"])
        paths.append(fit(ClassifyTask(), cfg, root / f"ft{i}", data_root, quiet=True).run_dir / "checkpoints/best.pt")
    return paths


def test_average_of_state_dicts():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    avg = average_state_dicts([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 5
    with pytest.raises(ValueError, match="different parameter names"):
        average_state_dicts([a, {"v": torch.zeros(2)}])


def test_ema_is_evaluated_beside_raw_weights(tmp_path, data_root):
    cfg = load_config(ClassifyConfig, None, SMALL + ["train.ema_decay=0.9", "train.epochs=2"])
    fit(ClassifyTask(), cfg, tmp_path / "ema", data_root, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "ema/metrics.jsonl").read_text().splitlines()]
    assert all("val_ema_accuracy" in r and "val_accuracy" in r for r in rows)
    state = load_checkpoint(tmp_path / "ema/checkpoints/last.pt")
    ema = {k.removeprefix("module."): v for k, v in state["callbacks"]["EMA"]["model"].items() if k.startswith("module.")}
    raw = state["model"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # averaged weights differ from the last step's


def test_ensemble_of_one_checkpoint_twice_equals_it(finetuned, data_root):
    single = evaluate_checkpoints(ClassifyTask(), finetuned[:1], data_root, quiet=True).values
    twice = evaluate_checkpoints(ClassifyTask(), finetuned[:1] * 2, data_root, quiet=True).values
    assert twice["accuracy"] == single["accuracy"] and twice["loss"] == pytest.approx(single["loss"], abs=1e-6)
    three = evaluate_checkpoints(ClassifyTask(), finetuned, data_root, quiet=True).values
    assert 0.0 < three["accuracy"] <= 1.0


def test_soup_report_ranks_on_validation(finetuned, data_root, tmp_path):
    record = soup_report(ClassifyTask(), finetuned, data_root, greedy=True)
    names = [r["candidate"] for r in record["rows"]]
    assert sum(n.startswith("single") for n in names) == 3
    assert any(n.startswith("ensemble") for n in names) and any(n.startswith("uniform soup") for n in names)
    greedy = record["rows"][-1]
    best_single_val = max(r["val"] for r in record["rows"] if r["candidate"].startswith("single"))
    assert greedy["candidate"].startswith("greedy soup") and greedy["val"] >= best_single_val
    assert set(record["differences"]) >= {"train.seed", "train.lr"} and record["differences"]["train.lr"] == [
        0.02, 0.03, 0.05]
    assert not any(k.startswith("data.") for k in record["differences"])  # one split for every ingredient
    path = write_soup_report(record, tmp_path, "soup")
    text = path.read_text()
    assert "| uniform soup of 3 |" in text and "`train.lr`" in text and "| 2 | " in text
    # a soup of one checkpoint repeated is that checkpoint
    same = soup_report(ClassifyTask(), finetuned[:1] * 2, data_root, greedy=False)
    assert same["rows"][0]["test"] == same["rows"][-1]["test"]
