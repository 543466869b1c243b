"""The semantic-segmentation task plugin: Penn-Fudan person vs background (or a folder of class-id masks), an FCN
or U-Net decoder on any 2D backbone, cross-entropy with an optional Dice term, IoU/Dice/pixel accuracy.

Instance masks are not a second implementation here: they are the detect task's Mask R-CNN (``mode =
"instance"`` in a segment config says so when it loads)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnapps.data.augment import ImageAugment
from cnnapps.data.images import ImageReadError, channel_stats, picture_path, predict_images, read_mask
from cnnapps.engine.checkpoint import init_facts
from cnnapps.engine.config import ConfigError
from cnnapps.engine.task import DataSplits, Task, unwrap
from cnnapps.heads.segmentation import SegmentationNet, create_decoder
from cnnapps.metrics.segmentation import (IGNORE_INDEX, SegmentationMetrics, confusion_from_labels,
                                          scores_from_confusion)
from cnnapps.tasks.segment.config import SegmentConfig
from cnnapps.tasks.segment.data import (NO_OBJECTS, SemanticImages, find_mask, find_pairs, load_semantic,
                                        split_stems, to_class_ids)

log = logging.getLogger(__name__)


def resolve_folder(cfg: SegmentConfig, data_root: Path) -> Path:
    """The data folder of ``cfg.data`` (Penn-Fudan under the data root, or a user's folder)."""
    d = cfg.data
    if d.dataset == "pennfudan":
        return Path(data_root) / "pennfudan"
    p = Path(d.path) if d.path else Path(data_root)
    return p if p.is_absolute() or p.exists() else Path(data_root) / p


def augment_pair(x: torch.Tensor, mask: torch.Tensor, augment: ImageAugment, num_classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``augment``'s random geometry applied alike to normalised images (B, 3, H, W) and their class-id masks
    (B, H, W), its colour jitter to the images only. The masks travel as one-hot channels plus a "valid" channel
    through the one batched warp; pixels the warp brings in from outside the image become ``IGNORE_INDEX``."""
    if augment.warps:
        valid = mask != IGNORE_INDEX
        onehot = F.one_hot(torch.where(valid, mask, 0).long(), num_classes).permute(0, 3, 1, 2).to(x.dtype)
        stacked = augment.warp(torch.cat([x, onehot * valid[:, None], valid[:, None].to(x.dtype)], 1))
        x, scores, inside = stacked[:, :3], stacked[:, 3:-1], stacked[:, -1]
        mask = torch.where(inside > 0.5, scores.argmax(1), IGNORE_INDEX)
    return augment.jitter(x), mask


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """1 - soft Dice of the non-background classes (1..K-1), averaged over them, over the whole batch.
    ``logits`` (B, K, H, W), ``target`` (B, H, W) class ids; ignored pixels count for nothing."""
    k = logits.shape[1]
    valid = (target != ignore_index)
    prob = logits.float().softmax(1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, target, 0).long(), k).permute(0, 3, 1, 2).float() * valid[:, None]
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)[1:]
    total = (prob.sum(dims) + onehot.sum(dims))[1:]
    return 1 - ((2 * inter + 1.0) / (total + 1.0)).mean()


def _truth_of(path: str, shape: tuple[int, int], cfg: SegmentConfig, num_classes: int
              ) -> tuple[Path, np.ndarray] | None:
    """The class-id mask (H, W) that belongs to the image ``path`` (``find_mask``), or None for an image without
    one; a mask that cannot be used is logged and treated as absent (the prediction stands on its own)."""
    mask_path = find_mask(path)
    if mask_path is None:
        return None
    try:
        return mask_path, to_class_ids(read_mask(mask_path, expected_hw=shape), cfg.data.mask_values, num_classes,
                                       mask_path)
    except (ImageReadError, ValueError) as exc:
        log.warning("%s: its mask is not shown (%s)", path, exc)
        return None


class SegmentTask(Task):
    name = "segment"
    Config = SegmentConfig
    monitor = "mIoU"

    def build_data(self, cfg: SegmentConfig, data_root: Path, state: dict | None = None,
                   split: str | None = None) -> DataSplits:
        d = cfg.data
        size = int(state["image_size"]) if state else d.image_size
        names = list(state["class_names"]) if state else list(d.class_names)
        # evaluate --split all: every pair of the folder --data-dir names, with the checkpoint's preprocessing
        folder = Path(data_root) if split == "all" and (Path(data_root) / "images").is_dir() \
            else resolve_folder(cfg, data_root)
        pairs = find_pairs(folder)
        arrays = load_semantic(pairs, size, d.mask_values, len(names), d.dataset)
        row_of = {s: i for i, s in enumerate(arrays.stems)}
        if split == "all":
            parts = {"train": [], "val": [], "test": list(arrays.stems)}
        else:
            parts = split_stems([p.stem for p in pairs], d.val_count, d.test_count, d.split_seed, d.train_subset,
                                d.test_subset)
        rows = {k: [row_of[s] for s in v if s in row_of] for k, v in parts.items()}
        if split != "all" and not rows["train"]:
            raise ConfigError(f"{folder}: no usable training image left after the split")
        skipped = {k: v for k, v in arrays.counts.items() if k != NO_OBJECTS}
        if state:
            new_state = dict(state)
        else:
            mean, std = channel_stats(arrays.images[np.sort(rows["train"])])
            new_state = {"class_names": names, "image_size": size, "mean": mean, "std": std,
                         "dataset": d.dataset, "split_seed": d.split_seed,
                         "split_sizes": {k: len(v) for k, v in rows.items()},
                         "images_without_objects": int(arrays.counts.get(NO_OBJECTS, 0))}
        if arrays.counts.get(NO_OBJECTS):
            log.info("%d image(s) with no objects kept as all background", arrays.counts[NO_OBJECTS])
        log.info("segment %s: %d train, %d val, %d test images at %dpx", d.dataset, len(rows["train"]),
                 len(rows["val"]), len(rows["test"]), size)

        def ds(key: str) -> SemanticImages | None:
            return SemanticImages(arrays.images, arrays.masks, rows[key]) if rows[key] else None

        return DataSplits(train=ds("train"), val=ds("val"), test=ds("test"), state=new_state, skipped=skipped)

    def build_model(self, cfg: SegmentConfig, data: DataSplits) -> nn.Module:
        from cnnapps.backbones import create_backbone

        m = cfg.model
        s = data.state
        kwargs = dict(m.kwargs, **({"output_stride": m.output_stride} if m.output_stride != 32 else {}))
        try:
            backbone = create_backbone(m.backbone, features_only=True, in_chans=3, **kwargs)
        except TypeError as exc:
            if "output_stride" in kwargs and "output_stride" in str(exc):
                raise ConfigError(f"model.output_stride applies to ResNet backbones, not {m.backbone}") from None
            raise
        kw: dict[str, Any] = {"channels": m.decoder_channels, "drop": m.drop}
        if m.decoder == "fcn":
            kw["skips"] = m.fcn_skips
        decoder = create_decoder(m.decoder, backbone.feature_info, len(s["class_names"]), **kw)
        return SegmentationNet(backbone, decoder, s["mean"], s["std"])

    def step(self, model: nn.Module, batch: Any, cfg: SegmentConfig) -> dict[str, Any]:
        net = unwrap(model)
        x = net.prepare(batch["x"])
        mask = batch["mask"].long()
        augment = cfg.data.augmentation() if model.training else None
        if augment is not None:
            x, mask = augment_pair(x, mask, augment, net.decoder.num_classes)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX)
        if cfg.model.dice_weight:
            loss = loss + cfg.model.dice_weight * dice_loss(logits, mask)
        return {"loss": loss, "output": logits}

    def metrics(self, cfg: SegmentConfig, data: DataSplits) -> SegmentationMetrics:
        return SegmentationMetrics(data.state["class_names"])

    def report(self, run_dir: Path, metric: SegmentationMetrics, data: DataSplits) -> dict[str, str]:
        from cnnapps.engine.plots import plot_confusion
        from cnnapps.tasks.segment.plots import plot_examples

        art = metric.artifacts()
        plot_confusion(art["confusion"], art["class_names"], run_dir / "pixel_confusion.png",
                       "test pixels: confusion (rows: true)")
        plot_examples(art["examples"], art["class_names"], run_dir / "examples.png")
        (run_dir / "data_summary.json").write_text(json.dumps(
            {"split_sizes": data.state.get("split_sizes"), "skipped": data.skipped,
             "images_without_objects": data.state.get("images_without_objects", 0)}, indent=2) + "\n")
        return {"pixel confusion": "pixel_confusion.png", "test examples": "examples.png",
                "data summary": "data_summary.json"}

    def predict_options(self, parser: Any) -> None:
        parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the mask overlay (0..1)")

    def predict(self, model: nn.Module, inputs: list[str], state: dict, cfg: SegmentConfig, device: torch.device,
                out_dir: Path | None = None, alpha: float = 0.5, **kw: Any) -> Iterator[dict]:
        """Per image: ``picture``, the predicted classes over the photo (``<stem>_overlay.png`` in ``out_dir``,
        default ./predictions), and each non-background class's share of the pixels (``person_fraction`` on
        Penn-Fudan). An image with a mask beside it (``masks/<stem>_mask.png`` or ``<stem>.png`` next to its
        ``images/`` folder, as in Penn-Fudan) gets the ground truth drawn beside the prediction, the mask as
        ``truth`` and that image's ``iou_<class>``."""
        from cnnapps.tasks.segment.plots import save_comparison, save_overlay

        names = list(state["class_names"])
        net = unwrap(model)

        def run(x: torch.Tensor) -> torch.Tensor:
            return model(net.prepare(x)).float()

        def row(path: str, image: np.ndarray, logits: torch.Tensor) -> dict[str, Any]:
            # back to the photo's own size before the argmax: smooth boundaries, one label per pixel
            labels = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
            labels = labels.argmax(1)[0].cpu().numpy().astype(np.uint8)
            target = picture_path(out_dir, path, "_overlay", len(inputs) == 1)
            out: dict[str, Any] = {"picture": str(target)}
            out.update({f"{n}_fraction": round(float((labels == k).mean()), 4) for k, n in enumerate(names[1:], 1)})
            truth = _truth_of(path, image.shape[:2], cfg, len(names))
            if truth is None:
                save_overlay(image, labels, len(names), target, alpha)
                return out
            mask_path, ids = truth
            iou = scores_from_confusion(confusion_from_labels(torch.from_numpy(labels), torch.from_numpy(ids),
                                                              len(names)).numpy())["iou"]
            out["truth"] = str(mask_path)
            out.update({f"iou_{n}": None if np.isnan(v) else round(float(v), 4) for n, v in zip(names, iou)})
            save_comparison(image, ids, labels, names, target, alpha,
                            {n: v for n, v in zip(names[1:], iou[1:])})
            return out

        return predict_images(inputs, run, row, device, size=int(state["image_size"]))

    def bench_extra(self, cfg: SegmentConfig, data_root: Path) -> dict[str, Any]:
        """Where transferred weights came from: the init checkpoint's hash, task, backbone and its best
        validation value, so a results file ties a fine-tuned number to the pretraining run."""
        return init_facts(cfg.train.init_checkpoint, cfg.train.freeze_stages)
