"""torch.distributed: two gloo processes on the CPU reach the weights of one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.sampling import EpochShardSampler
from conftest import REPO

# LeNet-5 has no batch norm, so per-rank batches see the same arithmetic as one global batch.
ARGS = ["--set", "data.train_subset=960", "--set", "data.val_fraction=0.2", "--set", "data.test_subset=200",
        "--set", "train.batch_size=64", "--set", "train.epochs=2", "--set", "train.threads=1",
        "--set", "train.lr=0.05", "--set", "train.warmup_epochs=0", "--quiet"]


def _train(out, data_root, nproc: int, extra=()) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "cnnapps.tasks.classify"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cnnapps.tasks.classify"]
    subprocess.run(cmd + ["train", "--data-dir", str(data_root), "--out", str(out), *ARGS, *extra], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=600)


def test_sampler_shards_partition_each_global_batch():
    one = list(EpochShardSampler(100, 20, seed=3, drop_last=True))
    parts = [list(EpochShardSampler(100, 20, seed=3, rank=r, world=2, drop_last=True)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(one)
    for b in range(5):  # every global batch is split between the ranks, none mixed across batches
        assert sorted(parts[0][b * 10:(b + 1) * 10] + parts[1][b * 10:(b + 1) * 10]) == sorted(one[b * 20:(b + 1) * 20])


def test_two_processes_match_one(tmp_path, data_root):
    # 768 training examples = 12 full global batches of 64, so no rank ever sees a ragged last batch.
    _train(tmp_path / "one", data_root, 1)
    _train(tmp_path / "two", data_root, 2)
    a = load_checkpoint(tmp_path / "one/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "two/checkpoints/last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    # rank 0 alone wrote the run folder, and evaluation saw each test example exactly once
    lines = (tmp_path / "two/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads((tmp_path / "two/metrics.json").read_text())["examples"] == 200


def test_resume_with_another_world_size(tmp_path, data_root):
    _train(tmp_path / "run", data_root, 2, ["--set", "train.epochs=1"])
    # the same run continued by one process for a second epoch
    _train(tmp_path / "run", data_root, 1, ["--resume", "--set", "train.epochs=2"])
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
