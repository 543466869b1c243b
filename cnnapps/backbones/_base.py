"""Backbone: the base class that gives every family the same stage-by-stage forward, features_only mode and head API."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnapps.backbones._features import FeatureInfo, normalize_indices
from cnnapps.layers import check_dim


class Backbone(nn.Module):
    """A network cut into stages, each a chain of named submodules applied in order.

    A family's ``__init__`` builds its layers, calls ``_set_stages`` with (module path, channels, reduction)
    per stage, then either builds its head or calls ``_set_features_only``. It implements ``forward_head`` and
    ``reset_classifier``; the stage-wise forward below is shared. Register modules in forward order: the
    trainer's stage freezing relies on parameter order following the stages.

    Attributes: ``dim`` (1: inputs (B, C, T); 2: inputs (B, C, H, W)), ``feature_info``, ``num_classes``,
    ``num_features`` (width of the pre-logits vector that the last linear layer sees), ``features_only``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = check_dim(dim)
        self.num_classes = 0
        self.num_features = 0
        self.features_only = False
        self._stage_paths: list[tuple[str, ...]] = []
        self._out_positions: tuple[int, ...] = ()

    def _set_stages(self, stages: Sequence[tuple[Sequence[str], int, int]]) -> None:
        """Declare the stages: ``(submodule names applied in order, out channels, total stride)`` each.
        The last name of a stage is the module whose output is that stage's feature map."""
        self._stage_paths = [tuple(paths) for paths, _, _ in stages]
        self.feature_info = FeatureInfo(
            [{"num_chs": c, "reduction": r, "module": paths[-1]} for paths, c, r in stages], model=self
        )

    def _set_features_only(self, out_indices: Sequence[int] | int | None) -> None:
        """Switch ``forward`` to return the list of stage outputs at ``out_indices`` (all when None); the stages
        past the last one asked for are replaced by identities so their parameters do not exist (DDP would
        otherwise complain about parameters without gradients)."""
        n = len(self._stage_paths)
        positions = tuple(range(n)) if out_indices is None else normalize_indices(out_indices, n)
        for paths in self._stage_paths[positions[-1] + 1 :]:
            for path in paths:
                self.set_submodule(path, nn.Identity())
        self._stage_paths = self._stage_paths[: positions[-1] + 1]
        self._out_positions = positions
        self.feature_info = self.feature_info.select(list(positions))
        self.features_only = True
        self.num_classes = 0

    def _require_head(self) -> None:
        if self.features_only:
            raise RuntimeError(f"{type(self).__name__} was built with features_only=True and has no head")

    def _run_stages(self, x: torch.Tensor, collect: bool) -> list[torch.Tensor]:
        outs = []
        for paths in self._stage_paths:
            for path in paths:
                x = self.get_submodule(path)(x)
            if collect:
                outs.append(x)
        return outs if collect else [x]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, shallow to deep: ``(B, feature_info.channels(i), *L / reduction(i))``."""
        return self._run_stages(x, collect=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage map (B, feature_info.channels(-1), *L / feature_info.reduction(-1))."""
        return self._run_stages(x, collect=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last stage map -> logits (B, num_classes), or the (B, num_features) vector before the last linear layer."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last linear layer by a new one with ``num_classes`` outputs (0: identity)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, num_classes); with ``features_only`` the list of stage maps described by ``feature_info``."""
        if self.features_only:
            outs = self._run_stages(x, collect=True)
            return [outs[i] for i in self._out_positions]
        return self.forward_head(self.forward_features(x))


def check_num_classes(num_classes: int) -> int:
    """Return ``num_classes`` if it is a non-negative int, else raise ValueError."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    return num_classes


def check_in_chans(in_chans: int) -> int:
    """Return ``in_chans`` if it is a positive int, else raise ValueError."""
    if not isinstance(in_chans, int) or in_chans <= 0:
        raise ValueError(f"in_chans must be an int > 0, got {in_chans!r}")
    return in_chans
