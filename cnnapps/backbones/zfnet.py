"""ZFNet (Zeiler & Fergus 2014): AlexNet with a 7x7/2 first layer and a 5x5/2 second layer, from their figure 3."""
from __future__ import annotations

from cnnapps.backbones._pretrained import IMAGENET_CFG
from cnnapps.backbones._registry import register_backbone
from cnnapps.backbones.alexnet import AlexNet, ConvSpec

_PAPER = "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014"

# Figure 3 (224x224 input): 110x110x96 -> pool 55 -> 26x26x256 -> pool 13 -> 13x13x384, 384, 256 -> pool 6.
ZFNET_CONVS = (
    ConvSpec(96, 7, stride=2, padding=1),
    ConvSpec(256, 5, stride=2),
    ConvSpec(384, 3, padding=1),
    ConvSpec(384, 3, padding=1),
    ConvSpec(256, 3, padding=1),
)


@register_backbone(default_input=(3, 224, 224), min_input=(3, 64, 64), paper=_PAPER, pretrained_cfg=IMAGENET_CFG)
def zfnet(*, contrast_norm: bool = True, **kwargs) -> AlexNet:
    """ZFNet: (B, 3, 224, 224) -> (B, num_classes); one tower (the paper trained on a single GPU).

    The 3x3/2 max pools round up (Caffe's convention) so the map sizes are the figure's 110, 55, 26, 13, 6.
    ``contrast_norm`` (default on, as in the paper) normalises across feature maps after the first two pools;
    the paper gives no constants, so AlexNet's local response normalisation (k=2, n=5, alpha=1e-4, beta=0.75)
    stands in. Other options as ``AlexNet`` (dropout 0.5 in the hidden FCs). 62,357,608 parameters.
    """
    return AlexNet(ZFNET_CONVS, lrn=contrast_norm, norm_before_pool=False, ceil_mode=True, **kwargs)
