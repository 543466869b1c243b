"""The segment task's config: ``[data]`` (image/mask pairs, split, augmentation), ``[model]`` (backbone and
decoder) and the engine's ``[train]``. Instance masks are the detect task's Mask R-CNN: ``mode = "instance"`` is
an alias that says so when the config loads."""
from __future__ import annotations

from dataclasses import dataclass, field

from cnnapps.data.images import ImageBackbone, ImageData, override
from cnnapps.engine.config import ConfigError, TrainConfig, option
from cnnapps.engine.task import TaskConfig
from cnnapps.heads.segmentation import DECODERS

INSTANCE_DOOR = ("instance masks are the detect task's Mask R-CNN (box and mask AP): run `python -m "
                 "cnnapps.tasks.detect train --config ci_maskrcnn`, or any detect config with --set "
                 "model.arch=maskrcnn")


@dataclass
class SegmentData(ImageData):
    """``[data]``: ``images/<stem>.*`` with ``masks/<stem>_mask.png`` (or ``<stem>.png``), their size, split and
    augmentation."""

    image_size: int = override(ImageData, "image_size", 160, help="side in pixels that images and masks are "
                               "resized (squashed) to and cached at")
    augment: bool = override(ImageData, "augment", True)
    hflip: bool = override(ImageData, "hflip", True)
    dataset: str = option("pennfudan", help="folder: images/ and masks/ of one's own (path)",
                          choices=("pennfudan", "folder"))
    path: str = option("", help="folder: its location, as given or under the data root")
    mask_values: str = option("instances", help="what mask pixels hold: instances (0 background, k > 0 instance "
                              "k, as Penn-Fudan) or classes (the class id; 255: ignore)",
                              choices=("instances", "classes"))
    class_names: list[str] = option(help="class names, background first",
                                    default_factory=lambda: ["background", "person"])
    val_count: int = option(20, help="images of the seeded split held out for validation (Penn-Fudan's 170: 120 "
                            "train, 20 val, 30 test)", ge=0)
    test_count: int = option(30, help="images of the seeded split held out for test", ge=0)

    def check(self) -> None:
        """At least one class besides the background, each named once."""
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"data.class_names = {self.class_names}: needs the background and at least one "
                              "class, each named once")


@dataclass
class SegmentModel(ImageBackbone):
    """``[model]``: the zoo network and a decoder over its ``features_only`` stages."""

    decoder: str = option("unet", help="fcn: FCN-8s style; unet: U-Net style fusion of every stage",
                          choices=DECODERS)
    output_stride: int = option(32, choices=(8, 16, 32), help="ResNet backbones: 16 or 8 replace the last stages' "
                                "strides by dilation, so the decoder gets finer deep maps (at more compute)")
    decoder_channels: int = option(128, help="unet: width of the deepest fusion block (halved per shallower one); "
                                   "fcn: width of the score convolutions", ge=1)
    fcn_skips: int = option(2, help="fcn: skip connections, 0 = FCN-32s-like, 1 = FCN-16s, 2 = FCN-8s on a "
                            "stride-32 backbone", ge=0)
    drop: float = option(0.1, help="dropout before the 1x1 class scores", ge=0, lt=1)
    dice_weight: float = option(0.0, help="loss = cross-entropy + dice_weight * soft Dice loss of the classes "
                                "other than the background", ge=0)


@dataclass
class SegmentConfig(TaskConfig):
    mode: str = option("semantic", help="semantic: one class per pixel (this task); instance: an alias that "
                       "points to the detect task's Mask R-CNN", choices=("semantic", "instance"))
    data: SegmentData = field(default_factory=SegmentData)
    model: SegmentModel = field(default_factory=SegmentModel)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine",
        warmup_epochs=1.0, threads=2))

    def check(self) -> None:
        """``mode = "instance"`` is answered with where instance segmentation lives (one implementation)."""
        if self.mode == "instance":
            raise ConfigError(f"mode = 'instance': {INSTANCE_DOOR}")
