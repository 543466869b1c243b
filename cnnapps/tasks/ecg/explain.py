"""The ECG task's explain hooks (``cnnapps explain``, ``visualize``, ``understand-report``): a checkpoint's model as
a biosignal view with per-step outputs, records read with the leads the model was trained on and prepared as in
``predict``."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnapps.tasks.ecg.prepare import PrepParams, RecordSkip, read_for_model
from cnnapps.understand.views import ExplainSamples, ExplainView, LoadedInput, pad_to_steps, split_dataset


class ECGExplain:
    """Mixed into the ECG task: the explain hooks of ``cnnapps.engine.task.Task``. The task supplies
    ``explain_prep(state)``: the checkpoint's preprocessing and the leads its model reads."""

    name: str

    def explain_prep(self, state: dict) -> tuple[PrepParams, list[str]]:
        raise NotImplementedError

    def explain_view(self, model: nn.Module, cfg: Any, state: dict) -> ExplainView:
        params, leads = self.explain_prep(state)
        chans = max(1, int(state.get("in_chans") or 1))
        window = int(state.get("window") or 2048)
        return ExplainView(self.name, "biosignal", model, model.backbone, list(state["classes"]), state, cfg,
                           (chans, window), fs=float(state["fs"]), output_step=int(state["step"]),
                           channel_names=list(leads), about=str(getattr(cfg.model, "backbone", "")),
                           extra={"params": params, "leads": list(leads)})

    def explain_input(self, view: ExplainView, path: str, *, start_s: float = 0.0, max_seconds: float = 30.0,
                      lead: str | None = None, **_: Any) -> LoadedInput:
        """A WFDB record (path with or without .hea/.dat/.mat) read with the model's leads (a record lacking one
        reads another ECG signal in its place, with a warning, as ``predict`` does; ``lead``: the leads to read
        instead, comma-separated, which must be there), prepared with the checkpoint's parameters and cut to
        ``max_seconds`` from ``start_s`` (0: the whole record; attribution over a half-hour record takes minutes).
        ``x``: (1, leads, T) padded to whole steps; ``display``: (T,) for one lead, (T, leads) for several."""
        params: PrepParams = view.extra["params"]
        try:
            _, _, fs_in, choice, x = read_for_model(path, list(view.extra["leads"]), view.input_shape[0], lead,
                                                   params)  # (time, leads)
        except RecordSkip as exc:
            raise ValueError(f"{path}: {exc.reason}: {exc}") from None
        except ValueError as exc:  # a --lead list that repeats a lead
            raise ValueError(f"{path}: bad_lead: {exc}") from None
        fs = int(view.fs or params.fs)
        a = int(round(start_s * fs))
        b = len(x) if max_seconds <= 0 else min(len(x), a + int(round(max_seconds * fs)))
        if a >= b:
            raise ValueError(f"{path}: --start {start_s} s is past the record's end ({len(x) / fs:.1f} s)")
        piece = x[a:b]
        padded = pad_to_steps(piece.T, int(view.output_step or params.step))  # (leads, T')
        return LoadedInput(path, torch.from_numpy(padded)[None], _display(padded), float(fs), valid=len(piece),
                           info={"channels": list(choice.names), "start_s": start_s, "fs_in": fs_in,
                                 **({"substituted": dict(choice.substituted)} if choice.substituted else {})})

    def explain_examples(self, view: ExplainView, data: Any, split: str, max_examples: int) -> Iterator[LoadedInput]:
        """Windows of ``split`` as the evaluation reads them (every lead of the model), unpadded to whole steps."""
        dataset = split_dataset(view, data, split)
        step = int(view.output_step or 256)
        for i in range(min(len(dataset), max_examples)):
            item = dataset[i]
            n = int(item["length"])
            padded = pad_to_steps(item["x"][:, :n].numpy(), step)
            yield LoadedInput(f"{split}[{i}]", torch.from_numpy(padded)[None], _display(padded), view.fs, valid=n,
                              info={"record": int(item["record"])})

    def explain_samples(self, data_root: Path, out_dir: Path) -> ExplainSamples:
        """The first CinC 2017 record labelled A (atrial fibrillation) and MIT-BIH record 100."""
        from cnnapps.tasks.ecg.prepare import cinc2017_source, mitdb_source

        cinc = cinc2017_source(data_root)
        if cinc.reference is None:
            raise FileNotFoundError(f"{cinc.record_dir}: no REFERENCE.csv labels")
        labels = dict(line.split(",") for line in cinc.reference.read_text().split())
        af = next(name for name, label in labels.items() if label == "A")
        return ExplainSamples([str(cinc.record_dir / af), str(mitdb_source(data_root).record_dir / "100")],
                              "CinC 2017 and MIT-BIH records", ["CinC 2017, label A", "MIT-BIH"],
                              smoke=["data.max_records=200"])


def _display(padded: np.ndarray) -> np.ndarray:
    """(leads, T) -> (T,) for one lead, (T, leads) for several: indexed by time like the model input."""
    return padded[0] if padded.shape[0] == 1 else np.ascontiguousarray(padded.T)
