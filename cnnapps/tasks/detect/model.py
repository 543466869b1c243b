"""Detectors over our backbones: torchvision's Faster R-CNN, FCOS and Mask R-CNN on a FeaturePyramidBackbone."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from cnnapps.data.images import ImageBackbone
from cnnapps.engine.config import ConfigError, option
from cnnapps.heads.fpn import FeaturePyramidBackbone

ARCHS = ("fasterrcnn", "fcos", "maskrcnn")


@dataclass
class DetectModel(ImageBackbone):
    """``[model]``: a torchvision detector (``arch``) over the zoo network ``backbone`` with an FPN."""

    arch: str = option("fasterrcnn", help="fcos is single-stage; maskrcnn adds instance masks (needs data with "
                       "masks)", choices=ARCHS)
    out_indices: list[int] = option(help="backbone stages fed to the FPN (resnet: 2, 3, 4 are strides 8 to 32)",
                                    default_factory=lambda: [2, 3, 4])
    fpn_channels: int = option(128, help="FPN width (torchvision: 256); FCOS's GroupNorm needs a multiple of 32",
                               ge=1)
    min_size: int = option(320, help="images are resized so that the short side is min_size ...", gt=0)
    max_size: int = option(512, help="... unless the long side would pass max_size (torchvision's rule)", gt=0)
    anchor_sizes: list[int] = option(help="one anchor base size per pyramid level; []: 4 x its stride "
                                     "(FCOS: the stride)", ge=1, default_factory=list)
    aspect_ratios: list[float] = option(help="R-CNN anchors: height / width ratios", gt=0,
                                        default_factory=lambda: [0.5, 1.0, 2.0])
    box_head_size: int = option(256, help="R-CNN: width of the two-layer box head (torchvision: 1024)", ge=1)
    rpn_proposals_train: int = option(1000, help="R-CNN: proposals kept after NMS per image in training ...", ge=1)
    rpn_proposals_test: int = option(500, help="... and in evaluation (torchvision: 2000 / 1000)", ge=1)
    roi_batch_size: int = option(128, help="R-CNN: sampled RoIs per image for the box loss (torchvision: 512)",
                                 ge=1)
    head_convs: int = option(4, help="FCOS: conv layers in each head branch", ge=0)
    score_thresh: float = option(0.05, help="detections below this score are dropped before NMS", ge=0, lt=1)
    nms_thresh: float = option(0.5, help="non-maximum suppression: of two boxes of a class overlapping by more "
                               "than this IoU, the lower-scored one goes", gt=0, le=1)
    detections_per_img: int = option(100, help="detections kept per image, highest scores first", ge=1)

    def check(self) -> None:
        """Rules between fields, checked when a config loads."""
        super().check()
        if not self.out_indices:
            raise ConfigError("model.out_indices = []: the FPN needs at least one backbone stage")
        if self.max_size < self.min_size:
            raise ConfigError(f"model.max_size = {self.max_size}: must be >= model.min_size ({self.min_size})")
        if self.arch == "fcos" and self.fpn_channels % 32:
            raise ConfigError(f"model.fpn_channels = {self.fpn_channels}: FCOS's GroupNorm (32 groups) needs a "
                              "multiple of 32")


def pyramid_backbone(cfg: DetectModel, extra_block: str) -> FeaturePyramidBackbone:
    """Our zoo network ``cfg.backbone`` (features_only, ``cfg.out_indices``) under an FPN of ``cfg.fpn_channels``."""
    from cnnapps.backbones import create_backbone

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
