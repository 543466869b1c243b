"""``understand-report``: results/understanding.md/.json with the position-information table beside the paper's,
the equivariance probe, receptive fields, command timings and pictures under results/understanding/."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnapps.data.root import cache_dir as default_cache_dir
from cnnapps.data.root import find_data_root
from cnnapps.engine.plots import save_figure
from cnnapps.engine.runinfo import REPO_ROOT, load_average, results_dir as default_results_dir, run_facts
from cnnapps.understand import plots
from cnnapps.understand import visualize as vis
from cnnapps.understand.posenet import (MODEL_NAMES, MODELS, TARGETS, ProbeConfig, TrainedBackbone,
                                        constant_images, extract_features, format_position_tables, load_voc_images,
                                        position_map, run_position_probe, train_backbone, train_readout)

log = logging.getLogger(__name__)

RF_BACKBONES = [("lenet5", None), ("alexnet", None), ("zfnet", None), ("vgg16", None), ("resnet18", None),
                ("resnet50", None), ("googlenet", None), ("resnet18_1d", None), ("hannun34_1d", None)]
PUBLISHED_RF = {("lenet5", "c5"): "32 (LeCun et al. 1998: C5 sees all of the 32x32 input)",
                ("alexnet", "relu5"): "163", ("alexnet", "pool5"): "195 (Araujo et al., Distill 2019)",
                ("vgg16", "features.30"): "212 (Araujo et al., Distill 2019)",
                ("zfnet", "relu5"): "139 (+2x16 for a 3x3 window: 171, Ren et al. 2015)"}


# ---------------------------------------------------------------- checkpoints of the tasks' ci configs


def ci_checkpoint(task_name: str, root: Path, cache: Path, quick: bool = False) -> Path:
    """best.pt of the task's shipped ``ci`` config run, trained once into ``cache`` (``quick``: one epoch of
    five steps, a smoke model for tests)."""
    from cnnapps.engine.config import load_config
    from cnnapps.engine.trainer import fit
    from cnnapps.tasks import get_task

    run = cache / f"ci-{task_name}{'-quick' if quick else ''}"
    best = run / "checkpoints" / "best.pt"
    if best.is_file():
        return best
    task = get_task(task_name)
    overrides = ["train.epochs=1", "train.max_steps_per_epoch=5"] if quick else []
    if quick and task_name == "ecg":
        overrides.append("data.max_records=200")
    if quick and task_name == "audio":
        overrides.append("data.max_per_class=4")
    cfg = load_config(task.Config, task.bench_config, overrides, search=task.config_dir())
    log.info("training the %s ci checkpoint for the report into %s", task_name, run)
    fit(task, cfg, run, root, quiet=True)
    return best


def _example_inputs(root: Path, out: Path) -> dict[str, list[str]]:
    """Input files for each task's pictures and timings: MNIST test digits written as PNG, a CinC record with
    atrial fibrillation and MIT-BIH record 100, FSDD recordings."""
    from PIL import Image

    from cnnapps.tasks.ecg.prepare import cinc2017_source, mitdb_source

    out.mkdir(parents=True, exist_ok=True)
    with np.load(root / "mnist" / "mnist.npz") as z:
        digits = []
        for i in (0, 1, 2, 3):
            path = out / f"mnist_test_{i}_label{int(z['y_test'][i])}.png"
            Image.fromarray(z["x_test"][i]).save(path)
            digits.append(str(path))
    cinc = cinc2017_source(root)
    labels = dict(line.split(",") for line in cinc.reference.read_text().split())
    af = next(name for name, label in labels.items() if label == "A")
    ecg = [str(cinc.record_dir / af), str(mitdb_source(root).record_dir / "100")]
    audio = [str(root / "fsdd" / "recordings" / f) for f in ("3_theo_0.wav", "7_jackson_1.wav")]
    return {"classify": digits, "ecg": ecg, "audio": audio}


# ---------------------------------------------------------------- pictures


def _picture_attribution_grid(ckpt: Path, inputs: list[str], out_png: Path) -> dict[str, Any]:
    """Grad-CAM and the four other methods side by side on a few images (rows) from a classify checkpoint."""
    import matplotlib.pyplot as plt

    from cnnapps.understand.adapters import load_input, load_view
    from cnnapps.understand.attribution import METHODS, attribute, predicted_class
    from cnnapps.understand.cli import _as_input_map, _method_kwargs, default_cam_stage

    view = load_view(ckpt)
    fig, axes = plt.subplots(len(inputs), 1 + len(METHODS), figsize=(2.0 * (1 + len(METHODS)), 2.1 * len(inputs)),
                             squeeze=False)
    stage = None
    for r, path in enumerate(inputs):
        item = load_input(view, path)
        with torch.no_grad():
            c = int(predicted_class(view.model(item.x))[0])
        axes[r, 0].imshow(item.display)
        axes[r, 0].set_title(f"predicted {view.class_names[c]}", fontsize=8)
        for k, method in enumerate(METHODS, start=1):
            kw = _method_kwargs(method, view, item.x, None, 32, None)
            stage = kw.get("stage", stage)
            heat = _as_input_map(method, attribute(method, view.model, item.x, c, **kw), item.x)
            signed = method == "integrated-gradients"
            axes[r, k].imshow(item.display.mean(2), cmap="gray")
            axes[r, k].imshow(plots.normalise_heat(heat, signed), cmap="RdBu_r" if signed else "jet", alpha=0.55,
                              vmin=-1 if signed else 0, vmax=1)
            if r == 0:
                axes[r, k].set_title(method + (f" (stage {stage})" if method == "gradcam" else ""), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, out_png)
    if stage is None:
        stage = default_cam_stage(view, load_input(view, inputs[0]).x)
    return {"png": out_png.name, "stage": stage, "stage_module": view.backbone.feature_info.module_name(stage)}


def _picture_ecg(ckpt: Path, record: str, out_dir: Path, method: str = "integrated-gradients") -> dict[str, Any]:
    from cnnapps.understand.adapters import load_input, load_view
    from cnnapps.understand.cli import explain_one

    view = load_view(ckpt)
    item = load_input(view, record, max_seconds=20.0)
    row = explain_one(view, item, method, out_dir)
    target = out_dir / "ecg_attribution.png"
    Path(row["png"]).replace(target)
    Path(row["npz"]).unlink(missing_ok=True)
    return {"png": target.name, "record": Path(record).name, "method": method, "label": row["label"],
            "rhythms": row["targets"]}


def _picture_filters(trained: dict[str, TrainedBackbone], ckpts: dict[str, Path], out_dir: Path) -> list[dict]:
    from cnnapps.understand.adapters import load_view

    made = []
    for model in ("resnet18", "vgg16"):
        if model in trained:
            name, conv = vis.first_conv(trained[model].backbone)
            png = vis.plot_filters(conv.weight, out_dir / f"filters_{model}.png",
                                   f"{MODEL_NAMES[model]} (CIFAR-10 subset), first layer {tuple(conv.weight.shape)}")
            made.append({"png": png.name, "model": MODEL_NAMES[model], "layer": name})
    for task in ("classify", "ecg"):
        if task in ckpts:
            view = load_view(ckpts[task])
            name, conv = vis.first_conv(view.backbone)
            png = vis.plot_filters(conv.weight, out_dir / f"filters_{task}.png",
                                   f"{task} ci checkpoint, first layer {name} {tuple(conv.weight.shape)}",
                                   fs=view.fs if conv.weight.dim() == 3 else None)
            made.append({"png": png.name, "model": f"{task} ci checkpoint", "layer": name})
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
                  ecg_ckpt: Path | None, ecg_record: str | None) -> list[dict[str, Any]]:
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
    if ecg_ckpt is not None and ecg_record is not None:
        from cnnapps.understand.adapters import load_input, load_view

        view = load_view(ecg_ckpt)
        x = load_input(view, ecg_record, max_seconds=20.48).x  # 4096 samples at 200 Hz
        shifts_1d = [s for s in (1, 4, 16, 64, 256) if s <= x.shape[-1] // 4]
        for padding in ("zeros", "circular"):
            probes.append(translation_probe(view.backbone, x, shifts_1d, padding, "ECG ci checkpoint (1D)"))
    return probes


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


def _timings(ckpts: dict[str, Path], inputs: dict[str, list[str]], out: Path, root: Path) -> list[dict[str, Any]]:
    """Wall-clock seconds of every explain method and visualize mode on each ci checkpoint, each a fresh
    ``python -m cnnapps`` process (start-up and imports included), as a user runs them."""
    from cnnapps.understand.attribution import METHODS
    from cnnapps.understand.cli import VISUALS

    env = dict(os.environ, CNNAPPS_DATA=str(root))
    rows = []
    for task, ckpt in ckpts.items():
        jobs = [["explain", "--checkpoint", str(ckpt), *inputs[task][:1], "--method", m, "--out",
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
                 cache_dir: str | Path | None = None, classify_checkpoint: str | Path | None = None,
                 ecg_checkpoint: str | Path | None = None, audio_checkpoint: str | Path | None = None,
                 timings: bool | None = None) -> Path:
    """Run the probes and draw the pictures; write ``understanding.md`` and ``.json`` into ``results_dir``
    (default: the checkout's results/) and the PNGs into its ``understanding/`` folder. Returns the .md path.

    Trained probe backbones and the tasks' ci checkpoints are kept in ``cache_dir`` (default: the cnnapps cache),
    so a second run only repeats the read-outs. ``quick``: tiny probe, untrained backbones, smoke checkpoints
    and no timings (for tests; its numbers are not results)."""
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
    ckpts: dict[str, Path] = {}
    for task, given in (("classify", classify_checkpoint), ("ecg", ecg_checkpoint), ("audio", audio_checkpoint)):
        ckpts[task] = Path(given) if given else ci_checkpoint(task, root, cache, quick)
    inputs = _example_inputs(root, cache / "inputs")
    phase("checkpoints")
    probes = _equivariance(trained, cfg, root, ckpts.get("ecg"), inputs["ecg"][0])
    phase("equivariance")
    pictures: dict[str, Any] = {
        "attribution": _picture_attribution_grid(ckpts["classify"], inputs["classify"][:3],
                                                 pics / "gradcam_and_attributions.png"),
        "ecg": _picture_ecg(ckpts["ecg"], inputs["ecg"][0], pics),
        "filters": _picture_filters(trained, ckpts, pics),
        "position_maps": _picture_position_maps(trained, cfg, root, pics / "position_maps.png"),
    }
    phase("pictures")
    rf = _receptive_fields()
    phase("receptive fields")
    timing_rows = _timings(ckpts, inputs, cache / "timings", root) if timings else []
    phase("timings")
    record = {"title": "Understanding CNNs (issue #8)", **facts, "load_at_end": load_average(), "quick": quick,
              "seconds": round(time.perf_counter() - t0, 1), "phase_seconds": phases, "position": position.to_dict(),
              "equivariance": [p.to_dict() for p in probes], "receptive_fields": rf, "pictures": pictures,
              "checkpoints": {k: str(v) for k, v in ckpts.items()}, "inputs": inputs, "timings": timing_rows}
    md = results / "understanding.md"
    md.write_text(render_markdown(record, position, probes))
    md.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return md


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
              "weights with zero padding and with circular padding; 16 VOC-mini test images (64x64) and 20 s of a "
              "CinC record for the 1D net.", "", format_probe(probes), "",
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
    lines += ["", "## Pictures", "",
              f"Grad-CAM (stage {p['attribution']['stage']}, `{p['attribution']['stage_module']}`) and the other "
              "attribution methods on MNIST test digits, classify ci checkpoint (LeNet-5):", "",
              f"![attributions](understanding/{p['attribution']['png']})", "",
              "LeNet-5 squashes with tanh, not ReLU, so guided backpropagation equals the plain gradient here; it "
              "differs on ReLU networks (the audio ResNet-18, the ECG net).", "",
              f"ECG record {p['ecg']['record']} (CinC 2017, label A): {p['ecg']['method']} for each rhythm the ECG ci "
              f"checkpoint predicts somewhere ({', '.join(p['ecg']['rhythms'])}); record-level prediction "
              f"{p['ecg']['label']}:", "", f"![ECG attribution](understanding/{p['ecg']['png']})", "",
              "Trained first-layer filters:", ""]
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
                                          record["checkpoints"].items()) + " (each task's `ci` config).",
              ""]
    return "\n".join(lines)
