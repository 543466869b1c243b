"""Image and mask reading on real files and damaged copies: every failure names the file; the array cache is
built once, rebuilt on change, and a killed build leaves nothing behind; the config fields and the predict loop
the image tasks share."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import torch

from cnnapps.data.images import (ImageBackbone, ImageData, ImageReadError, MaskSizeError, cached_arrays,
                                 files_fingerprint, override, predict_images, read_image, read_mask, resize_image,
                                 resize_mask)
from cnnapps.engine.config import ConfigError, load_config


@pytest.fixture(scope="module")
def voc_image(data_root):
    ann = json.loads((data_root / "voc_mini" / "annotations.json").read_text())
    first = ann["images"][0]
    return data_root / "voc_mini" / first["file"], (first["height"], first["width"])


@pytest.fixture(scope="module")
def penn_pair(data_root):
    folder = data_root / "pennfudan"
    return folder / "images" / "FudanPed00001.jpg", folder / "masks" / "FudanPed00001_mask.png"


def test_read_image_gives_rgb_uint8_of_the_recorded_size(voc_image):
    path, hw = voc_image
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (*hw, 3)


def test_truncated_image_is_an_error_naming_it(tmp_path, voc_image):
    bad = tmp_path / "truncated.jpg"
    data = voc_image[0].read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        read_image(bad)


def test_not_an_image_and_missing_file_are_errors_naming_them(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ImageReadError, match="notes.jpg: unreadable image"):
        read_image(text)
    with pytest.raises(ImageReadError, match="absent.png: file not found"):
        read_image(tmp_path / "absent.png")


def test_grey_and_rgba_images_become_rgb(tmp_path):
    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((5, 7, 4), 100, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    for name in ("grey.png", "rgba.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (5, 7, 3) and img.dtype == np.uint8


def test_penn_fudan_mask_holds_instance_ids_and_matches_its_image(penn_pair):
    image_path, mask_path = penn_pair
    img = read_image(image_path)
    mask = read_mask(mask_path, expected_hw=img.shape[:2])
    assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
    ids = np.unique(mask)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # 0 background, 1..N instances


def test_mask_of_another_size_is_an_error_naming_mask_and_sizes(tmp_path, penn_pair):
    image_path, mask_path = penn_pair
    img = read_image(image_path)
    small = tmp_path / "small_mask.png"
    Image.open(mask_path).resize((50, 40), Image.NEAREST).save(small)
    with pytest.raises(MaskSizeError, match=r"small_mask.png: mask is 40x50 \(HxW\) but its image is"):
        read_mask(small, expected_hw=img.shape[:2])
    assert issubclass(MaskSizeError, ImageReadError) and issubclass(ImageReadError, ValueError)


def test_colour_mask_is_refused_but_grey_rgb_is_read(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour.png: mask has colour"):
        read_mask(tmp_path / "colour.png")
    grey = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4)[..., None], 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "grey_rgb.png")
    assert np.array_equal(read_mask(tmp_path / "grey_rgb.png"), grey[..., 0])


def test_resize_mask_invents_no_label(penn_pair):
    mask = read_mask(penn_pair[1])
    small = resize_mask(mask, 37)
    assert small.shape == (37, 37) and set(np.unique(small)) <= set(np.unique(mask))
    assert resize_image(read_image(penn_pair[0]), (20, 30)).shape == (20, 30, 3)


def test_cache_builds_once_rebuilds_on_change_and_a_killed_build_leaves_nothing(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one")
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(6).reshape(2, 3)}, {"note": "hi"}

    folder = tmp_path / "cache" / f"demo-{files_fingerprint([src])}"
    arrays, index = cached_arrays(folder, build)
    arrays2, _ = cached_arrays(folder, build)
    assert len(calls) == 1 and index["note"] == "hi"
    assert np.array_equal(arrays2["x"], np.arange(6).reshape(2, 3)) and isinstance(arrays2["x"], np.memmap)

    src.write_text("changed!")
    assert files_fingerprint([src]) != folder.name.split("-", 1)[1]

    def killed():
        raise KeyboardInterrupt

    other = tmp_path / "cache" / "killed"
    with pytest.raises(KeyboardInterrupt):
        cached_arrays(other, killed)
    assert not other.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]
    shutil.rmtree(tmp_path / "cache")


def test_a_task_section_overrides_a_shared_default_and_keeps_its_meaning():
    from dataclasses import dataclass, fields

    @dataclass
    class Mine(ImageData):
        augment: bool = override(ImageData, "augment", True)
        image_size: int = override(ImageData, "image_size", 0, gt=None, ge=0)

    meta = {f.name: f.metadata for f in fields(Mine)}
    assert Mine().augment and meta["augment"]["help"] == {f.name: f.metadata for f in fields(ImageData)}[
        "augment"]["help"]
    assert load_config(Mine, None, ["image_size=0"]).image_size == 0  # 0 allowed here, not in ImageData
    with pytest.raises(ConfigError, match="image_size = 0: must be > 0"):
        load_config(ImageData, None, ["image_size=0"])
    with pytest.raises(ConfigError, match="crop_scale = 1.5: must be > 0 and <= 1"):
        load_config(Mine, None, ["crop_scale=1.5"])


def test_augmentation_is_built_only_when_asked_for_and_set():
    assert ImageData().augmentation() is None
    assert ImageData(augment=True).augmentation() is None  # on, but nothing to do
    assert ImageData(augment=False, hflip=True).augmentation() is None
    aug = ImageData(augment=True, hflip=True, rotation=5).augmentation()
    assert aug is not None and aug.hflip and aug.rotation == 5 and aug.crop_scale == 1.0


def test_an_image_model_section_refuses_an_unknown_or_1d_backbone_naming_the_key():
    with pytest.raises(ConfigError, match=r"backbone = 'resnet19': no such backbone; did you mean resnet18"):
        load_config(ImageBackbone, None, ["backbone=resnet19"])
    with pytest.raises(ConfigError, match="backbone = 'resnet18_1d': a 1D backbone, this task needs a 2D one"):
        load_config(ImageBackbone, None, ["backbone=resnet18_1d"])
    assert load_config(ImageBackbone, None, ["backbone=vgg11_bn"]).backbone == "vgg11_bn"


def test_predict_loop_reads_resizes_runs_and_reports_a_bad_file_without_stopping(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((30, 50, 3), 7, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    seen = []

    def run(x):
        seen.append((tuple(x.shape), x.dtype))
        return x.float().mean()

    rows = list(predict_images([str(bad), str(good)], run, lambda p, img, out: {"mean": float(out),
                                                                                 "shape": list(img.shape)},
                               torch.device("cpu"), size=16))
    assert rows[0]["input"] == str(bad) and "bad.png" in rows[0]["error"] and len(rows[0]) == 2
    assert rows[1] == {"input": str(good), "mean": 7.0, "shape": [30, 50, 3]}  # the row sees the original image
    assert seen == [((1, 3, 16, 16), torch.uint8)]
    rows = list(predict_images([str(good)], lambda x: x.shape, lambda p, img, out: {"shape": list(out)},
                               torch.device("cpu"), prepare=lambda img: torch.zeros(1, 1, 4, 4)))
    assert rows[0]["shape"] == [1, 1, 4, 4]
