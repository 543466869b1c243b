"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998): the 32x32 digit recogniser with 61,706 parameters."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnapps.backbones._base import Backbone, check_in_chans, check_num_classes
from cnnapps.backbones._registry import register_backbone
from cnnapps.layers import ScaledTanh

_PAPER = "LeCun, Bottou, Bengio, Haffner. Gradient-Based Learning Applied to Document Recognition. Proc. IEEE 1998"


class LeNet5(Backbone):
    """LeNet-5: C1 6@5x5 - S2 - C3 16@5x5 - S4 - C5 120@5x5 - F6 84 - output; (B, in_chans, 32, 32) -> (B, num_classes).

    Every layer up to F6 is followed by the paper's squashing ``1.7159 tanh(2x/3)``; convolutions are "valid"
    (32 -> 28 -> 14 -> 10 -> 5 -> 1). With 1 input channel and 10 classes it has exactly 61,706 parameters.

    Simplifications against the paper, all standard:
    - S2/S4 are 2x2 average pools without the paper's trainable coefficient and bias per map (the paper's
      12 + 32 extra parameters), followed by the squashing function;
    - C3 connects every S2 map to every C3 map (the paper's table I uses a sparse table: 1,516 weights there,
      2,416 here);
    - the output layer is a linear layer (logits for a cross-entropy loss) instead of Euclidean RBF units with
      fixed +-1 bitmap codes trained with the MAP criterion.

    Stages (``feature_info``): S2 (6 ch, stride 2), S4 (16 ch, stride 4), C5 (120 ch, stride 4; 1x1 for 32x32 input).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        features_only: bool = False,
        out_indices: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(dim=2)
        self.c1 = nn.Sequential(nn.Conv2d(check_in_chans(in_chans), 6, 5), ScaledTanh())
        self.s2 = nn.Sequential(nn.AvgPool2d(2), ScaledTanh())
        self.c3 = nn.Sequential(nn.Conv2d(6, 16, 5), ScaledTanh())
        self.s4 = nn.Sequential(nn.AvgPool2d(2), ScaledTanh())
        self.c5 = nn.Sequential(nn.Conv2d(16, 120, 5), ScaledTanh())
        self._set_stages([(("c1", "s2"), 6, 2), (("c3", "s4"), 16, 4), (("c5",), 120, 4)])
        if features_only:
            self._set_features_only(out_indices)
            return
        self.num_features = 84
        self.f6 = nn.Sequential(nn.Linear(self.feature_info.channels(-1), self.num_features), ScaledTanh())
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(check_num_classes(num_classes))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the output layer by Linear(84, num_classes) (identity for 0)."""
        self._require_head()
        self.num_classes = check_num_classes(num_classes)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """C5 map (B, 120, 1, 1) -> (B, num_classes), or F6 (B, 84) with ``pre_logits``."""
        self._require_head()
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"LeNet-5 needs 32x32 inputs (C5 must be 1x1), got a C5 map of {tuple(x.shape[-2:])}")
        x = self.f6(torch.flatten(x, 1))
        return x if pre_logits else self.fc(x)


@register_backbone(
    default_input=(1, 32, 32), num_classes=10, paper=_PAPER, published={"params": 61_706},
    notes="61,706 = the paper's layer sizes with a full C3 table and parameter-free subsampling",
)
def lenet5(**kwargs) -> LeNet5:
    """LeNet-5 for 32x32 single-channel images, 10 classes by default."""
    return LeNet5(**kwargs)
