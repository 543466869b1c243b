"""The segment task's config: ``mode``, the shared ``[data]`` and ``[model]`` sections, ``[instance]`` for the
instance mode's own options, and the engine's ``[train]``."""
from __future__ import annotations

from dataclasses import dataclass, field

from cnnapps.engine.config import TrainConfig, option
from cnnapps.engine.task import TaskConfig


@dataclass
class SegmentData:
    dataset: str = "pennfudan"  # pennfudan | folder (images/<stem>.* and masks/<stem>_mask.png or <stem>.png)
    path: str = ""  # folder: its location (as given, else under the data root)
    mask_values: str = "instances"  # instances: 0 background, k > 0 instance k (Penn-Fudan) | classes: class ids
    class_names: list[str] = field(default_factory=lambda: ["background", "person"])
    image_size: int = 160  # images and masks are resized (squashed) to image_size x image_size and cached
    val_count: int = 20  # Penn-Fudan's 170 images: 120 train, 20 val, 30 test with split_seed 0
    test_count: int = 30
    split_seed: int = 0  # the split does not follow train.seed: runs with other seeds see the same split
    train_subset: int = 0  # keep only the first N training images (CI); 0: all
    augment: bool = True
    hflip: bool = True
    crop_scale: float = 1.0  # random-resized-crop lower area bound; 1.0: off
    translate: float = 0.0
    rotation: float = 0.0
    color_jitter: float = 0.0


@dataclass
class SegmentModel:
    backbone: str = "resnet18"
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the backbone
    decoder: str = "unet"  # semantic: fcn | unet
    output_stride: int = option(32, choices=(8, 16, 32), help="ResNet backbones: 16 or 8 replace the last stages' "
                                "strides by dilation, so the decoder gets finer deep maps (at more compute)")
    decoder_channels: int = 128  # unet: width of the deepest fusion block (halved per shallower one); fcn: width
    fcn_skips: int = 2  # fcn: 0 = FCN-32s-like, 1 = FCN-16s, 2 = FCN-8s on a stride-32 backbone
    drop: float = 0.1  # dropout before the 1x1 class scores
    dice_weight: float = 0.0  # loss = cross-entropy + dice_weight * soft Dice loss of the non-background classes


@dataclass
class SegmentConfig(TaskConfig):
    mode: str = "semantic"  # semantic | instance
    data: SegmentData = field(default_factory=SegmentData)
    model: SegmentModel = field(default_factory=SegmentModel)
    instance: dict = field(default_factory=dict)  # options of mode = "instance", read by its module
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine",
        warmup_epochs=1.0, threads=2))
