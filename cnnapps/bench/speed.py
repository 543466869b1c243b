"""Speed measured side by side in one process: our backbones against torchvision's, the ECG network, the data
pipelines, and a convolution's achieved GFLOP/s against this machine's matmul. Writes results/speed.md/.json."""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnapps.engine.runinfo import results_dir as _results_dir
from cnnapps.engine.runinfo import run_facts

log = logging.getLogger(__name__)


def _time_it(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _make_step(model: nn.Module, shape: tuple[int, ...], batch: int, train: bool, bf16: bool,
               channels_last: bool, device: torch.device) -> Callable[[], None]:
    """A closure running one forward (eval) or forward+backward+SGD step (train) of ``model`` on random input."""
    x = torch.randn(batch, *shape, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.to(device).train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def step() -> None:
        if train:
            with _autocast(device, bf16):
                out = model(x)
            out.float().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), _autocast(device, bf16):
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def model_throughput(model: nn.Module, shape: tuple[int, ...], batch: int, train: bool, bf16: bool,
                     channels_last: bool, device: torch.device, repeats: int) -> float:
    """Examples per second of one forward (eval) or forward+backward+SGD step (train)."""
    return batch / _time_it(_make_step(model, shape, batch, train, bf16, channels_last, device), repeats)


def _time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each step, timed in turns (a, b, a, b, ...) so that a slow spell of a shared
    machine hits both sides alike instead of biasing the ratio."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_with_torchvision(names: list[str], size: int, batch: int, device: torch.device, repeats: int,
                             variants: list[str]) -> list[dict]:
    """Rows of (model, mode, variant, ours/s, torchvision/s, ratio); both models built with the same seed and
    timed in alternation in this process. A variant that cannot run here (``torch.compile`` without a working
    compiler) gives a row with its error instead of numbers."""
    import torchvision

    from cnnapps.backbones import create_backbone

    rows = []
    for name in names:
        for mode in ("eval", "train"):
            for variant in variants:
                bf16, cl, comp = "bf16" in variant, "channels_last" in variant, "compile" in variant
                row: dict[str, Any] = {"model": name, "mode": mode, "variant": variant,
                                       "input": f"{batch}x3x{size}x{size}"}
                steps = {}
                for impl in ("ours", "torchvision"):
                    torch.manual_seed(0)
                    model = create_backbone(name, num_classes=1000) if impl == "ours" else \
                        getattr(torchvision.models, name)(num_classes=1000)
                    if comp:
                        model = torch.compile(model)
                    steps[impl] = _make_step(model, (3, size, size), batch, mode == "train", bf16, cl, device)
                t0 = time.perf_counter()
                try:
                    secs = _time_interleaved(steps, repeats)
                except Exception as exc:  # noqa: BLE001 - e.g. inductor without a C++ compiler: report, go on
                    row.update({"ours_per_s": None, "torchvision_per_s": None, "ratio": None,
                                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    log.warning("%s %s %s failed: %s", name, mode, variant, row["error"])
                    rows.append(row)
                    continue
                ours, tv = batch / secs["ours"], batch / secs["torchvision"]
                row.update({"ours_per_s": round(ours, 2), "torchvision_per_s": round(tv, 2),
                            "ratio": round(ours / tv, 3), "seconds": round(time.perf_counter() - t0, 1)})
                rows.append(row)
                log.info("%s %s %s: ratio %.3f", name, mode, variant, row["ratio"])
    return rows


def hannun_throughput(device: torch.device, repeats: int, window: int = 8192, batch: int = 16) -> list[dict]:
    """Training and inference windows/s of the full hannun34_1d (width 32, 16 blocks) on 1-lead windows."""
    from cnnapps.backbones import create_backbone

    rows = []
    for mode in ("eval", "train"):
        model = create_backbone("hannun34_1d", num_classes=4, in_chans=1)
        rows.append({"model": "hannun34_1d", "mode": mode, "input": f"{batch}x1x{window}",
                     "windows_per_s": round(model_throughput(model, (1, window), batch, mode == "train", False, False,
                                                             device, repeats), 2)})
    return rows


def conv_vs_matmul(device: torch.device, repeats: int, hw: int = 56, n: int = 2048) -> dict:
    """Achieved GFLOP/s of a 3x3 convolution (64->64 channels, hw x hw, batch 8) and of an n x n matmul."""
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device)
    x = torch.randn(8, 64, hw, hw, device=device)
    with torch.inference_mode():
        t_conv = _time_it(lambda: conv(x), repeats)
    conv_flops = 2 * 8 * 64 * 64 * 9 * hw * hw
    a = torch.randn(n, n, device=device)
    t_mm = _time_it(lambda: a @ a, repeats)
    mm_flops = 2 * n ** 3
    return {"conv3x3_gflops": round(conv_flops / t_conv / 1e9, 2), "matmul_gflops": round(mm_flops / t_mm / 1e9, 2),
            "conv_fraction_of_matmul": round((conv_flops / t_conv) / (mm_flops / t_mm), 3)}


def pipeline_numbers(data_root: Path | None) -> dict:
    """Every installed task's own speed numbers (data pipelines, front ends; ``Task.speed_measurements``),
    prefixed with the task's name. A task whose numbers need data it cannot find gives none."""
    from cnnapps.tasks import get_task, list_tasks

    out: dict[str, Any] = {}
    for name in list_tasks():
        for key, value in get_task(name).speed_measurements(data_root).items():
            out[f"{name}_{key}"] = value
    return out


def run_speed(device: str = "cpu", data_root: Path | None = None, results_dir: Path | None = None,
              quick: bool = False) -> Path:
    """Measure our backbones against torchvision's, hannun34_1d, conv vs matmul and the tasks' pipelines; write
    them as the ``backbones`` section of results/speed.md and .json; returns the Markdown path."""
    dev = torch.device(device)
    on_cpu = dev.type == "cpu"
    size = 112 if on_cpu else 224
    batch = 8 if on_cpu else 64
    repeats = 3 if quick else (7 if on_cpu else 20)
    variants = ["fp32", "bf16", "fp32+channels_last"] if quick else \
        ["fp32", "bf16", "fp32+channels_last", "bf16+channels_last+compile"]
    names = ["resnet18"] if quick else ["resnet18", "resnet50", "vgg16"]
    started = time.perf_counter()
    record = {**run_facts(dev), "input_size": size, "batch": batch, "repeats": repeats,
              "backbones": compare_with_torchvision(names, size, batch, dev, repeats, variants),
              "hannun34_1d": hannun_throughput(dev, repeats, window=4096 if quick else 8192),
              "conv_vs_matmul": conv_vs_matmul(dev, repeats), "pipelines": pipeline_numbers(data_root)}
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return write_section("backbones", record, results_dir)


# ---------------------------------------------------------------- results/speed.md: one section per benchmark


SECTIONS = ("backbones", "engine", "deployment")  # the order speed.md shows them in


def write_section(name: str, record: dict, results_dir: Path | str | None = None,
                  markdown: list[str] | None = None) -> Path:
    """Put ``record`` as section ``name`` of results/speed.json, with its Markdown (``markdown`` lines; the
    backbones section renders its own), keep the other sections, and re-render results/speed.md from all of
    them; returns the Markdown path. Each section is written by its own command (``bench --speed``,
    ``bench --engine``, ``bench --deploy``)."""
    folder = _results_dir(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "speed.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if "sections" not in doc:  # the file from before sections: it was the backbones report alone
        doc = {"sections": {"backbones": doc}, "markdown": {"backbones": format_backbones(doc)}} if doc else \
            {"sections": {}, "markdown": {}}
    doc.setdefault("markdown", {})
    doc["sections"][name] = record
    doc["markdown"][name] = markdown if markdown is not None else format_backbones(record)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    md = folder / "speed.md"
    md.write_text(format_speed(doc))
    return md


def format_speed(doc: dict) -> str:
    """results/speed.md from the sections of speed.json (known ones first, in SECTIONS order)."""
    texts = doc.get("markdown", {})
    lines = ["# Speed, measured side by side", "",
             "Written by `python -m cnnapps bench --speed | --engine | --deploy` - do not edit by hand. Each section "
             "is one benchmark run with its own machine, commit and time.", ""]
    order = [n for n in SECTIONS if n in texts] + [n for n in texts if n not in SECTIONS]
    for name in order:
        lines += list(texts[name]) + [""]
    return "\n".join(lines).rstrip() + "\n"


def facts_line(r: dict) -> str:
    """Machine, load, commit, time, torch and wall time of a speed record, as one line."""
    return (f"machine: {r.get('machine')} (load {r.get('load_at_start')}); commit: {r.get('commit')}; "
            f"time: {r.get('time_utc')}; torch {r.get('torch')}; whole run {r.get('wall_seconds', '?')} s")


def format_backbones(r: dict) -> list[str]:
    lines = ["## Backbones against torchvision", "",
             f"Each number is the median of {r['repeats']} timed calls after 2 warm-up calls; ours and "
             "torchvision's are built with the same seed and timed in alternation (ours, theirs, ours, ...) in one "
             "process. A ratio above 1.0 means ours is faster.", "", facts_line(r), "",
             "| model | mode | variant | input | ours (images/s) | torchvision (images/s) | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {b['model']} | {b['mode']} | {b['variant']} | {b['input']} | {b['ours_per_s']} | "
              f"{b['torchvision_per_s']} | {b['ratio']} |" if b.get("ratio") is not None else
              f"| {b['model']} | {b['mode']} | {b['variant']} | {b['input']} | failed: {b.get('error')} | | |"
              for b in r["backbones"]]
    lines += ["", "### hannun34_1d (full width, 16 blocks)", "", "| mode | input | windows/s |", "| --- | --- | --- |"]
    lines += [f"| {h['mode']} | {h['input']} | {h['windows_per_s']} |" for h in r["hannun34_1d"]]
    lines += ["", "### Convolution against matmul", "", "| measurement | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in r["conv_vs_matmul"].items()]
    lines += ["", "### Data pipelines (each task's own numbers)", "", "| measurement | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in r["pipelines"].items()]
    return lines
