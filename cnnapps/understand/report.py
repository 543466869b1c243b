"""``understand-report``: results/understanding.md/.json with the position-information table beside the paper's,
the equivariance probe, receptive fields, command timings and pictures under results/understanding/."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnapps.data.root import cache_dir as default_cache_dir
from cnnapps.data.root import find_data_root
from cnnapps.engine.plots import save_figure
from cnnapps.engine.runinfo import REPO_ROOT, load_average, results_dir as default_results_dir, run_facts
from cnnapps.engine.task import Task
from cnnapps.understand import plots
from cnnapps.understand import visualize as vis
from cnnapps.understand.adapters import explainable_tasks, load_input, load_view, sample_inputs
from cnnapps.understand.posenet import (MODEL_NAMES, MODELS, TARGETS, ProbeConfig, TrainedBackbone,
                                        constant_images, extract_features, format_position_tables, load_voc_images,
                                        position_map, run_position_probe, train_backbone, train_readout)
from cnnapps.understand.views import KINDS, ExplainSamples, ExplainView

log = logging.getLogger(__name__)

RF_BACKBONES = [("lenet5", None), ("alexnet", None), ("zfnet", None), ("vgg16", None), ("resnet18", None),
                ("resnet50", None), ("googlenet", None), ("resnet18_1d", None), ("hannun34_1d", None)]
PUBLISHED_RF = {("lenet5", "c5"): "32 (LeCun et al. 1998: C5 sees all of the 32x32 input)",
                ("alexnet", "relu5"): "163", ("alexnet", "pool5"): "195 (Araujo et al., Distill 2019)",
                ("vgg16", "features.30"): "212 (Araujo et al., Distill 2019)",
                ("zfnet", "relu5"): "139 (+2x16 for a 3x3 window: 171, Ren et al. 2015)"}


# ---------------------------------------------------------------- the explained tasks and their ci checkpoints


@dataclass
class Explained:
    """One task checkpoint in the report: its view (kind, class names, backbone) and the task's sample inputs
    (None: the task has no ``explain_samples`` hook or no data here; it is then left out of pictures and
    timings)."""

    task: str
    checkpoint: Path
    view: ExplainView
    samples: ExplainSamples | None


def ci_checkpoint(task: Task, root: Path, cache: Path, quick: bool = False, smoke: Sequence[str] = ()) -> Path:
    """best.pt of the task's shipped bench config (``ci``) run, trained once into ``cache`` (``quick``: one epoch
    of five steps plus the task's ``smoke`` overrides, a smoke model for tests)."""
    from cnnapps.engine.config import load_config
    from cnnapps.engine.trainer import fit

    run = cache / f"ci-{task.name}{'-quick' if quick else ''}"
    best = run / "checkpoints" / "best.pt"
    if best.is_file():
        return best
    overrides = ["train.epochs=1", "train.max_steps_per_epoch=5", *smoke] if quick else []
    cfg = load_config(task.Config, task.bench_config, overrides, search=task.config_dir())
    log.info("training the %s ci checkpoint for the report into %s", task.name, run)
    fit(task, cfg, run, root, quiet=True)
    return best


def explained_checkpoints(root: Path, cache: Path, quick: bool = False,
                          checkpoints: Sequence[str | Path] = ()) -> list[Explained]:
    """Every installed task with explain hooks, each with a checkpoint: the one given in ``checkpoints`` for its
    task, else its ci config's run (trained once into ``cache``). Ordered by the kind of input (KINDS), then
    task name."""
    from cnnapps.tasks import get_task

    given: dict[str, Path] = {}
    for path in checkpoints:
        view = load_view(path)
        given[view.task] = Path(path)
    tasks = {t.name: t for t in explainable_tasks()}
    for name in given:
        tasks.setdefault(name, get_task(name))
    out = []
    for name, task in sorted(tasks.items()):
        samples = sample_inputs(task, root, cache / "inputs" / name)
        if name not in given and samples is None:
            log.warning("task %s has explain hooks but no sample inputs here; no ci checkpoint trained for it", name)
            continue
        ckpt = given.get(name) or ci_checkpoint(task, root, cache, quick, samples.smoke if samples else ())
        out.append(Explained(name, ckpt, load_view(ckpt), samples))
    return sorted(out, key=lambda e: (KINDS.index(e.view.kind), e.task))


def _first(explained: Sequence[Explained], kind: str) -> Explained | None:
    """The first checkpoint whose view is of ``kind`` and whose task gave sample inputs."""
    return next((e for e in explained if e.view.kind == kind and e.samples and e.samples.inputs), None)


def _caption(samples: ExplainSamples, index: int) -> str:
    return samples.captions[index] if index < len(samples.captions) else samples.about


# ---------------------------------------------------------------- pictures


def _picture_attribution_grid(e: Explained, out_png: Path, rows: int = 3) -> dict[str, Any]:
    """Grad-CAM and the four other methods side by side on a few images (rows) of an image checkpoint; whether
    guided backpropagation differs from the plain gradient on it (it does not on a network without ReLUs)."""
    import matplotlib.pyplot as plt

    from cnnapps.understand.attribution import METHODS, attribute, predicted_class
    from cnnapps.understand.cli import _as_input_map, _method_kwargs, default_cam_stage

    view, inputs = e.view, e.samples.inputs[:rows]
    fig, axes = plt.subplots(len(inputs), 1 + len(METHODS), figsize=(2.0 * (1 + len(METHODS)), 2.1 * len(inputs)),
                             squeeze=False)
    stage = None
    guided_gap = 0.0
    for r, path in enumerate(inputs):
        item = load_input(view, path)
        with torch.no_grad():
            c = int(predicted_class(view.model(item.x))[0])
        axes[r, 0].imshow(item.display)
        axes[r, 0].set_title(f"predicted {view.class_names[c]}", fontsize=8)
        maps = {}
        for k, method in enumerate(METHODS, start=1):
            kw = _method_kwargs(method, view, item.x, None, 32, None)
            stage = kw.get("stage", stage)
            raw = attribute(method, view.model, item.x, c, **kw)
            maps[method] = raw
            heat = _as_input_map(method, raw, item.x)
            signed = method == "integrated-gradients"
            axes[r, k].imshow(item.display.mean(2), cmap="gray")
            axes[r, k].imshow(plots.normalise_heat(heat, signed), cmap="RdBu_r" if signed else "jet", alpha=0.55,
                              vmin=-1 if signed else 0, vmax=1)
            if r == 0:
                axes[r, k].set_title(method + (f" (stage {stage})" if method == "gradcam" else ""), fontsize=8)
        if "saliency" in maps and "guided-backprop" in maps:
            scale = float(maps["saliency"].abs().max()) or 1.0
            guided_gap = max(guided_gap, float((maps["guided-backprop"] - maps["saliency"]).abs().max()) / scale)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, out_png)
    if stage is None:
        stage = default_cam_stage(view, load_input(view, inputs[0]).x)
    return {"png": out_png.name, "task": e.task, "backbone": view.about, "about": e.samples.about, "stage": stage,
            "stage_module": view.backbone.feature_info.module_name(stage), "guided_vs_gradient": guided_gap}


def _picture_signal(e: Explained, out_dir: Path, method: str = "integrated-gradients") -> dict[str, Any]:
    """The attribution strip of a biosignal checkpoint's first sample input (20 s), one per predicted class."""
    from cnnapps.understand.cli import explain_one

    record = e.samples.inputs[0]
    item = load_input(e.view, record, max_seconds=20.0)
    row = explain_one(e.view, item, method, out_dir)
    target = out_dir / f"{e.task}_attribution.png"
    Path(row["png"]).replace(target)
    for key in ("npz", "npy"):
        if key in row:
            Path(row[key]).unlink(missing_ok=True)
    return {"png": target.name, "task": e.task, "record": Path(record).name, "about": _caption(e.samples, 0),
            "method": method, "label": row["label"], "classes": row.get("targets", [row.get("target")]),
            "channels": row.get("channels", [])}


def _picture_filters(trained: dict[str, TrainedBackbone], explained: Sequence[Explained],
                     out_dir: Path) -> list[dict]:
    """First-layer filters of the trained probe backbones and of the image and biosignal checkpoints."""
    made = []
    for model in ("resnet18", "vgg16"):
        if model in trained:
            name, conv = vis.first_conv(trained[model].backbone)
            png = vis.plot_filters(conv.weight, out_dir / f"filters_{model}.png",
                                   f"{MODEL_NAMES[model]} (CIFAR-10 subset), first layer {tuple(conv.weight.shape)}")
            made.append({"png": png.name, "model": MODEL_NAMES[model], "layer": name})
    for e in explained:
        if e.view.kind in ("image", "biosignal"):
            name, conv = vis.first_conv(e.view.backbone)
            png = vis.plot_filters(conv.weight, out_dir / f"filters_{e.task}.png",
                                   f"{e.task} ci checkpoint, first layer {name} {tuple(conv.weight.shape)}",
                                   fs=e.view.fs if conv.weight.dim() == 3 else None)
            made.append({"png": png.name, "model": f"{e.task} ci checkpoint", "layer": name})
    return made


def _picture_position_maps(trained: dict[str, TrainedBackbone], cfg: ProbeConfig, root: Path,
                           out_png: Path) -> dict[str, Any]:
    """The five targets, and the H map each backbone's read-out predicts for a natural, a black and a white
    image."""
    import matplotlib.pyplot as plt

    train = load_voc_images(root, "trainval", cfg.image_size, min(cfg.voc_train, 400))
    natural = load_voc_images(root, "test", cfg.image_size, 1)
    images = {"natural": natural, "black": constant_images(0.0, cfg.image_size),
              "white": constant_images(1.0, cfg.image_size)}
    models = ["posenet", *[m for m in ("vgg16", "resnet18", "vgg16_nopad") if m in trained]]
    fig, axes = plt.subplots(1 + len(models), 5, figsize=(10, 2.1 * (1 + len(models))), squeeze=False)
    for k, t in enumerate(TARGETS):
        axes[0, k].imshow(position_map(t, cfg.map_size), cmap="viridis", vmin=0, vmax=1)
        axes[0, k].set_title(f"target {t}", fontsize=8)
    gt = position_map("H", cfg.map_size)
    for r, model in enumerate(models, start=1):
        tb = trained.get(model)
        feats, _ = extract_features(tb, train, cfg.map_size)
        net = train_readout(feats, gt, 3, cfg)
        axes[r, 0].imshow(natural[0].permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(MODEL_NAMES[model], fontsize=8)
        with torch.no_grad():
            for k, (name, img) in enumerate(images.items(), start=1):
                pred = net(extract_features(tb, img, cfg.map_size)[0])[0]
                axes[r, k].imshow(pred.numpy(), cmap="viridis", vmin=0, vmax=1)
                axes[r, k].set_title(f"H read from {name}", fontsize=8)
        axes[r, 4].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, out_png)
    return {"png": out_png.name, "read_out_images": len(train)}


# ---------------------------------------------------------------- probes other than position


def _equivariance(trained: dict[str, TrainedBackbone], cfg: ProbeConfig, root: Path,
                  signal: Explained | None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The translation probe on the trained probe backbones (VOC-mini test images) and on the backbone of a
    biosignal checkpoint (its first sample input, 20.48 s); returns the probes and what the 1D one ran on."""
    from cnnapps.understand.equivariance import translation_probe

    imgs = load_voc_images(root, "test", cfg.image_size, 16)
    shifts = [s for s in (1, 2, 4, 8, 16, 32) if s < cfg.image_size]
    probes = []
    for model, tb in trained.items():
        x = (imgs - tb.mean.view(1, -1, 1, 1)) / tb.std.view(1, -1, 1, 1)
        paddings = ["circular"] if model == "vgg16_nopad" else ["zeros", "circular"]
        for padding in paddings:
            label = MODEL_NAMES[model] + (" (trained circular)" if model == "vgg16_nopad" else "")
            probes.append(translation_probe(tb.backbone, x, shifts, padding, label))
    used = None
    if signal is not None:
        record = signal.samples.inputs[0]
        x = load_input(signal.view, record, max_seconds=20.48).x  # 4096 samples at 200 Hz
        shifts_1d = [s for s in (1, 4, 16, 64, 256) if s <= x.shape[-1] // 4]
        for padding in ("zeros", "circular"):
            probes.append(translation_probe(signal.view.backbone, x, shifts_1d, padding,
                                            f"{signal.task} ci checkpoint (1D)"))
        used = {"task": signal.task, "record": Path(record).name, "about": _caption(signal.samples, 0),
                "seconds": round(x.shape[-1] / (signal.view.fs or 1.0), 2)}
    return probes, used


def _receptive_fields() -> list[dict[str, Any]]:
    from cnnapps.backbones import backbone_info
    from cnnapps.understand.receptive import stage_receptive_fields_by_name

    rows = []
    for name, shape in RF_BACKBONES:
        shape = shape or backbone_info(name).default_input
        for s in stage_receptive_fields_by_name(name, shape):
            whole = any(a.whole for a in s.axes)
            rows.append({"backbone": name, "input": "x".join(map(str, shape)), "stage": s.index, "module": s.module,
                         "rf": None if whole else s.size[0], "stride": None if whole else s.stride[0],
                         "published": PUBLISHED_RF.get((name, s.module), "")})
    return rows


def _timings(explained: Sequence[Explained], out: Path, root: Path) -> list[dict[str, Any]]:
    """Wall-clock seconds of every explain method and visualize mode on each checkpoint with sample inputs, each
    a fresh ``python -m cnnapps`` process (start-up and imports included), as a user runs them."""
    from cnnapps.understand.attribution import METHODS
    from cnnapps.understand.cli import VISUALS

    env = dict(os.environ, CNNAPPS_DATA=str(root))
    rows = []
    for e in explained:
        if not (e.samples and e.samples.inputs):
            continue
        task, ckpt = e.task, e.checkpoint
        jobs = [["explain", "--checkpoint", str(ckpt), e.samples.inputs[0], "--method", m, "--out",
                 str(out / task)] for m in METHODS]
        jobs += [["visualize", "--checkpoint", str(ckpt), "--what", w, "--out", str(out / task)] for w in VISUALS]
        for argv in jobs:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "cnnapps", *argv], cwd=REPO_ROOT, env=env,
                                  capture_output=True, text=True, timeout=900)
            seconds = time.perf_counter() - t0
            what = argv[argv.index("--method") + 1] if "--method" in argv else argv[argv.index("--what") + 1]
            rows.append({"task": task, "command": argv[0], "what": what, "seconds": round(seconds, 1),
                         "ok": proc.returncode == 0, "load": load_average()})
            if proc.returncode:
                log.warning("%s %s failed: %s", argv[0], what, proc.stderr[-400:])
    return rows


# ---------------------------------------------------------------- the report


def write_report(results_dir: str | Path | None = None, data_dir: str | Path | None = None, quick: bool = False,
                 cache_dir: str | Path | None = None, checkpoints: Sequence[str | Path] = (),
                 timings: bool | None = None) -> Path:
    """Run the probes and draw the pictures; write ``understanding.md`` and ``.json`` into ``results_dir``
    (default: the checkout's results/) and the PNGs into its ``understanding/`` folder. Returns the .md path.

    Every installed task with explain hooks takes part (``explained_checkpoints``): ``checkpoints`` replace the
    ci runs of their tasks. The first image checkpoint gives the attribution grid, the first biosignal one the
    strip and the 1D equivariance probe. Trained probe backbones and the tasks' ci checkpoints are kept in
    ``cache_dir`` (default: the cnnapps cache), so a second run only repeats the read-outs. ``quick``: tiny
    probe, untrained backbones, smoke checkpoints and no timings (for tests; its numbers are not results)."""
    t0 = time.perf_counter()
    root = find_data_root(data_dir)
    results = default_results_dir(results_dir)
    pics = results / "understanding"
    pics.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir("understand")
    cache.mkdir(parents=True, exist_ok=True)
    facts = run_facts("cpu")
    cfg = ProbeConfig.quick() if quick else ProbeConfig()
    timings = (not quick) if timings is None else timings

    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = round(time.perf_counter() - mark, 1)
        log.info("understand-report: %s took %.0f s", name, phases[name])
        mark = time.perf_counter()

    position = run_position_probe(cfg, root, cache, models=MODELS, ablations=not quick)
    trained = {m: train_backbone(m, cfg, root, cache) for m in MODELS if m != "posenet"}
    phase("position probe")
    explained = explained_checkpoints(root, cache, quick, checkpoints)
    phase("checkpoints")
    image, signal = _first(explained, "image"), _first(explained, "biosignal")
    probes, probe_1d = _equivariance(trained, cfg, root, signal)
    phase("equivariance")
    pictures: dict[str, Any] = {
        "attribution": _picture_attribution_grid(image, pics / "gradcam_and_attributions.png") if image else None,
        "signal": _picture_signal(signal, pics) if signal else None,
        "filters": _picture_filters(trained, explained, pics),
        "position_maps": _picture_position_maps(trained, cfg, root, pics / "position_maps.png"),
    }
    phase("pictures")
    rf = _receptive_fields()
    phase("receptive fields")
    timing_rows = _timings(explained, cache / "timings", root) if timings else []
    phase("timings")
    record = {"title": "Understanding CNNs (issue #8)", **facts, "load_at_end": load_average(), "quick": quick,
              "seconds": round(time.perf_counter() - t0, 1), "phase_seconds": phases, "position": position.to_dict(),
              "equivariance": [p.to_dict() for p in probes], "equivariance_1d": probe_1d,
              "receptive_fields": rf, "pictures": pictures,
              "checkpoints": {e.task: str(e.checkpoint) for e in explained},
              "kinds": {e.task: e.view.kind for e in explained},
              "inputs": {e.task: list(e.samples.inputs) if e.samples else [] for e in explained},
              "timings": timing_rows}
    md = results / "understanding.md"
    md.write_text(render_markdown(record, position, probes))
    md.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return md


def _probe_1d_source(used: dict[str, Any] | None) -> str:
    if not used:
        return ""
    return (f" and {used['seconds']:.1f} s of record {used['record']} ({used['about']}) for the 1D net of the "
            f"{used['task']} ci checkpoint")


def render_markdown(record: dict[str, Any], position: Any, probes: list[Any]) -> str:
    """The Markdown report of a ``write_report`` record."""
    from cnnapps.understand.equivariance import format_probe

    cfg = record["position"]["config"]
    lines = [f"# {record['title']}", "",
             f"Written by `python -m cnnapps understand-report{' --quick' if record['quick'] else ''}` on "
             f"{record['machine']}, commit {record['commit']}, {record['time_utc']} (torch {record['torch']}); "
             f"load {record['load_at_start']} at start, {record['load_at_end']} at the end: the cores were shared, "
             f"so timings are upper bounds. Whole run: {record['seconds']:.0f} s ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in record.get("phase_seconds", {}).items()) + ").", ""]
    if record["quick"]:
        lines += ["**Quick mode: untrained backbones and smoke checkpoints. These numbers test the machinery; they "
                  "are not results.**", ""]
    lines += ["## Position information (Islam, Jia & Bruce, ICLR 2020)", "",
              "How much absolute position can a single linear read-out (PosENet) recover from a frozen network's "
              "features? Each stage map is resized bilinearly to "
              f"{cfg['map_size']}x{cfg['map_size']} and concatenated; one conv layer is trained (Adam, MSE, "
              f"{cfg['readout_epochs']} epochs on {cfg['voc_train']} VOC-mini trainval images at "
              f"{cfg['image_size']}x{cfg['image_size']}) to output a position map, and tested on "
              f"{cfg['voc_test']} VOC-mini test images, an all-black and an all-white image. SPC: Spearman "
              "correlation between the predicted and the target map (scipy `spearmanr`, mean over images; a "
              "constant prediction counts 0), MAE: mean absolute error.", "",
              "How the backbones were trained (from scratch here; no ImageNet weights exist on this machine):", "",
              "| backbone | trained on | epochs | test accuracy | parameters | seconds |", "|---|---|---|---|---|---|"]
    for model, info in record["position"]["backbones"].items():
        acc = info.get("test_accuracy")
        lines.append(f"| {MODEL_NAMES[model]} | {info.get('trained_on', '')} | {info.get('epochs', '-')} | "
                     f"{'-' if acc is None else f'{acc:.3f}'} | {info.get('params', '-')} | "
                     f"{info.get('seconds', 'cached' if info.get('cached') else '-')} |")
    sched = next((i.get("schedule") for i in record["position"]["backbones"].values() if i.get("schedule")), "")
    lines += ["", f"Widths: VGG-16 (configuration D) and a ResNet-18 layout with every width divided by "
              f"{cfg['width_div']}; schedule: {sched}. \"Without zero padding\" = the same VGG-16 trained and run "
              "with circular padding (see `cnnapps.understand.equivariance.CircularPadding`): maps keep their size "
              "but nothing marks an edge.", "", format_position_tables(position), "",
              "Differences from the paper, all forced by a 2-core CPU or chosen for a cleaner measurement:", "",
              "- backbones: thin VGG-16 and ResNet-18 trained a few epochs on 32x32 CIFAR-10 images, not "
              "ImageNet-trained VGG-16 and ResNet-152; probe images 64x64 and maps 16x16, not 224x224 and 28x28, so "
              "a deep unit's receptive field covers the whole image and its borders;",
              "- the read-out pads by replicating its edge values, so it cannot find the border by itself; a "
              "plain zero-padded read-out is shown in its own column (on the raw image it finds the border "
              "columns, which is not position information of a network);",
              "- the read-out's input is whitened per position (a fixed channel mix, folded into the same single "
              "linear conv layer) so Adam converges in a few epochs;",
              "- \"without zero padding\" is circular padding rather than removing padding (valid convolutions "
              "shrink a 64x64 input to nothing inside VGG-16); on natural images a circular network can still see "
              "the seam where the left edge meets the right one, on constant images there is none;",
              "- train/test sets are VOC-mini trainval/test, not DUT-S/PASCAL-S; HS/VS stripes are our definition "
              "(four repeats of the V/H gradient).", "",
              "![position maps](understanding/position_maps.png)", "",
              "## Equivariance probe", "",
              "Each input is shifted circularly along its width (time for 1D) by s samples; for every stage whose "
              "stride r divides s, the table gives |F(shift x) - shift(F x, s/r)| / |F x| (0: exactly "
              "equivariant; `-`: s is not a multiple of the stage's stride, so no integer shift of the map "
              "corresponds), then the relative change of the globally pooled last stage (invariance). Same "
              "weights with zero padding and with circular padding; 16 VOC-mini test images (64x64)"
              + _probe_1d_source(record.get("equivariance_1d")) + ".", "", format_probe(probes), "",
              "Zero padding alone breaks equivariance at every stage, more in deeper stages whose fields reach the "
              "border; circular padding makes every stage exactly equivariant to shifts by multiples of its "
              "stride. The pooled output is exactly invariant only to shifts by the total stride; smaller shifts "
              "change it, because subsampling aliases (Azulay & Weiss 2019; Zhang 2019).", "",
              "## Receptive fields", "",
              "Analytic receptive field and effective stride of every stage, traced through the torch functions "
              "each network calls (residual sums and concatenations included); the tests check them against the "
              "gradient support of one unit for eight families and against published values. "
              "`python -m cnnapps summary NAME` prints them per layer with activation memory.", "",
              "| backbone | input | stage | module | RF | stride | published |", "|---|---|---|---|---|---|---|"]
    for r in record["receptive_fields"]:
        lines.append(f"| {r['backbone']} | {r['input']} | {r['stage']} | {r['module']} | "
                     f"{'all' if r['rf'] is None else r['rf']} | {'-' if r['stride'] is None else r['stride']} | "
                     f"{r['published']} |")
    p = record["pictures"]
    lines += ["", "## Pictures", ""]
    grid = p.get("attribution")
    if grid:
        same = grid["guided_vs_gradient"] < 1e-6
        lines += [f"Grad-CAM (stage {grid['stage']}, `{grid['stage_module']}`) and the other attribution methods on "
                  f"{grid['about']}, {grid['task']} ci checkpoint (`{grid['backbone']}`):", "",
                  f"![attributions](understanding/{grid['png']})", "",
                  (f"Guided backpropagation equals the plain gradient here (largest difference "
                   f"{grid['guided_vs_gradient']:.1e} of the gradient's peak): `{grid['backbone']}` calls no ReLU, "
                   "and guided backpropagation changes only the backward pass of ReLUs; it differs on ReLU "
                   "networks." if same else
                   f"Guided backpropagation differs from the plain gradient here (by up to "
                   f"{grid['guided_vs_gradient']:.2f} of the gradient's peak): `{grid['backbone']}` uses ReLUs, "
                   "whose backward pass it clamps to positive signals."), ""]
    sig = p.get("signal")
    if sig:
        leads = f", leads {', '.join(sig['channels'])}" if sig.get("channels") else ""
        lines += [f"Record {sig['record']} ({sig['about']}{leads}): {sig['method']} for each class the "
                  f"{sig['task']} ci checkpoint predicts somewhere ({', '.join(map(str, sig['classes']))}); "
                  f"record-level prediction {sig['label']}:", "",
                  f"![{sig['task']} attribution](understanding/{sig['png']})", ""]
    lines += ["Trained first-layer filters:", ""]
    for f in p["filters"]:
        lines += [f"{f['model']} (`{f['layer']}`):", "", f"![filters](understanding/{f['png']})", ""]
    if record["timings"]:
        lines += ["## Command timings on the tasks' ci checkpoints", "",
                  "Each a fresh `python -m cnnapps ...` process with default options (start-up included); the "
                  "issue asks for under 2 minutes on a 2-core CPU. Load average at the end of each command "
                  "shown.", "", "| task | command | mode | seconds | ok | load |", "|---|---|---|---|---|---|"]
        for t in record["timings"]:
            lines.append(f"| {t['task']} | {t['command']} | {t['what']} | {t['seconds']} | "
                         f"{'yes' if t['ok'] else 'NO'} | {t['load']} |")
        lines.append("")
    lines += ["Checkpoints: " + ", ".join(f"{k} `{Path(v).parent.parent.name}`" for k, v in
                                          record["checkpoints"].items())
              + " (run folders; `ci-TASK` is the task's `ci` config, trained for this report).",
              ""]
    return "\n".join(lines)
