"""FeatureInfo: self-checking description of a backbone's stages (channels, reduction, module name)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class FeatureStage:
    """One stage output: ``num_chs`` channels at ``reduction`` (input length / feature length along each
    axis, i.e. the total stride), produced by the submodule named ``module``."""

    num_chs: int
    reduction: int
    module: str


def _as_stage(stage: FeatureStage | Mapping[str, Any], position: int) -> FeatureStage:
    if isinstance(stage, FeatureStage):
        return stage
    missing = {"num_chs", "reduction", "module"} - set(stage)
    if missing:
        raise ValueError(f"feature stage {position} lacks {sorted(missing)}: {dict(stage)!r}")
    return FeatureStage(int(stage["num_chs"]), int(stage["reduction"]), str(stage["module"]))


def normalize_indices(indices: Sequence[int] | int, length: int) -> tuple[int, ...]:
    """Turn ``out_indices`` (negative allowed, or an int ``n`` meaning the last ``n`` stages) into sorted
    non-negative positions; raise ValueError for an index out of range, a duplicate or a wrong order."""
    if isinstance(indices, int):
        if not 0 < indices <= length:
            raise ValueError(f"out_indices={indices} as a count must be in 1..{length}")
        return tuple(range(length - indices, length))
    positions = []
    for i in indices:
        if not isinstance(i, int):
            raise ValueError(f"out_indices must be ints, got {i!r}")
        if not -length <= i < length:
            raise ValueError(f"out_index {i} out of range for {length} stages (valid: {-length}..{length - 1})")
        positions.append(i % length)
    if not positions:
        raise ValueError("out_indices is empty")
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"out_indices must select stages in increasing order without repeats, got {tuple(indices)}")
    return tuple(positions)


class FeatureInfo:
    """The stages a backbone exposes, shallow to deep.

    Built from a list of dicts ``{num_chs, reduction, module}`` (or ``FeatureStage``); checks on creation
    that every stage has ``num_chs > 0`` and ``reduction >= 1``, that reductions never decrease, and (when
    ``model`` is given) that every module name exists in it. Raises ValueError otherwise.
    """

    def __init__(self, stages: Sequence[FeatureStage | Mapping[str, Any]], model: nn.Module | None = None) -> None:
        self._stages = tuple(_as_stage(s, i) for i, s in enumerate(stages))
        if not self._stages:
            raise ValueError("FeatureInfo needs at least one stage")
        for i, s in enumerate(self._stages):
            if s.num_chs <= 0:
                raise ValueError(f"feature stage {i} ({s.module!r}) has num_chs={s.num_chs}; must be > 0")
            if s.reduction < 1:
                raise ValueError(f"feature stage {i} ({s.module!r}) has reduction={s.reduction}; must be >= 1")
            if i and s.reduction < self._stages[i - 1].reduction:
                raise ValueError(
                    f"feature stage {i} ({s.module!r}) has reduction {s.reduction} < {self._stages[i - 1].reduction} "
                    "of the stage before; reductions must never decrease"
                )
        if model is not None:
            names = {n for n, _ in model.named_modules()}
            absent = [s.module for s in self._stages if s.module not in names]
            if absent:
                raise ValueError(f"feature modules {absent} do not exist in {type(model).__name__}")

    def select(self, out_indices: Sequence[int] | int | None) -> FeatureInfo:
        """The FeatureInfo of the stages at ``out_indices`` (all when None; negative indices count from the end)."""
        if out_indices is None:
            return self
        return FeatureInfo([self._stages[i] for i in normalize_indices(out_indices, len(self))])

    def _pick(self, field: str, idx: int | Sequence[int] | None) -> Any:
        if idx is None:
            return [getattr(s, field) for s in self._stages]
        if isinstance(idx, int):
            return self[idx][field]
        return [self[i][field] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        """Channels of stage ``idx`` (an int), of several stages (a sequence), or of all (None)."""
        return self._pick("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        """Total stride of stage ``idx`` (an int), of several stages (a sequence), or of all (None)."""
        return self._pick("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> str | list[str]:
        """Name of the submodule producing stage ``idx`` (an int), of several stages, or of all (None)."""
        return self._pick("module", idx)

    def get_dicts(self) -> list[dict[str, Any]]:
        """Every stage as a ``{num_chs, reduction, module}`` dict."""
        return [asdict(s) for s in self._stages]

    def __len__(self) -> int:
        return len(self._stages)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        try:
            return asdict(self._stages[idx])
        except IndexError:
            raise IndexError(f"feature stage {idx} out of range for {len(self)} stages") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.get_dicts())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureInfo) and self._stages == other._stages

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.module}: {s.num_chs}ch /{s.reduction}" for s in self._stages)
        return f"FeatureInfo([{inner}])"
