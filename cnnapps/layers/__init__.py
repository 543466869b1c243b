"""Layers shared by the backbone families; every one takes ``dim`` (1 or 2) instead of having a 1D copy."""
from cnnapps.layers._nd import (
    Conv1dSame,
    Conv2dSame,
    adaptive_avgpool_cls,
    adaptive_maxpool_cls,
    avgpool_cls,
    batchnorm_cls,
    check_dim,
    conv_cls,
    create_conv,
    layer_cls,
    maxpool_cls,
    same_padding,
)
from cnnapps.layers.blocks import ConvNormAct, LocalResponseNorm, ScaledTanh, SqueezeExcite
from cnnapps.layers.drop import DropPath, drop_path, drop_path_rates
from cnnapps.layers.pool import GLOBAL_POOLS, SelectAdaptivePool

__all__ = [
    "Conv1dSame",
    "Conv2dSame",
    "ConvNormAct",
    "DropPath",
    "GLOBAL_POOLS",
    "LocalResponseNorm",
    "ScaledTanh",
    "SelectAdaptivePool",
    "SqueezeExcite",
    "adaptive_avgpool_cls",
    "adaptive_maxpool_cls",
    "avgpool_cls",
    "batchnorm_cls",
    "check_dim",
    "conv_cls",
    "create_conv",
    "drop_path",
    "drop_path_rates",
    "layer_cls",
    "maxpool_cls",
    "same_padding",
]
