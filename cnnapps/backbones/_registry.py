"""The backbone registry: ``@register_backbone`` fills it, ``create_backbone`` / ``list_backbones`` read it."""
from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn

from cnnapps.backbones._pretrained import default_pretrained_cfg, load_pretrained, read_weights_file
from cnnapps.layers import check_dim

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class BackboneInfo:
    """What the registry knows about one backbone.

    ``default_input``: one example's shape without batch, e.g. (3, 224, 224) or (1, 8192); its first entry is
    the default ``in_chans``. ``min_input``: a small shape every code path accepts (for quick checks).
    ``published``: numbers from the paper or torchvision's weight metadata that tests compare against, e.g.
    ``{"params": 138357544, "gmacs": 15.47}``; ``notes`` says where they come from when that is not obvious.
    ``pretrained_defaults``: the family's usual preprocessing (``mean``, ``std``, ...) for ``pretrained_cfg``.
    """

    name: str
    dim: int
    default_input: tuple[int, ...]
    paper: str
    num_classes: int = 1000
    min_input: tuple[int, ...] | None = None
    published: Mapping[str, float] = field(default_factory=dict)
    notes: str = ""
    pretrained_defaults: Mapping[str, Any] = field(default_factory=dict)
    builder: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def in_chans(self) -> int:
        """Default number of input channels."""
        return self.default_input[0]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm-like facts of a freshly built (random) model: ``input_size``, ``num_classes``, ``mean``, ``std``
        (the family's usual normalisation, or None), ``classes`` (None) and ``source`` ("random init")."""
        return default_pretrained_cfg(self)


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
    pretrained_cfg: Mapping[str, Any] | None = None,
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
            pretrained_defaults=MappingProxyType(dict(pretrained_cfg or {})),
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
    pretrained: str | os.PathLike | None = None,
    pretrained_strict: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build backbone ``name``.

    ``num_classes`` / ``in_chans`` default to the family's (``backbone_info(name)``); ``num_classes=0`` gives a
    model whose forward returns pooled features (B, num_features). ``features_only=True`` gives a model whose
    forward returns the list of stage maps at ``out_indices`` (default all; negative allowed), described by its
    ``feature_info``; no head is built. Other keyword arguments go to the family (TypeError if unknown).

    ``pretrained``: a weights file to start from, either a cnnapps checkpoint (the backbone's tensors are found
    inside the task model, e.g. under ``backbone.``) or a plain state dict such as a torchvision file. Tensors
    that fit by name and shape are loaded; the rest (a head of another size, ...) are logged and listed in
    ``model.pretrained_cfg["load"]``. For a checkpoint, ``num_classes`` and ``in_chans`` default to its
    own, and its preprocessing (classes, mean, std, input size or sampling rate) goes into ``pretrained_cfg``.
    ``pretrained_strict``: raise unless every tensor of the model came from the file and every file tensor
    under the matched prefix was used (a task model's own head outside the backbone does not count). Nothing is
    downloaded: ``pretrained=True`` is an error. Raises ``PretrainedError`` for an unusable file.
    """
    info = backbone_info(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices only applies with features_only=True")
    if isinstance(pretrained, bool):
        raise ValueError("pretrained must be the path of a weights file (nothing is downloaded here), "
                         f"got {pretrained!r}")
    file = read_weights_file(pretrained) if pretrained is not None else None
    payload_state = (file[1] or {}).get("data_state") or {} if file is not None else {}
    if num_classes is None and not features_only and payload_state.get("class_names", payload_state.get("classes")):
        num_classes = len(payload_state.get("class_names", payload_state.get("classes")))
    if in_chans is None and payload_state.get("in_chans"):
        in_chans = int(payload_state["in_chans"])
    kwargs["num_classes"] = info.num_classes if num_classes is None else num_classes
    kwargs["in_chans"] = info.in_chans if in_chans is None else in_chans
    if features_only:
        kwargs["features_only"] = True
        kwargs["out_indices"] = out_indices
    if info.builder is None:
        raise RuntimeError(f"backbone {name!r} was registered without a builder")
    model = info.builder(**kwargs)
    cfg = info.pretrained_cfg
    cfg["num_classes"] = getattr(model, "num_classes", kwargs["num_classes"])
    cfg["input_size"] = [kwargs["in_chans"], *info.default_input[1:]]
    if kwargs["in_chans"] != info.in_chans and cfg.get("mean") is not None:
        cfg["mean"] = cfg["std"] = None  # the family's normalisation is per channel of its default input
    model.pretrained_cfg = cfg
    if file is not None:
        load_pretrained(model, pretrained, strict=pretrained_strict, payload_state=file)
    return model
