"""Deployment speed on the CPU: the eager model against ``torch.compile`` and ONNX Runtime (the model exported by
``cnnapps.export``), latency at batch 1 and throughput at batch 32, for ResNet-18, LeNet-5 and the ECG task's
default model. The three runtimes are timed in turns in one process (eager, compiled, ORT, eager, ...) so a
slow spell of a shared machine hits all alike. ``python -m cnnapps bench --deploy`` writes it as the
``deployment`` section of results/speed.md / .json (``bench.speed.write_section``: the other sections stay)."""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnxruntime")


def deployment_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(label, model in eval mode, one input's shape): ResNet-18 (ImageNet size, 1000 classes), LeNet-5 (32x32
    digits), then each registered task's own model where its ``Task.deployment_example`` gives one."""
    from cnnapps.backbones import create_backbone
    from cnnapps.tasks import get_task, list_tasks

    torch.manual_seed(0)
    models = [("resnet18", create_backbone("resnet18").eval(), (3, 224, 224)),
              ("lenet5", create_backbone("lenet5").eval(), (1, 32, 32))]
    for name in list_tasks():
        example = get_task(name).deployment_example()
        if example is not None:
            models.append(example)
    return models


def _runners(model: nn.Module, shape: tuple[int, ...], workdir: Path, threads: int) -> dict[str, Any]:
    """{runtime: callable(x) or the error that kept it from running here}."""
    from cnnapps.export import OnnxModule, export_program, save_program

    out: dict[str, Any] = {"eager": model}
    try:
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(torch.randn(2, *shape))  # compile now, not inside the timed calls
        out["compile"] = compiled
    except Exception as exc:  # noqa: BLE001 - inductor without a C++ compiler etc.: report, go on
        out["compile"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        program, _ = export_program(model, torch.randn(2, *shape))
        path = save_program(program, "onnx", workdir / f"{abs(hash(id(model)))}.onnx")
        out["onnxruntime"] = OnnxModule(path, threads=threads)
    except Exception as exc:  # noqa: BLE001
        out["onnxruntime"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return out


def _time_turns(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3,
                min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns; each turn repeats a call until it has run
    ``min_seconds`` (so a 0.1 ms call is not a timer artefact) and counts the mean of that turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds:
                    break
            times[k].append(elapsed / n)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_deployment(repeats: int = 15, threads: int | None = None, batches: tuple[int, int] = (1, 32)) -> dict:
    """Rows ``{model, runtime, batch, input, ms_per_batch, examples_per_s}`` (or ``error``) for every model,
    runtime and batch size, plus the threads used. Outputs of the three runtimes are compared once per model
    (largest difference from eager) so a fast wrong runtime cannot pass unnoticed."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, shape in deployment_models():
            runners = _runners(model, shape, Path(tmp), threads)
            probe = torch.randn(2, *shape)
            with torch.inference_mode():
                ref = model(probe)
                for name, fn in runners.items():
                    if name != "eager" and callable(fn):
                        agreement.append({"model": label, "runtime": name,
                                          "max_abs_diff_vs_eager": float((fn(probe) - ref).abs().max())})
            for batch in batches:
                x = torch.randn(batch, *shape)
                ok = {k: v for k, v in runners.items() if callable(v)}

                def call(fn: Callable, x: torch.Tensor = x) -> Callable[[], Any]:
                    def run() -> Any:
                        with torch.inference_mode():
                            return fn(x)
                    return run

                secs = _time_turns({k: call(v) for k, v in ok.items()}, repeats,
                                   min_seconds=0.05 if batch == 1 else 0.0)
                for name in RUNTIMES:
                    row = {"model": label, "runtime": name, "batch": batch, "input": "x".join(map(str, (batch,
                                                                                                       *shape)))}
                    if name in secs:
                        row.update({"ms_per_batch": round(secs[name] * 1e3, 3),
                                    "examples_per_s": round(batch / secs[name], 1),
                                    "vs_eager": round(secs["eager"] / secs[name], 2)})
                    else:
                        row["error"] = runners[name]
                    rows.append(row)
                    log.info("%s", row)
    return {"threads": threads, "repeats": repeats, "batches": list(batches), "rows": rows, "agreement": agreement}


def format_deployment(d: dict) -> list[str]:
    """The Markdown lines of the deployment section of results/speed.md."""
    f = d.get("facts", {})
    small, big = d.get("batches", [1, 32])
    lines = ["## Deployment: eager, torch.compile and ONNX Runtime on the CPU", "",
             f"Written by `python -m cnnapps bench --deploy`. Batch {small} is latency (ms per call), batch {big} "
             f"throughput (examples/s); median of {d['repeats']} turns after 3 warm-up calls, the three runtimes "
             f"timed in alternation in one process with {d['threads']} thread(s) each; a batch-1 turn repeats calls "
             "for at "
             "least 50 ms and counts their mean. `vs eager` above 1.0 means faster than eager. ONNX models come "
             "from `cnnapps.export` (dynamo exporter, onnxscript optimiser), run by ONNX Runtime's CPU provider.",
             "",
             f"machine: {f.get('machine')} (load {f.get('load_at_start')}); commit: {f.get('commit')}; "
             f"time: {f.get('time_utc')}; torch {f.get('torch')}; onnxruntime {d.get('onnxruntime')}; "
             f"whole run {d.get('wall_seconds', '?')} s", "",
             "| model | batch | input | runtime | ms per batch | examples/s | vs eager |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['input']} | {r['runtime']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['input']} | {r['runtime']} | {r['ms_per_batch']} | "
                         f"{r['examples_per_s']} | {r['vs_eager']} |")
    lines += ["", "Largest |output - eager| on one random batch of 2: " + "; ".join(
        f"{a['model']} {a['runtime']} {a['max_abs_diff_vs_eager']:.2g}" for a in d["agreement"]), ""]
    return lines


def run_deploy(results_dir: Path | None = None, repeats: int = 15, quick: bool = False) -> Path:
    """Measure and write the ``deployment`` section of results/speed.md / .json (the other sections stay);
    returns the Markdown path."""
    import onnxruntime

    from cnnapps.bench.speed import write_section
    from cnnapps.engine.runinfo import run_facts

    started = time.perf_counter()
    facts = run_facts(torch.device("cpu"))  # the commit and time the run started from
    record = measure_deployment(repeats=3 if quick else repeats)
    record.update({"facts": facts, "onnxruntime": onnxruntime.__version__,
                   "wall_seconds": round(time.perf_counter() - started, 1)})
    return write_section("deployment", record, results_dir, markdown=format_deployment(record))
