"""ECG benchmark pieces: training windows per second from the prepared memmap versus from WFDB files, and the
headline facts of a finished run (network, labels, split, record-level rule, confusion matrix) for results/ecg.md."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import wfdb
from scipy.signal import resample_poly

from cnnapps.tasks.ecg.metrics import metric_key
from cnnapps.tasks.ecg.prepare import STEP, PreparedCache, normalise


def _window_plan(cache: PreparedCache, window: int, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` random (record, start) pairs at the cache's rate, the same for both readers."""
    rng = np.random.default_rng(seed)
    records = rng.integers(0, len(cache), size=n)
    return [(int(r), int(rng.integers(0, max(1, cache.records[r].length - window + 1)))) for r in records]


def windows_per_second_cache(cache: PreparedCache, window: int = 6144, n: int = 2000, seed: int = 0) -> float:
    """Random ``window``-sample crops read from the memmap as the training dataset does (copy to a float32
    array): windows per second. The plan is read once untimed first, as every epoch after the first reads pages
    the operating system already holds; the WFDB reader gets the same warm-up, so neither side is timed on disk
    reads."""
    plan = _window_plan(cache, window, n, seed)

    def read_all() -> None:
        for r, s in plan:
            np.array(cache.signal(r)[s:s + window], dtype=np.float32)

    read_all()
    t0 = time.perf_counter()
    read_all()
    return n / (time.perf_counter() - t0)


def windows_per_second_wfdb(cache: PreparedCache, window: int = 6144, n: int = 200, seed: int = 0) -> float:
    """The same crops without a cache: ``wfdb.rdrecord(sampfrom, sampto)`` of the raw record at its own rate,
    then the resampling and normalisation preparation does (normalised by the window's own statistics, since
    the whole record is not read): windows per second."""
    plan = _window_plan(cache, window, n, seed)
    record_dir = Path(cache.index["record_dir"])
    fs = cache.fs
    for r, _ in plan:  # warm-up (see windows_per_second_cache): the files into the operating system's cache
        for part in record_dir.glob(f"{cache.records[r].name}.*"):
            part.read_bytes()
    t0 = time.perf_counter()
    for r, s in plan:
        info = cache.records[r]
        scale = info.orig_fs / fs
        start = int(s * scale)
        stop = min(info.orig_length, start + math.ceil(window * scale))
        rec = wfdb.rdrecord(str(record_dir / info.name), sampfrom=start, sampto=stop,
                            channel_names=[info.lead] if info.lead else None)
        x = rec.p_signal[:, 0]
        if info.orig_fs != fs:
            from fractions import Fraction

            ratio = Fraction(fs / info.orig_fs).limit_denominator(1000)
            x = resample_poly(x, ratio.numerator, ratio.denominator)
        normalise(x, cache.index["params"]["normalize"], cache.index["params"]["min_std"]).astype(np.float32)
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- the results section of a finished run

# Hannun et al. (2019): 16 residual blocks of two convolutions after a stem convolution, 32 -> 256 filters.
PAPER_NETWORK = "16 blocks, 33 convolutions, 32 -> 256 filters, 10.5 M parameters"
PICTURE_KEYS = ("default",)  # runs whose pictures are copied into results/ (the main job)


def describe_network(model: torch.nn.Module) -> dict[str, Any]:
    """What a built ECG model is: backbone class, its residual blocks and 1D convolutions (the stem's included,
    the per-step head's not), filters of its first and last convolution, kernel sizes, total and head parameter
    counts."""
    body = getattr(model, "backbone", model)
    convs = [m for m in body.modules() if isinstance(m, torch.nn.Conv1d)]
    blocks = [m for m in body.modules() if type(m).__name__.endswith("Block")]
    head = getattr(model, "head", None)
    return {"backbone": type(body).__name__, "blocks": len(blocks),
            "convs": len(convs), "first_filters": convs[0].out_channels if convs else 0,
            "last_filters": convs[-1].out_channels if convs else 0,
            "kernel_sizes": sorted({int(c.kernel_size[0]) for c in convs}),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "head_parameters": int(sum(p.numel() for p in head.parameters())) if head is not None else 0}


def _short_path(path: str | None) -> str:
    """A data file as ``<data set folder>/<file>``: results name files relative to the data root, not a machine."""
    return "/".join(Path(path).parts[-2:]) if path else "none"


def headline(task: Any, cfg: Any, run_dir: Path, results_dir: Path, key: str) -> dict[str, Any]:
    """``{"notes": [...], "tables": [...], "pictures": {...}}`` for ``bench_report`` from a finished run folder
    (its data_summary.json and metrics.json, written by the engine and ``ECGTask.report``); {} when the run
    wrote no summary (no test split, or a run from before these facts were kept)."""
    from cnnapps.engine.task import DataSplits

    summary_file = run_dir / "data_summary.json"
    if not summary_file.is_file():
        return {}
    summary = json.loads(summary_file.read_text())
    if "classes" not in summary:  # a run folder from before the summary held the headline facts
        return {}
    test = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    classes = list(summary["classes"])
    d = cfg.data
    leads = (summary.get("leads_read") or {}).get("leads") or ["?"]
    state = {"classes": classes, "in_chans": len(leads), "step": STEP}
    net = describe_network(task.build_model(cfg, DataSplits(None, None, None, state=state)))
    m = cfg.model
    notes = [f"**Network trained**: `{m.backbone}` as configured: {net['blocks']} residual blocks, {net['convs']} "
             f"convolutions (kernel {', '.join(map(str, net['kernel_sizes']))}), {net['first_filters']} -> "
             f"{net['last_filters']} filters, {net['parameters'] / 1e6:.2f} M parameters ({net['parameters']:,} "
             f"with the {len(classes)}-class per-step head). The network of Hannun et al. (2019) is "
             f"{PAPER_NETWORK} (the `hannun` config). Leads read: {', '.join(leads)}."]
    records = summary.get("records", {})
    sizes = " / ".join(f"{records.get(k, 0):,} {k}" for k in ("train", "val", "test"))
    if d.dataset == "cinc2017":
        counts = summary.get("label_counts") or {}
        notes.append(f"**Labels**: `{_short_path(summary.get('label_file'))}` of the public CinC 2017 training "
                     f"set ({sum(counts.values()):,} records: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
                     + ").")
        dupes = summary.get("duplicates_removed") or []
        dropped = sum(len(g) - 1 for g in dupes)
        notes.append(f"**Split**: a stratified random {d.fractions[0]:.0%} / {d.fractions[1]:.0%} / "
                     f"{d.fractions[2]:.0%} of the public training set by record (split seed {d.split_seed}"
                     + (f", a stratified subset of {d.max_records:,} records" if d.max_records else "")
                     + f"): {sizes} records. The test split is not the hidden challenge test set, so these "
                     "numbers do not compare with the challenge leaderboard. Exact duplicate records (identical "
                     f"samples) left out before splitting: {dropped}"
                     + (" (" + "; ".join(f"{', '.join(g[1:])} = {g[0]}" for g in dupes) + ")" if dupes else "")
                     + ".")
        notes.append("**Record-level rule**: a record's label is the class of largest softmax probability "
                     "averaged over its steps whose centre sample is real signal (`challenge_f1`, the mean F1 "
                     "of N, A and O); `challenge_f1_majority` takes the majority vote of step labels instead.")
        if "challenge_f1_ci_low" in test:
            notes.append(f"**Challenge F1 {test.get('challenge_f1', 0):.3f}**, 95% bootstrap interval "
                         f"{test['challenge_f1_ci_low']:.3f} - {test['challenge_f1_ci_high']:.3f} (1,000 "
                         "resamples of the test records).")
    else:
        notes.append(f"**Split**: inter-patient (de Chazal et al. 2004): training {', '.join(d.train_records)}; "
                     f"validation {', '.join(d.val_records)} (DS1 patients held out); test DS2 "
                     f"({len(d.test_records)} records): {sizes} records read.")
        steps = summary.get("step_counts", {})
        if "train" in steps and "val" in steps:
            absent = [c for c, tr, va in zip(classes, steps["train"], steps["val"]) if tr and not va]
            notes.append("**Classes in training absent from validation**: "
                         + (", ".join(absent) + " (no held-out DS1 record holds them without taking every such "
                            "record out of training)" if absent else "none") + ".")
        if d.target == "rhythm":
            notes.append("`seq_f1` weights each class's step F1 by its share of the test steps (Hannun et al.), "
                         "so sinus rhythm dominates it; `seq_f1_macro` is the plain mean over the classes present "
                         "in the test truth.")
    conf = summary.get("confusion") or {}
    tables = []
    if conf.get("matrix"):
        tables.append({"title": f"Test confusion matrix ({conf['of']}; rows: truth, columns: predicted)",
                       "columns": ["truth \\ predicted", *classes],
                       "rows": [[c, *map(int, row)] for c, row in zip(classes, conf["matrix"])]})
    if d.dataset == "cinc2017":
        rows = []
        for i, c in enumerate(classes):
            k = metric_key(c)
            rows.append([c, int(sum(conf["matrix"][i])) if conf.get("matrix") else None, test.get(f"f1_{k}"),
                         test.get(f"auroc_{k}"), test.get(f"auprc_{k}")])
        tables.append({"title": "Per class on the test records (AUROC, AUPRC: one class against the rest, "
                                "scikit-learn, from the mean probability)",
                       "columns": ["class", "records", "F1", "AUROC", "AUPRC"], "rows": rows})
    elif summary.get("step_counts"):
        steps = summary["step_counts"]
        tables.append({"title": "Labelled 256-sample steps per class and split, and test step F1",
                       "columns": ["class", *[k for k in ("train", "val", "test") if k in steps], "test F1"],
                       "rows": [[c, *[int(steps[k][i]) for k in ("train", "val", "test") if k in steps],
                                 test.get(f"seq_f1_{metric_key(c)}")] for i, c in enumerate(classes)]})
    pictures = {}
    if key in PICTURE_KEYS:
        for name, caption in (("ecg_strip.png", "a test record on ECG paper (25 mm/s, 10 mm/mV), the predicted "
                               "rhythm as the top band and tint, the truth as the bottom band"),
                              ("confusion.png", "test confusion matrix")):
            if (run_dir / name).is_file():
                target = f"ecg_{key}_{name.removeprefix('ecg_')}"
                shutil.copyfile(run_dir / name, Path(results_dir) / target)
                pictures[caption] = target
    return {"notes": notes, "tables": tables, "pictures": pictures, "network": net}
