"""Typed configs: TOML files, --set overrides, clear errors for unknown keys and wrong types."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cnnapps.engine.config import ConfigError, TrainConfig, dumps_toml, from_dict, load_config, to_dict


@dataclass
class Section:
    name: str = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict = field(default_factory=dict)
    maybe: float | None = None


@dataclass
class Cfg:
    data: Section = field(default_factory=Section)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nname = "b"\n[train]\nlr = 0.5\n')
    cfg = load_config(Cfg, path, ["train.epochs=3", "train.nesterov=true", "data.sizes=4,5",
                                  "data.extra.width=8", "data.maybe=0.25"])
    assert cfg.data.name == "b" and cfg.train.lr == 0.5 and cfg.train.epochs == 3 and cfg.train.nesterov is True
    assert cfg.data.sizes == [4, 5] and cfg.data.extra == {"width": 8} and cfg.data.maybe == 0.25
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched fields keep defaults


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key(s) lrr"),
    ("train.epochs=abc", "train.epochs: expected an integer"),
    ("train.nesterov=maybe", "expected true or false"),
    ("nosection.x=1", "unknown key(s) nosection"),
    ("train.lr", "expects key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(Cfg, None, [override])


def test_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(Cfg, bad)


def test_written_toml_reads_back_equal(tmp_path):
    cfg = load_config(Cfg, None, ["train.lr=0.125", "data.extra.flag=true", "data.sizes=7"])
    path = tmp_path / "out.toml"
    path.write_text(dumps_toml(to_dict(cfg)))
    assert load_config(Cfg, path) == cfg
    assert from_dict(Cfg, to_dict(cfg)) == cfg


def test_set_takes_a_quoted_toml_string_as_the_text_inside():
    for value in ("vgg11", '"vgg11"', "'vgg11'"):
        assert load_config(Cfg, None, [f"data.name={value}"]).data.name == "vgg11"
