"""The backbone zoo: every family registers its variants here; ``create_backbone`` builds them by name."""
# Importing a family module registers its variants.
from cnnapps.backbones import alexnet, googlenet, hannun, lenet, nin, resnet, vgg, zfnet  # noqa: F401
from cnnapps.backbones._base import Backbone
from cnnapps.backbones._features import FeatureInfo
from cnnapps.backbones._pretrained import LoadReport, PretrainedError, load_pretrained, preprocessing_from_checkpoint
from cnnapps.backbones._registry import BackboneInfo, backbone_info, create_backbone, list_backbones, register_backbone

__all__ = [
    "Backbone",
    "BackboneInfo",
    "FeatureInfo",
    "LoadReport",
    "PretrainedError",
    "backbone_info",
    "create_backbone",
    "list_backbones",
    "load_pretrained",
    "preprocessing_from_checkpoint",
    "register_backbone",
]
