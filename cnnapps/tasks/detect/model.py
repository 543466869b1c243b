"""Detectors over our backbones: torchvision's Faster R-CNN, FCOS and Mask R-CNN on a FeaturePyramidBackbone."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from cnnapps.engine.config import ConfigError
from cnnapps.heads.fpn import FeaturePyramidBackbone

ARCHS = ("fasterrcnn", "fcos", "maskrcnn")


@dataclass
class DetectModel:
    """``[model]`` of the detect task."""

    arch: str = "fasterrcnn"  # fasterrcnn | fcos | maskrcnn (instance masks; needs data with masks)
    backbone: str = "resnet18"  # any 2D zoo network with features_only
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the backbone
    out_indices: list[int] = field(default_factory=lambda: [2, 3, 4])  # stages fed to the FPN (resnet: strides 8-32)
    fpn_channels: int = 128  # FPN width (torchvision: 256); FCOS's GroupNorm needs a multiple of 32
    min_size: int = 320  # images are resized so the short side is min_size ...
    max_size: int = 512  # ... unless the long side would pass max_size (torchvision's rule)
    anchor_sizes: list[int] = field(default_factory=list)  # one base size per pyramid level; []: 4 x its stride
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width (R-CNN anchors)
    box_head_size: int = 256  # R-CNN: width of the two-layer box head (torchvision: 1024)
    rpn_proposals_train: int = 1000  # R-CNN: proposals kept after NMS per image in training ...
    rpn_proposals_test: int = 500  # ... and in evaluation (torchvision: 2000 / 1000)
    roi_batch_size: int = 128  # R-CNN: sampled RoIs per image for the box loss (torchvision: 512)
    head_convs: int = 4  # FCOS: conv layers in each head branch
    score_thresh: float = 0.05  # detections below this score are dropped before NMS
    nms_thresh: float = 0.5
    detections_per_img: int = 100


def pyramid_backbone(cfg: DetectModel, extra_block: str) -> FeaturePyramidBackbone:
    """Our zoo network ``cfg.backbone`` (features_only, ``cfg.out_indices``) under an FPN of ``cfg.fpn_channels``."""
    from cnnapps.backbones import backbone_info, create_backbone

    info = backbone_info(cfg.backbone)
    if info.dim != 2:
        raise ConfigError(f"model.backbone: {cfg.backbone!r} is {info.dim}D; detection needs a 2D backbone")
    body = create_backbone(cfg.backbone, features_only=True, out_indices=list(cfg.out_indices), **cfg.kwargs)
    return FeaturePyramidBackbone(body, cfg.fpn_channels, extra_block)


def _anchor_sizes(cfg: DetectModel, reductions: list[int]) -> list[int]:
    if cfg.anchor_sizes:
        if len(cfg.anchor_sizes) != len(reductions):
            raise ConfigError(f"model.anchor_sizes: {len(cfg.anchor_sizes)} sizes for {len(reductions)} pyramid "
                              f"levels (strides {reductions})")
        return list(cfg.anchor_sizes)
    # 4 x stride: torchvision's 32..256 on P3..P6; our images are small (min_size ~256-320), so the 512 of P2..P6
    # setups would never fit an object.
    return [4 * r for r in reductions]


def build_detector(cfg: DetectModel, num_classes: int) -> nn.Module:
    """A torchvision detector for ``num_classes`` object classes (plus background: labels run 1..num_classes).

    Its ``.backbone`` is a FeaturePyramidBackbone holding the zoo network's layers under ``backbone.<name>``.
    Training mode: ``model(images, targets) -> dict of losses``; eval: ``model(images) -> [{boxes (M, 4) x1 y1 x2
    y2 in input pixels, scores (M,), labels (M,)[, masks (M, 1, H, W) probabilities]}]``, images being a list of
    (3, H, W) float tensors in [0, 1] (normalised inside with ImageNet statistics)."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown {cfg.arch!r} ({', '.join(ARCHS)})")
    n = num_classes + 1
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size, detections_per_img=cfg.detections_per_img)
    if cfg.arch == "fcos":
        backbone = pyramid_backbone(cfg, "p6p7")
        reductions = backbone.reductions()
        # FCOS's "anchor" is one point per location; its size is the level's stride (torchvision: 8..128), which
        # also sets the per-level regression ranges [4 s, 8 s].
        sizes = cfg.anchor_sizes or reductions
        if len(sizes) != len(reductions):
            raise ConfigError(f"model.anchor_sizes: {len(sizes)} sizes for {len(reductions)} FCOS levels")
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
        from torchvision.models.detection.fcos import FCOSHead

        head = FCOSHead(backbone.out_channels, 1, n, num_convs=cfg.head_convs)
        return FCOS(backbone, n, anchor_generator=anchors, head=head, score_thresh=cfg.score_thresh,
                    nms_thresh=cfg.nms_thresh, **common)
    backbone = pyramid_backbone(cfg, "pool")
    reductions = backbone.reductions()
    sizes = _anchor_sizes(cfg, reductions)
    anchors = AnchorGenerator(tuple((s,) for s in sizes), (tuple(cfg.aspect_ratios),) * len(sizes))
    c = backbone.out_channels
    rcnn = dict(rpn_anchor_generator=anchors,
                box_roi_pool=MultiScaleRoIAlign(backbone.level_names, output_size=7, sampling_ratio=2),
                box_head=TwoMLPHead(c * 7 * 7, cfg.box_head_size),
                box_predictor=FastRCNNPredictor(cfg.box_head_size, n),
                rpn_pre_nms_top_n_train=2 * cfg.rpn_proposals_train, rpn_post_nms_top_n_train=cfg.rpn_proposals_train,
                rpn_pre_nms_top_n_test=2 * cfg.rpn_proposals_test, rpn_post_nms_top_n_test=cfg.rpn_proposals_test,
                box_batch_size_per_image=cfg.roi_batch_size, box_score_thresh=cfg.score_thresh,
                box_nms_thresh=cfg.nms_thresh, box_detections_per_img=cfg.detections_per_img,
                min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.arch == "fasterrcnn":
        return FasterRCNN(backbone, None, **rcnn)
    return MaskRCNN(backbone, None,
                    mask_roi_pool=MultiScaleRoIAlign(backbone.level_names, output_size=14, sampling_ratio=2),
                    mask_head=MaskRCNNHeads(c, [c] * 4, 1), mask_predictor=MaskRCNNPredictor(c, c, n), **rcnn)
