"""The backbone registry: ``@register_backbone`` fills it, ``create_backbone`` / ``list_backbones`` read it."""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn

from cnnapps.layers import check_dim

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class BackboneInfo:
    """What the registry knows about one backbone.

    ``default_input``: one example's shape without batch, e.g. (3, 224, 224) or (1, 8192); its first entry is
    the default ``in_chans``. ``min_input``: a small shape every code path accepts (for quick checks).
    ``published``: numbers from the paper or torchvision's weight metadata that tests compare against, e.g.
    ``{"params": 138357544, "gmacs": 15.47}``; ``notes`` says where they come from when that is not obvious.
    """

    name: str
    dim: int
    default_input: tuple[int, ...]
    paper: str
    num_classes: int = 1000
    min_input: tuple[int, ...] | None = None
    published: Mapping[str, float] = field(default_factory=dict)
    notes: str = ""
    builder: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def in_chans(self) -> int:
        """Default number of input channels."""
        return self.default_input[0]


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(
    fn: F | None = None,
    *,
    name: str | None = None,
    dim: int = 2,
    default_input: tuple[int, ...] = (3, 224, 224),
    paper: str = "",
    num_classes: int = 1000,
    min_input: tuple[int, ...] | None = None,
    published: Mapping[str, float] | None = None,
    notes: str = "",
) -> F | Callable[[F], F]:
    """Register a builder ``fn(**kw) -> nn.Module`` under ``name`` (default: the function's name).

    Use bare (``@register_backbone``) or with metadata (``@register_backbone(dim=1, default_input=(1, 8192))``).
    Raises ValueError if the name is taken or the metadata is inconsistent.
    """

    def decorate(builder: F) -> F:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} is already registered (by {_REGISTRY[key].builder!r})")
        check_dim(dim)
        if len(default_input) != dim + 1:
            raise ValueError(f"{key}: default_input {default_input} must be (channels, {dim} spatial sizes)")
        if min_input is not None and len(min_input) != dim + 1:
            raise ValueError(f"{key}: min_input {min_input} must be (channels, {dim} spatial sizes)")
        _REGISTRY[key] = BackboneInfo(
            name=key,
            dim=dim,
            default_input=tuple(default_input),
            paper=paper,
            num_classes=num_classes,
            min_input=tuple(min_input) if min_input is not None else tuple(default_input),
            published=MappingProxyType(dict(published or {})),
            notes=notes,
            builder=builder,
        )
        return builder

    return decorate(fn) if fn is not None else decorate


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry of ``name``; KeyError naming close matches if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise KeyError(f"unknown backbone {name!r}{hint}") from None


def list_backbones(pattern: str | None = None, dim: int | None = None) -> list[str]:
    """Sorted names of registered backbones, filtered by an fnmatch ``pattern`` (e.g. ``"resnet*"``) and ``dim``."""
    if dim is not None:
        check_dim(dim)
    names = sorted(n for n, info in _REGISTRY.items() if dim is None or info.dim == dim)
    return fnmatch.filter(names, pattern) if pattern else names


def create_backbone(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build backbone ``name``.

    ``num_classes`` / ``in_chans`` default to the family's (``backbone_info(name)``); ``num_classes=0`` gives a
    model whose forward returns pooled features (B, num_features). ``features_only=True`` gives a model whose
    forward returns the list of stage maps at ``out_indices`` (default all; negative allowed), described by its
    ``feature_info``; no head is built. Other keyword arguments go to the family (TypeError if unknown).
    """
    info = backbone_info(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices only applies with features_only=True")
    kwargs["num_classes"] = info.num_classes if num_classes is None else num_classes
    kwargs["in_chans"] = info.in_chans if in_chans is None else in_chans
    if features_only:
        kwargs["features_only"] = True
        kwargs["out_indices"] = out_indices
    if info.builder is None:
        raise RuntimeError(f"backbone {name!r} was registered without a builder")
    return info.builder(**kwargs)
