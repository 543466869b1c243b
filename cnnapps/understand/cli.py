"""What ``python -m cnnapps explain`` and ``visualize`` do: load a task checkpoint, attribute or visualise, draw."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnapps.engine.config import ConfigError
from cnnapps.understand.adapters import load_input, load_view
from cnnapps.understand.views import ExplainView, LoadedInput
from cnnapps.understand.attribution import METHODS, attribute, predicted_class, to_map, upsample_to

log = logging.getLogger(__name__)


def resolve_target(view: ExplainView, target: str | int | None) -> int | None:
    """A class given by index or by name -> its index (None stays None: explain the predicted class)."""
    if target is None or target == "":
        return None
    names = view.class_names
    if isinstance(target, int) or str(target).lstrip("-").isdigit():
        idx = int(target)
        if not 0 <= idx < len(names):
            raise ValueError(f"--target {idx} out of range: the model has {len(names)} classes (0..{len(names) - 1})")
        return idx
    if str(target) in names:
        return names.index(str(target))
    raise ValueError(f"--target {target!r} is not a class of this model; classes: {', '.join(names)}")


def default_cam_stage(view: ExplainView, x: torch.Tensor) -> int:
    """The deepest backbone stage whose map still has more than one unit for this input: Grad-CAM of a 1x1 map
    (LeNet-5's C5) is a constant and says nothing about where."""
    from cnnapps.understand.receptive import stage_receptive_fields

    stages = stage_receptive_fields(view.backbone, tuple(x.shape[1:]))
    usable = [s.index for s in stages if any(a.length > 1 for a in s.axes)]
    return usable[-1] if usable else len(stages) - 1


def _method_kwargs(method: str, view: ExplainView, x: torch.Tensor, stage: int | None, steps: int,
                   window: int | None) -> dict[str, Any]:
    if method == "gradcam":
        return {"stage": default_cam_stage(view, x) if stage is None else stage}
    if method == "integrated-gradients":
        return {"steps": steps}
    if method == "occlusion":
        if window is None:
            if view.one_d:
                window = max(8, int(round(0.25 * (view.fs or 200))))  # a quarter second: about a QRS complex
            else:
                window = max(2, min(x.shape[2:]) // 8)
        return {"window": window, "stride": max(1, window // 2)}
    return {}


def _as_input_map(method: str, attr: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """The (*L) map of one example in input coordinates."""
    m = to_map(method, attr)
    if m.shape[1:] != x.shape[2:]:
        m = upsample_to(m, x.shape[2:])
    return m[0].detach().double().cpu().numpy()


def explain_one(view: ExplainView, item: LoadedInput, method: str, out_dir: Path, stage: int | None = None,
                target: int | None = None, steps: int = 32, window: int | None = None) -> dict[str, Any]:
    """Attribute one loaded input and draw it; returns a JSON-ready row (input, label, probabilities, target,
    png, npy). Models with per-step outputs (``view.output_step``, e.g. rhythm labelling) get one attribution
    per predicted class (the class's logits summed over the steps where it is predicted) and a row with the
    record-level mean probabilities; the others one for the target (default: the predicted class)."""
    from cnnapps.understand import plots

    x = item.x
    with torch.no_grad():
        out = view.model(x)
    stem = Path(item.path).name.replace(".", "_")
    signed = method == "integrated-gradients"
    row: dict[str, Any] = {"input": item.path, "method": method}
    if item.info.get("channels"):
        row["channels"] = list(item.info["channels"])
    kw = _method_kwargs(method, view, x, stage, steps, window)
    if view.output_step:
        step = int(view.output_step)
        n = int(item.valid or x.shape[-1])  # the samples that are data, not padding to a whole last step
        valid = -(-n // step)
        prob = torch.softmax(out.float(), 1)[0, :, :valid]  # (K, steps)
        step_cls = prob.argmax(0)
        mean = prob.mean(1)
        row.update(label=view.class_names[int(mean.argmax())],
                   probabilities={c: round(float(p), 4) for c, p in zip(view.class_names, mean)})
        wanted = [target] if target is not None else sorted(set(step_cls.tolist()))
        heats: dict[str, np.ndarray] = {}
        for c in wanted:
            mask = torch.zeros(out.shape[-1])
            mask[:valid] = (step_cls == c).float() if target is None else 1.0
            attr = attribute(method, view.model, x, lambda o, c=c, m=mask: (o[:, c, :] * m).sum(-1), **kw)
            heats[view.class_names[c]] = _as_input_map(method, attr, x)
        heats = {k: v[:n] for k, v in heats.items()}
        png = plots.plot_signal_attribution(item.display[:n], view.fs or 1.0, heats,
                                            out_dir / f"{stem}_{method}.png", signed=signed,
                                            steps=np.array([view.class_names[int(c)] for c in step_cls]), step=step,
                                            title=f"{Path(item.path).name}{_channels(item)}: {method} "
                                                  f"per predicted class; record label {row['label']}",
                                            channel_names=item.info.get("channels"))
        row["targets"] = list(heats)
        np.savez_compressed(out_dir / f"{stem}_{method}.npz", signal=item.display[:n], **heats)
        row.update(png=str(png), npz=str(out_dir / f"{stem}_{method}.npz"))
        return row
    prob = torch.softmax(out.float(), 1)[0]
    c = int(predicted_class(out)[0]) if target is None else target
    row.update(label=view.class_names[int(prob.argmax())], probability=round(float(prob.max()), 4),
               target=view.class_names[c], target_probability=round(float(prob[c]), 4))
    heat = _as_input_map(method, attribute(method, view.model, x, c, **kw), x)
    where = ""
    if method == "gradcam":
        from cnnapps.understand.attribution import stage_module

        where = f" (stage {kw['stage']}: {stage_module(view.model, kw['stage'])[0]})"
        row["stage"] = kw["stage"]
    title = (f"{Path(item.path).name}: {method}{where}" +
             f" for '{view.class_names[c]}' (p={prob[c]:.2f}; predicted '{row['label']}')")
    if view.kind == "image":
        png = plots.plot_image_attribution(item.display, heat, out_dir / f"{stem}_{method}.png", title, signed)
    elif view.kind == "spectrogram":
        png = plots.plot_spectrogram_attribution(item.display, heat, view.fs or 1.0, out_dir / f"{stem}_{method}.png",
                                                 title, signed)
    else:
        png = plots.plot_signal_attribution(item.display, view.fs or 1.0, {view.class_names[c]: heat},
                                            out_dir / f"{stem}_{method}.png", title, signed,
                                            channel_names=item.info.get("channels"))
    np.save(out_dir / f"{stem}_{method}.npy", heat.astype(np.float32))
    row.update(png=str(png), npy=str(out_dir / f"{stem}_{method}.npy"))
    return row


def _channels(item: LoadedInput) -> str:
    names = item.info.get("channels") or []
    return f" ({', '.join(names)})" if names else ""


def run_explain(checkpoint: str | Path, inputs: Sequence[str], method: str, out_dir: str | Path,
                stage: int | None = None,
                target: str | int | None = None, steps: int = 32, window: int | None = None,
                device: str = "cpu", start_s: float = 0.0, max_seconds: float = 30.0,
                lead: str | None = None) -> list[dict[str, Any]]:
    """``python -m cnnapps explain``: one row per input (an ``error`` row for an unreadable one; the others go
    on). Pictures and raw maps go to ``out_dir``, and the rows are appended to its ``explain.jsonl``."""
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    view = load_view(checkpoint, device)
    cls = resolve_target(view, target)
    rows = []
    for path in inputs:
        t0 = time.perf_counter()
        try:
            item = load_input(view, path, start_s=start_s, max_seconds=max_seconds, lead=lead)
        except ValueError as exc:
            rows.append({"input": str(path), "error": str(exc)})
            continue
        item.x = item.x.to(device)
        row = explain_one(view, item, method, out, stage, cls, steps, window)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    with open(out / "explain.jsonl", "a") as fh:  # several methods into one folder keep every row
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return rows


VISUALS = ("filters", "maximize", "topk")


def run_visualize(checkpoint: str | Path, out_dir: str | Path, what: str = "filters", stage: int | None = None,
                  channel: int | None = None, target: str | int | None = None, k: int = 16, steps: int = 64,
                  split: str = "val", data_dir: str | Path | None = None, max_examples: int = 512,
                  device: str = "cpu") -> dict[str, Any]:
    """``python -m cnnapps visualize``: ``filters`` (first conv layer), ``maximize`` (activation maximisation of
    a class, or of ``channel`` of ``stage``), ``topk`` (the ``k`` examples of a split whose strongest unit of
    ``channel`` in ``stage`` is highest, cropped to that unit's receptive field). Returns a JSON-ready row."""
    from cnnapps.understand import visualize as vis

    if what not in VISUALS:
        raise ValueError(f"unknown --what {what!r}; choose one of {', '.join(VISUALS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    view = load_view(checkpoint, device)
    row: dict[str, Any] = {"checkpoint": str(checkpoint), "task": view.task, "what": what}
    one_d = view.one_d
    if what == "filters":
        name, conv = vis.first_conv(view.backbone)
        png = vis.plot_filters(conv.weight, out / "filters.png", f"{view.task}: first layer {name} "
                               f"{tuple(conv.weight.shape)}", fs=view.fs if one_d else None)
        row.update(layer=name, weight_shape=list(conv.weight.shape), png=str(png))
    elif what == "maximize":
        mean = std = bounds = None
        if view.mean is not None and view.std is not None:
            mean = torch.as_tensor(view.mean, dtype=torch.float32)
            std = torch.as_tensor(view.std, dtype=torch.float32)
            shape = (1, -1, 1, 1)
            bounds = ((0 - mean) / std).view(shape).to(device), ((1 - mean) / std).view(shape).to(device)
        if channel is not None:
            st = -1 if stage is None else stage
            objective = vis.channel_objective(view.model, st, channel)
            labels = [f"stage {st} channel {channel}"]
        else:
            cls = resolve_target(view, target)
            classes = [cls] if cls is not None else list(range(min(len(view.class_names), 10)))
            objective = vis.class_objective(view.model, classes)
            labels = [view.class_names[c] for c in classes]
        result = vis.maximize(objective, view.input_shape, batch=len(labels), steps=steps, bounds=bounds,
                              device=device)
        goal = "a channel" if channel is not None else "each class"
        png = vis.plot_maximized(result, labels, out / "maximize.png",
                                 f"{view.task}: inputs that maximise {goal} ({steps} Adam steps, jitter, blur, L2)",
                                 mean=mean, std=std,
                                 fs=view.fs if one_d else None, image_like=view.kind == "image")
        row.update(labels=labels, scores=[round(float(s), 3) for s in result.scores], png=str(png))
    else:
        from cnnapps.data.root import find_data_root
        from cnnapps.understand.adapters import iter_examples

        examples = iter_examples(view, find_data_root(data_dir), split, max_examples)
        if getattr(view.backbone, "feature_info", None) is None:
            raise ConfigError(f"{checkpoint}: {type(view.backbone).__name__} has no feature_info (no zoo backbone "
                              "stages), so topk has no stage to probe")
        n_stages = len(view.backbone.feature_info)
        st = n_stages // 2 if stage is None else stage % n_stages
        ch = 0 if channel is None else channel
        patches = vis.top_k_patches(view.model, view.backbone, examples, st, ch, k)
        png = vis.plot_patches(patches, out / "topk.png", f"{view.task}: top {len(patches)} {split} examples for "
                               f"stage {st} channel {ch} (crops = the unit's receptive field)",
                               fs=view.fs if one_d else None)
        row.update(stage=st, channel=ch, png=str(png),
                   patches=[{"index": p.index, "score": round(p.score, 4), "unit": list(p.unit),
                             "box": [list(b) for b in p.box]} for p in patches])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    (out / f"visualize_{what}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row
