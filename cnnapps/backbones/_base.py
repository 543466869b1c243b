"""Backbone: the base class that gives every family the same stage-by-stage forward, features_only mode and head API."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cnnapps.backbones._features import FeatureInfo, normalize_indices
from cnnapps.layers import check_dim

_OUTPUT_FMTS = {1: ("NCL", "NCHW"), 2: ("NCHW",)}


class Backbone(nn.Module):
    """A network cut into stages, each a chain of named submodules applied in order.

    A family's ``__init__`` builds its layers, calls ``_set_stages`` with (module path, channels, reduction)
    per stage, then either builds its head or calls ``_set_features_only``. It implements ``forward_head`` and
    ``reset_classifier``; the stage-wise forward below is shared. Register modules in forward order: the
    trainer's stage freezing relies on parameter order following the stages.

    Attributes: ``dim`` (1: inputs (B, C, T); 2: inputs (B, C, H, W)), ``feature_info``, ``num_classes``,
    ``num_features`` (width of the pre-logits vector that the last linear layer sees), ``features_only``,
    ``pretrained_cfg`` (what the weights expect and where they came from; ``create_backbone`` fills it).

    Residual blocks mark themselves with ``checkpoint_unit = True``: with ``set_grad_checkpointing()`` each such
    block is recomputed on its own in the backward pass, and any other run of consecutive layers as one piece.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = check_dim(dim)
        self.num_classes = 0
        self.num_features = 0
        self.features_only = False
        self._stage_paths: list[tuple[str, ...]] = []
        self._out_positions: tuple[int, ...] = ()
        self.grad_checkpointing = False
        self.pretrained_cfg: dict[str, Any] = {}

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

    def _stage_pieces(self, paths: Sequence[str]) -> list[list[nn.Module]]:
        """The stage's modules in forward order, cut into the pieces gradient checkpointing recomputes: every
        residual block alone (blocks inside a Sequential path are unrolled), other consecutive layers together.
        In-place activations never straddle a cut: every piece starts with a layer that does not modify its
        input (a convolution, a pool, a norm or a block)."""
        pieces: list[list[nn.Module]] = []
        run: list[nn.Module] = []
        for path in paths:
            module = self.get_submodule(path)
            children = list(module.children()) if isinstance(module, nn.Sequential) else []
            if children and all(getattr(c, "checkpoint_unit", False) for c in children):
                if run:
                    pieces.append(run)
                    run = []
                pieces.extend([c] for c in children)
            else:
                run.append(module)
        if run:
            pieces.append(run)
        return pieces

    def _run_stage(self, x: torch.Tensor, paths: Sequence[str]) -> torch.Tensor:
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            for path in paths:
                x = self.get_submodule(path)(x)
            return x
        for piece in self._stage_pieces(paths):
            x = checkpoint(_run_sequence, piece, x, use_reentrant=False)
        return x

    def _run_stages(self, x: torch.Tensor, collect: bool) -> list[torch.Tensor]:
        outs = []
        for paths in self._stage_paths:
            x = self._run_stage(x, paths)
            if collect:
                outs.append(x)
        return outs if collect else [x]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in training (timm's method): stage activations are not kept for the
        backward pass but recomputed, block by block for the residual families. Outputs and gradients are
        unchanged; batch-norm running statistics are updated once more per recomputed piece, as in timm."""
        self.grad_checkpointing = bool(enable)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: run the stages and also return the maps of some of them.

        ``indices``: the stages to return (positions in ``feature_info``, negative counting from the end), an
        int ``n`` for the last ``n``, or None for all. Returns ``(final, intermediates)``: ``final`` is the last
        stage map (what ``forward_features`` gives; with ``stop_early`` the deepest stage asked for, and later
        stages are not run), ``intermediates`` the list of (B, feature_info.channels(i), *L / reduction(i))
        maps, shallow to deep; with ``intermediates_only`` the list alone. ``norm`` is accepted for timm's
        signature and has no effect: none of these nets has a final norm outside its last stage. ``output_fmt``
        must be channels-first (``"NCHW"``; ``"NCL"`` also for 1D nets).
        """
        if output_fmt not in _OUTPUT_FMTS[self.dim]:
            raise ValueError(f"output_fmt must be one of {_OUTPUT_FMTS[self.dim]} for a {self.dim}D net, "
                             f"got {output_fmt!r}")
        take = take_indices(indices, len(self._stage_paths))
        last = max(take) if (stop_early or intermediates_only) else len(self._stage_paths) - 1
        intermediates = []
        for i, paths in enumerate(self._stage_paths[: last + 1]):
            x = self._run_stage(x, paths)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's method: replace every stage after the deepest one in ``indices`` by identities (and the head
        by identities too with ``prune_head``), so ``forward_intermediates`` computes nothing it does not return.
        Returns the kept stage positions asked for. ``prune_norm`` is accepted for timm's signature."""
        if self.features_only:
            raise RuntimeError("a features_only net is already pruned to its out_indices")
        take = take_indices(indices, len(self._stage_paths))
        for paths in self._stage_paths[max(take) + 1:]:
            for path in paths:
                self.set_submodule(path, nn.Identity())
        self._stage_paths = self._stage_paths[: max(take) + 1]
        self.feature_info = self.feature_info.select(list(range(max(take) + 1)))
        if prune_head and not self.features_only:
            self.reset_classifier(0)
        return take

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


def take_indices(indices: int | Sequence[int] | None, num_stages: int) -> list[int]:
    """timm's reading of ``indices``: None = every stage, an int ``n`` = the last ``n``, a sequence = those
    positions (negative from the end; any order, repeats collapse). Sorted positions; ValueError when out of
    range."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} as a count must be in 1..{num_stages}")
        return list(range(num_stages - indices, num_stages))
    out = set()
    for i in indices:
        if not isinstance(i, int) or not -num_stages <= i < num_stages:
            raise ValueError(f"index {i!r} out of range for {num_stages} stages "
                             f"(valid: {-num_stages}..{num_stages - 1})")
        out.add(i % num_stages)
    if not out:
        raise ValueError("indices is empty")
    return sorted(out)


def _run_sequence(modules: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


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
