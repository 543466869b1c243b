"""Checkpoints: atomic writes, safe loading, clear errors for corrupt, foreign or mismatched files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnapps.engine import checkpoint as ck
from cnnapps.engine.checkpoint import (CheckpointError, load_checkpoint, load_matching_weights, load_model_state,
                                       save_checkpoint)


def test_round_trip_keeps_tensors_and_numpy_state(tmp_path):
    model = nn.Linear(3, 2)
    path = save_checkpoint({"task": "t", "model": model.state_dict(), "data_state": {"mean": np.arange(3.0)},
                            "rng": np.random.get_state()}, tmp_path / "a.pt")
    got = load_checkpoint(path, task="t")
    assert torch.equal(got["model"]["weight"], model.weight.detach())
    assert got["data_state"]["mean"].tolist() == [0.0, 1.0, 2.0]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint({"task": "t", "epoch": 1}, tmp_path / "last.pt")

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"task": "t", "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_corrupt_truncated_and_foreign_files_are_clear_errors(tmp_path):
    good = save_checkpoint({"task": "t", "model": nn.Linear(50, 50).state_dict()}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a cnnapps checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="written by task 't', not 'ecg'"):
        load_checkpoint(good, task="ecg")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "task": "t", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_mismatched_model_names_missing_and_shapes(tmp_path):
    state = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict()
    other = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as info:
        load_model_state(other, state, "x.pt")
    msg = str(info.value)
    assert "x.pt" in msg and "missing" in msg and "3.weight" in msg and "shape mismatch" in msg


def test_transfer_loads_matching_tensors_only(tmp_path):
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 10))
    path = save_checkpoint({"task": "t", "model": src.state_dict()}, tmp_path / "src.pt")
    dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 7))
    loaded, skipped = load_matching_weights(dst, path)
    assert loaded == ["0.weight", "0.bias"] and set(skipped) == {"1.weight", "1.bias"}
    assert torch.equal(dst[0].weight, src[0].weight)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_matching_weights(nn.Linear(9, 9), path)
