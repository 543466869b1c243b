"""Semantic segmentation on real Penn-Fudan: decoders over several backbones, IoU/Dice from a hand-checked
confusion, joint image/mask augmentation, the seeded split, bad input in damaged copies (counted skips naming
the file, empty masks kept and counted), bad config values refused at load, a fit that beats all-background,
predict's pictures (truth beside prediction where a mask exists), and transfer from a multi-label checkpoint
with frozen stages."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cnnapps.backbones import create_backbone
from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.config import ConfigError, load_config
from cnnapps.engine.callbacks import Transfer
from cnnapps.engine.trainer import Trainer, fit
from cnnapps.heads.segmentation import SegmentationNet, create_decoder
from cnnapps.metrics.segmentation import IGNORE_INDEX, SegmentationMetrics, confusion_from_labels
from cnnapps.tasks.cli import main
from cnnapps.tasks.segment.config import SegmentData
from cnnapps.tasks.segment.data import split_stems
from cnnapps.tasks.segment.task import SegmentConfig, SegmentTask, augment_pair, dice_loss
from conftest import ci_config, eval_pictures, read_eval


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # caches of damaged copies must never land in the user's cache
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(*overrides: str) -> SegmentConfig:
    return load_config(SegmentConfig, None, list(overrides))


# ---------------------------------------------------------------- decoders, metrics, augmentation


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11_bn", "googlenet", "alexnet"])
@pytest.mark.parametrize("decoder", ["fcn", "unet"])
def test_decoders_give_input_sized_logits_on_any_backbone(backbone, decoder):
    bb = create_backbone(backbone, features_only=True)
    net = SegmentationNet(bb, create_decoder(decoder, bb.feature_info, 3, channels=32)).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 100, 132))  # sizes that no stride divides
    assert out.shape == (2, 3, 100, 132)


def test_decoder_errors_are_clear():
    bb = create_backbone("resnet18", features_only=True)
    with pytest.raises(ValueError, match="unknown segmentation decoder 'deeplab'"):
        create_decoder("deeplab", bb.feature_info, 2)
    with pytest.raises(ValueError, match="fcn skips=5"):
        create_decoder("fcn", bb.feature_info, 2, skips=5)
    with pytest.raises(ValueError, match="features_only=True"):
        SegmentationNet(create_backbone("resnet18"), create_decoder("fcn", bb.feature_info, 2))


def test_iou_dice_and_pixel_accuracy_from_a_hand_case():
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, IGNORE_INDEX]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 0]]])
    conf = confusion_from_labels(pred, target, 2)
    assert conf.tolist() == [[3, 1], [1, 2]]  # the ignored pixel is not counted
    metric = SegmentationMetrics(["background", "person"])
    logits = torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float()
    metric.update(logits, {"mask": target})
    v = metric.compute()
    assert v["iou_person"] == pytest.approx(2 / 4) and v["iou_background"] == pytest.approx(3 / 5)
    assert v["dice_person"] == pytest.approx(4 / 6) and v["pixel_accuracy"] == pytest.approx(5 / 7)
    assert v["mIoU"] == pytest.approx((0.5 + 0.6) / 2) and v["images_without_objects"] == 0
    metric.update(torch.zeros(1, 2, 2, 4), {"mask": torch.zeros(1, 2, 4, dtype=torch.long)})
    assert metric.compute()["images_without_objects"] == 1


def test_dice_loss_is_zero_for_a_confident_perfect_prediction_and_ignores_ignored_pixels():
    target = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]])
    perfect = torch.nn.functional.one_hot(torch.where(target == IGNORE_INDEX, 0, target), 2).permute(0, 3, 1, 2)
    perfect = perfect.float() * 50
    assert dice_loss(perfect, target) < 1e-3
    wrong_on_ignored = perfect.clone()
    wrong_on_ignored[0, :, 1, 1] = torch.tensor([-50.0, 50.0])
    assert dice_loss(wrong_on_ignored, target) < 1e-3


def test_augmentation_moves_image_and_mask_together():
    torch.manual_seed(0)
    mask = torch.zeros(4, 16, 16, dtype=torch.long)
    mask[:, 2:9, 3:7] = 1
    x = mask[:, None].float().repeat(1, 3, 1, 1) * 2 - 1  # the image shows the mask
    augment = SegmentData(hflip=True, crop_scale=0.5, rotation=10).augmentation()
    xa, ma = augment_pair(x, mask, augment, 2)
    inside = ma != IGNORE_INDEX
    agree = ((xa[:, 0] > 0).long() == ma)[inside].float().mean()
    assert agree > 0.97 and set(ma.unique().tolist()) <= {0, 1, IGNORE_INDEX}


def test_split_is_seeded_disjoint_and_stable_when_a_file_breaks():
    stems = [f"img{i:03d}" for i in range(170)]
    s = split_stems(stems, 20, 30, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [120, 20, 30]
    fewer = split_stems(stems, 20, 30, seed=0, train_subset=30, test_subset=10)
    assert set(fewer["train"]) <= set(s["train"]) and set(fewer["test"]) <= set(s["test"])
    assert (len(fewer["train"]), fewer["val"], len(fewer["test"])) == (30, s["val"], 10)
    assert not (set(s["train"]) & set(s["val"]) or set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"]))
    assert split_stems(list(reversed(stems)), 20, 30, seed=0) == s
    assert split_stems(stems, 20, 30, seed=1) != s
    with pytest.raises(ValueError, match="leave no training examples"):
        split_stems(stems[:40], 20, 30, seed=0)


# ---------------------------------------------------------------- real data and bad input


def test_penn_fudan_semantic_data(data_root):
    data = SegmentTask().build_data(_cfg("data.image_size=64"), data_root)
    assert data.state["split_sizes"] == {"train": 120, "val": 20, "test": 30} and data.skipped == {}
    item = data.train[0]
    assert item["x"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert set(np.unique(data.train.masks[:]).tolist()) == {0, 1}
    assert data.state["images_without_objects"] == 0


def _penn_copy(data_root, dest, n=12):
    src = data_root / "pennfudan"
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    stems = sorted(p.stem for p in (src / "images").glob("*.jpg"))[:n]
    for s in stems:
        shutil.copy(src / "images" / f"{s}.jpg", dest / "images")
        shutil.copy(src / "masks" / f"{s}_mask.png", dest / "masks")
    return stems


def test_damaged_copies_are_counted_skips_naming_the_file(tmp_path, data_root, caplog):
    stems = _penn_copy(data_root, tmp_path)
    broken = tmp_path / "images" / f"{stems[0]}.jpg"
    broken.write_bytes(broken.read_bytes()[:300])
    resized = tmp_path / "masks" / f"{stems[1]}_mask.png"
    Image.open(resized).resize((60, 50), Image.NEAREST).save(resized)
    orphan = tmp_path / "masks" / f"{stems[2]}_mask.png"
    orphan.unlink()
    empty = tmp_path / "masks" / f"{stems[3]}_mask.png"
    Image.fromarray(np.zeros_like(np.asarray(Image.open(empty)))).save(empty)
    cfg = _cfg("data.dataset=folder", f"data.path={tmp_path}", "data.image_size=32", "data.val_count=2",
               "data.test_count=2")
    with caplog.at_level(logging.INFO):
        data = SegmentTask().build_data(cfg, tmp_path)
    assert data.skipped == {"unreadable image": 1, "mask size differs from its image": 1,
                            "image without a mask file": 1}
    for path in (broken, resized, tmp_path / "images" / f"{stems[2]}.jpg", empty):
        assert str(path) in caplog.text, path
    assert "50x60 (HxW) but its image is" in caplog.text
    assert data.state["images_without_objects"] == 1  # kept, all background
    assert sum(data.state["split_sizes"].values()) == 12 - 3
    # a model evaluates every usable pair of a folder (evaluate --split all), the empty one included
    small = ["data.dataset=folder", f"data.path={tmp_path}", "data.image_size=32", "data.val_count=2",
             "data.test_count=2", "train.epochs=1", "train.max_steps_per_epoch=1"]
    fit(SegmentTask(), load_config(SegmentConfig, None, small), tmp_path / "run", tmp_path, quiet=True)
    out = tmp_path / "all"
    assert main("segment", ["evaluate", "--checkpoint", str(tmp_path / "run/checkpoints/best.pt"), "--split", "all",
                            "--data-dir", str(tmp_path), "--out", str(out), "--quiet"]) == 0
    values = read_eval(out)
    assert values["images"] == 9 and values["images_without_objects"] == 1
    assert isinstance(values["images"], int) and isinstance(values["images_without_objects"], int)  # counts
    assert values["skipped: unreadable image"] == 1 and (eval_pictures(out) / "examples.png").is_file()


def test_mask_with_labels_outside_the_classes_is_an_error_naming_it(tmp_path, data_root):
    stems = _penn_copy(data_root, tmp_path, n=3)
    cfg = _cfg("data.dataset=folder", f"data.path={tmp_path}", "data.mask_values=classes", "data.image_size=32",
               "data.val_count=1", "data.test_count=1")
    with pytest.raises(ValueError, match=rf"{stems[0]}_mask.png: mask values \[2"):
        SegmentTask().build_data(cfg, tmp_path)  # Penn-Fudan's instance 2 is no class id of 2 classes


def test_bad_values_are_one_line_errors_when_the_config_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match="mode = 'panoptic': choose one of semantic, instance"):
        _cfg("mode=panoptic")
    with pytest.raises(ConfigError, match="1D backbone"):
        _cfg("model.backbone=resnet18_1d")
    with pytest.raises(ConfigError, match="data.class_names .* needs the background"):
        _cfg("data.class_names=[\"person\"]")
    # instance masks have one implementation, the detect task's Mask R-CNN: the old mode says where it is
    assert main("segment", ["train", "--set", "mode=instance", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "detect train --config ci_maskrcnn" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- training, predict, transfer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("segment") / "run"
    return run, fit(SegmentTask(), ci_config(SegmentTask()), run, data_root, quiet=True)


@pytest.mark.slow
def test_fit_beats_all_background(fitted, data_root, meets_floor):
    run, result = fitted
    data = SegmentTask().build_data(ci_config(SegmentTask()), data_root)
    masks = np.stack([data.test[i]["mask"].numpy() for i in range(len(data.test))])
    background = SegmentationMetrics(data.state["class_names"])
    background.update(torch.zeros(len(masks), 2, *masks.shape[1:]).index_fill_(1, torch.tensor([0]), 1.0),
                      {"mask": torch.from_numpy(masks)})
    base = background.compute()
    assert base["iou_person"] == 0.0
    v = result.test_metrics
    assert v["iou_person"] > 0.3, v
    assert v["mIoU"] > base["mIoU"] + 0.05, (v["mIoU"], base["mIoU"])
    meets_floor("segment", v)
    written = {"examples.png", "pixel_confusion.png", "data_summary.json", "checkpoints/best.pt"}
    assert not {n for n in written if not (run / n).is_file()}


@pytest.mark.slow
def test_predict_draws_truth_beside_prediction_where_a_mask_exists(fitted, data_root, tmp_path, capsys):
    run, _ = fitted
    ckpt = str(run / "checkpoints" / "best.pt")
    image = data_root / "pennfudan" / "images" / "FudanPed00001.jpg"
    assert main("segment", ["predict", "--checkpoint", ckpt, str(image), "--out", str(tmp_path), "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["input"] == str(image) and row["picture"].endswith("FudanPed00001_overlay.png")
    assert row["truth"] == str(data_root / "pennfudan" / "masks" / "FudanPed00001_mask.png")
    assert 0.3 < row["iou_person"] <= 1 and 0.02 < row["person_fraction"] < 0.6
    with Image.open(row["picture"]) as pic, Image.open(image) as photo:
        assert pic.width > pic.height  # two panels side by side
    # a photo of one's own has no mask: the overlay alone, at the photo's size
    alone = tmp_path / "mine" / "photo.jpg"
    alone.parent.mkdir()
    shutil.copy(image, alone)
    assert main("segment", ["predict", "--checkpoint", ckpt, str(alone), "--out", str(tmp_path / "o"),
                            "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "truth" not in row and "iou_person" not in row
    with Image.open(row["picture"]) as pic, Image.open(image) as photo:
        assert pic.size == photo.size
    assert main("segment", ["evaluate", "--checkpoint", ckpt, "--data-dir", str(data_root), "--quiet"]) == 0


def test_transfer_from_a_multilabel_checkpoint_loads_the_backbone_and_freezes_stages(tmp_path, data_root):
    from cnnapps.tasks.multilabel.task import MultiLabelConfig, MultiLabelTask

    ml_cfg = load_config(MultiLabelConfig, None, ["data.image_size=32", "train.epochs=1",
                                                  "train.max_steps_per_epoch=1", "data.train_subset=64",
                                                  "data.test_subset=8"])
    fit(MultiLabelTask(), ml_cfg, tmp_path / "ml", data_root, quiet=True)
    ck = tmp_path / "ml" / "checkpoints" / "best.pt"
    source = load_checkpoint(ck)["model"]

    cfg = _cfg("data.image_size=32", f"train.init_checkpoint={ck}", "train.freeze_stages=2")
    data = SegmentTask().build_data(cfg, data_root)
    model = SegmentTask().build_model(cfg, data)
    trainer = Trainer(SegmentTask(), cfg, tmp_path / "seg", data_root)
    trainer.model = model
    Transfer().configure_model(trainer)  # what a fit does before building the optimiser
    own = model.state_dict()
    backbone_keys = [k for k in source if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(own[k], source[k]) for k in backbone_keys)
    params = dict(model.named_parameters())
    assert not params["backbone.conv1.weight"].requires_grad
    assert not params["backbone.layer1.0.conv1.weight"].requires_grad
    assert params["backbone.layer2.0.conv1.weight"].requires_grad and params["decoder.score.weight"].requires_grad
    extra = SegmentTask().bench_extra(cfg, data_root)
    assert extra["init"] == "transferred" and extra["init_task"] == "multilabel"
    assert extra["init_backbone"] == "resnet18"
