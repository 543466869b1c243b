"""Detect task: FPN adapter, weight transfer, data conventions on real Penn-Fudan / VOC-mini, bad input on damaged
copies, Faster R-CNN / FCOS / Mask R-CNN steps, predict pictures, and a CI fit that beats a trivial baseline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnapps.backbones import create_backbone
from cnnapps.data.images import MaskSizeError
from cnnapps.engine.checkpoint import load_matching_weights, save_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import _stage_boundary, fit
from cnnapps.heads.fpn import FeaturePyramidBackbone
from cnnapps.metrics.detection import DetectionMetrics
from cnnapps.tasks.cli import main
from cnnapps.tasks.detect.data import DetectionDataError, collate_detection, hflip_sample
from cnnapps.tasks.detect.model import DetectModel, build_detector
from cnnapps.tasks.detect.task import DetectConfig, DetectTask
from conftest import ci_config

# Small and quick: 128-160 px images, one thread (robust on a shared machine), a few steps.
TINY = ["model.min_size=128", "model.max_size=160", "model.fpn_channels=64", "model.box_head_size=64",
        "train.batch_size=2", "train.epochs=1", "train.max_steps_per_epoch=2", "train.threads=1",
        "train.warmup_epochs=0", "data.test_fraction=0.3", "data.val_fraction=0.25"]


@pytest.fixture(autouse=True)
def _own_cache_and_threads(tmp_path, monkeypatch):
    """Caches go to tmp_path (a damaged copy must never land in the user's cache); torch threads are restored."""
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cfg(*extra: str, config: Path | None = None) -> DetectConfig:
    return load_config(DetectConfig, config, (TINY if config is None else []) + list(extra))


def _pennfudan_copy(data_root: Path, dst: Path, n: int = 10) -> Path:
    """A data root holding the first ``n`` Penn-Fudan images (with masks and boxes.json) to damage at will."""
    src = data_root / "pennfudan"
    boxes = json.loads((src / "boxes.json").read_text())
    stems = sorted(boxes)[:n]
    folder = dst / "pennfudan"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for s in stems:
        shutil.copy(src / "images" / f"{s}.jpg", folder / "images")
        shutil.copy(src / "masks" / f"{s}_mask.png", folder / "masks")
    (folder / "boxes.json").write_text(json.dumps({s: boxes[s] for s in stems}))
    return dst


def _edit_boxes(root: Path, fn) -> list[str]:
    path = root / "pennfudan" / "boxes.json"
    boxes = json.loads(path.read_text())
    fn(boxes)
    path.write_text(json.dumps(boxes))
    return sorted(boxes)


# ---------------------------------------------------------------- model pieces


def test_fpn_adapter_maps_names_and_strides():
    body = create_backbone("resnet18", features_only=True, out_indices=(2, 3, 4))
    fpn = FeaturePyramidBackbone(body, 64, "pool")
    out = fpn(torch.rand(2, 3, 128, 160))
    assert list(out) == ["0", "1", "2", "pool"] and fpn.out_channels == 64
    assert [tuple(v.shape) for v in out.values()] == [(2, 64, 16, 20), (2, 64, 8, 10), (2, 64, 4, 5), (2, 64, 2, 3)]
    assert fpn.reductions() == [8, 16, 32, 64]
    names = set(fpn.state_dict())
    assert "conv1.weight" in names and "layer4.1.bn2.running_var" in names and not any(
        n.startswith("body.") for n in names)
    assert list(FeaturePyramidBackbone(create_backbone("resnet18", features_only=True, out_indices=(2, 3, 4)),
                                       64, "p6p7")(torch.rand(1, 3, 128, 128))) == ["0", "1", "2", "p6", "p7"]
    with pytest.raises(ValueError, match="features_only"):
        FeaturePyramidBackbone(create_backbone("resnet18", num_classes=3), 64)
    # a deep copy (EMA's AveragedModel makes one) runs its own copied layers, not the original's
    import copy

    twin = copy.deepcopy(fpn)
    assert twin.body.conv1 is twin.conv1 and twin.conv1 is not fpn.conv1


def test_torchvision_resnet18_weights_file_loads_into_the_detector(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(tv.state_dict(), tmp_path / "resnet18_torchvision.pth")
    model = build_detector(DetectModel(fpn_channels=64, box_head_size=64), num_classes=1)
    loaded, skipped = load_matching_weights(model, tmp_path / "resnet18_torchvision.pth")
    assert sorted(skipped) == ["backbone.fc.bias", "backbone.fc.weight"]  # the classifier has no place here
    assert len(loaded) == len(tv.state_dict()) - 2
    own = model.state_dict()
    for k, v in tv.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[f"backbone.{k}"], v), k


def test_classification_checkpoint_transfers_and_freezes_through_the_trainer(tmp_path, data_root):
    cls = create_backbone("resnet18", num_classes=10)
    save_checkpoint({"task": "classify", "model": cls.state_dict()}, tmp_path / "classify.pt")
    root = _pennfudan_copy(data_root, tmp_path / "data", n=8)
    cfg = _cfg(f"train.init_checkpoint={tmp_path / 'classify.pt'}", "train.freeze_stages=1")
    fit(DetectTask(), cfg, tmp_path / "run", root, quiet=True)
    from cnnapps.engine.checkpoint import load_checkpoint

    after = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    # stem to layer2 (the first FPN stage) were loaded and frozen; layer3 was loaded and then trained
    for k in ("conv1.weight", "layer1.0.conv1.weight", "layer2.1.conv2.weight"):
        assert torch.equal(after[f"backbone.{k}"], cls.state_dict()[k]), k
    assert not torch.equal(after["backbone.layer3.0.conv1.weight"], cls.state_dict()["layer3.0.conv1.weight"])
    model = DetectTask().build_model(cfg, type("D", (), {"state": {"class_names": ["person"]}})())
    body, head = _stage_boundary(model, -1)
    assert set(body) == {f"backbone.{n}" for n, _ in cls.named_parameters() if not n.startswith("fc.")}
    assert any(h.startswith("backbone.fpn.") for h in head) and any(h.startswith("roi_heads.") for h in head)


def test_labels_of_overlapping_boxes_never_cover_each_other():
    from cnnapps.tasks.detect.plots import _overlap, place_labels

    # five boxes on two people, nearly on top of each other (what a weak detector gives)
    boxes = [[40, 30, 120, 230], [42, 34, 118, 226], [45, 60, 115, 200], [150, 40, 230, 235], [152, 45, 228, 230]]
    sizes = [(70, 16)] * len(boxes)
    corners = place_labels(boxes, sizes, 260, 260)
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    assert all(0 <= r[0] and r[2] <= 260 and 0 <= r[1] and r[3] <= 260 for r in rects)
    assert all(_overlap(a, b) == 0 for i, a in enumerate(rects) for b in rects[i + 1:]), rects
    assert rects[0][:2] == (40, 14)  # the best detection keeps the place above its box


def test_detection_picture_colours_each_instance_and_captions_the_rule():
    from cnnapps.tasks.detect.plots import PALETTE, draw_detections

    image = np.full((120, 160, 3), 128, np.uint8)
    det = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 100.0], [12.0, 12.0, 62.0, 98.0]]),
           "scores": torch.tensor([0.6, 0.9]), "labels": torch.tensor([1, 1]),
           "masks": torch.zeros(2, 1, 120, 160)}
    det["masks"][0, 0, 40:60, 20:40] = 1.0
    pic = np.asarray(draw_detections(image, det, ["person"], "score >= 0.5, NMS IoU 0.5"))
    assert pic.shape[1] == 160 and pic.shape[0] > 120  # a caption band below the photo
    colours = {tuple(int(c) for c in px) for px in pic[:120].reshape(-1, 3)}
    assert PALETTE[0] in colours and PALETTE[1] in colours  # two instances, two colours (best first)
    mask_px = pic[50, 30].astype(float)
    assert np.allclose(mask_px, 0.55 * 128 + 0.45 * np.asarray(PALETTE[1]), atol=1.5)  # the 0.6 one: 2nd colour
    assert (pic[125:] < 100).any()  # the caption is written


# ---------------------------------------------------------------- data on the real sets


def test_pennfudan_split_boxes_and_masks(data_root):
    task = DetectTask()
    cfg = _cfg("model.arch=maskrcnn", "model.min_size=192", "model.max_size=320", config=None)
    data = task.build_data(cfg, data_root)
    assert data.state["split_sizes"] == {"train": 89, "val": 30, "test": 51}  # TINY: 30% test, 25% of the rest val
    default = task.build_data(load_config(DetectConfig, None, ["model.min_size=192", "model.max_size=320"]),
                              data_root)
    assert default.state["split_sizes"] == {"train": 116, "val": 20, "test": 34}
    ids = [set(int(s["image_id"]) for s in ds) for ds in (default.train, default.val, default.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = task.build_data(load_config(DetectConfig, None, ["model.min_size=192", "model.max_size=320"]), data_root)
    assert [int(s["image_id"]) for s in again.test] == [int(s["image_id"]) for s in default.test]
    # boxes.json is inclusive pixel indices: FudanPed00001's first box [159, 181, 301, 430] in a 559x536 image
    rec = next(r for r in data.train.cache.records if r.key == "FudanPed00001")
    scale = min(192 / 536, 320 / 559)
    assert (rec.width, rec.height) == (round(559 * scale), round(536 * scale))
    np.testing.assert_allclose(rec.boxes[0], [159 * rec.width / 559, 181 * rec.height / 536,
                                              302 * rec.width / 559, 431 * rec.height / 536], rtol=1e-6)
    # each (resized) instance mask lies inside its box, and fills it to within a pixel
    sample = next(s for ds in (data.train, data.val, data.test) for s in ds if s["boxes"].shape[0] >= 2)
    for box, mask in zip(sample["boxes"], sample["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(extent, box, atol=1.5), (extent, box)


def test_voc_mini_splits_and_difficult_boxes(data_root):
    task = DetectTask()
    data = task.build_data(load_config(DetectConfig, None, ["data.dataset=voc_mini", "model.min_size=256",
                                                            "model.max_size=256"]), data_root)
    sizes = data.state["split_sizes"]
    assert sizes["train"] + sizes["val"] == 1500 and sizes["test"] == 500
    assert len(data.state["class_names"]) == 20
    ann = json.loads((data_root / "voc_mini/annotations.json").read_text())
    hard = {e["id"]: set(e["difficult_labels"]) for e in ann["images"] if e["difficult_labels"]}
    names = data.state["class_names"]
    checked = 0
    for ds, dropped in ((data.train, True), (data.test, False)):
        for i, j in enumerate(ds.indices[:400]):
            rec = ds.cache.records[j]
            if rec.key not in hard:
                continue
            s = ds[i]
            n_hard = sum(names[k - 1] in hard[rec.key] for k in rec.labels)
            assert n_hard > 0
            if dropped:  # training never sees difficult-only classes
                assert len(s["labels"]) == len(rec.labels) - n_hard and not s["ignore"].any()
            else:  # evaluation keeps them, flagged as ignored
                assert int(s["ignore"].sum()) == n_hard
            checked += 1
    assert checked >= 5


def test_hflip_mirrors_image_boxes_and_masks():
    img = torch.zeros(3, 10, 20, dtype=torch.uint8)
    img[:, 2:5, 1:4] = 255
    mask = (img[0] > 0).to(torch.uint8)[None]
    s = {"image": img, "boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "masks": mask, "labels": torch.tensor([1])}
    f = hflip_sample(s)
    assert f["boxes"].tolist() == [[16.0, 2.0, 19.0, 5.0]]
    ys, xs = torch.nonzero(f["masks"][0], as_tuple=True)
    assert (int(xs.min()), int(xs.max()) + 1) == (16, 19)
    assert torch.equal(f["image"][0] > 0, f["masks"][0] > 0)
    assert torch.equal(hflip_sample(f)["boxes"], s["boxes"])


# ---------------------------------------------------------------- bad input (damaged copies)


def test_unreadable_image_is_a_counted_skip(tmp_path, data_root):
    root = _pennfudan_copy(data_root, tmp_path / "data")
    stems = _edit_boxes(root, lambda b: None)
    bad = root / "pennfudan/images" / f"{stems[0]}.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    (root / "pennfudan/images" / f"{stems[1]}.jpg").write_text("not an image")
    data = DetectTask().build_data(_cfg(), root)
    assert data.skipped == {"unreadable image": 2}
    assert sum(data.state["split_sizes"].values()) == 8


def test_annotation_whose_image_is_missing_is_a_counted_skip(tmp_path, data_root):
    root = _pennfudan_copy(data_root, tmp_path / "data")
    stems = _edit_boxes(root, lambda b: None)
    (root / "pennfudan/images" / f"{stems[3]}.jpg").unlink()
    data = DetectTask().build_data(_cfg(), root)
    assert data.skipped == {"image file missing": 1}
    assert sum(data.state["split_sizes"].values()) == 9


def test_boxes_outside_the_image_are_clipped_or_skipped_and_zero_area_boxes_skipped(tmp_path, data_root, caplog):
    root = _pennfudan_copy(data_root, tmp_path / "data")

    def damage(b):
        first = sorted(b)[0]
        b[first] = b[first] + [[-20, 10, 50, 80], [5000, 10, 5050, 80], [30, 40, 29, 90]]
        # ^ partly outside (clipped), wholly outside (skipped), x2 < x1 after the +1 (zero area: skipped)

    stems = _edit_boxes(root, damage)
    original = json.loads((data_root / "pennfudan/boxes.json").read_text())[stems[0]]
    with caplog.at_level("WARNING"):
        data = DetectTask().build_data(_cfg(), root)
    assert data.skipped == {"box outside its image": 1, "box of zero area": 1}
    cache = (data.train or data.test).cache
    rec = next(r for r in cache.records if r.key == stems[0])
    assert len(rec.boxes) == len(original) + 1 and rec.boxes[-1][0] == 0.0
    assert cache.notes["boxes clipped to their image"] == 1
    assert any(stems[0] in m and "zero area" in m for m in caplog.messages)


def test_mask_of_another_size_is_an_error_naming_it(tmp_path, data_root):
    root = _pennfudan_copy(data_root, tmp_path / "data")
    stems = _edit_boxes(root, lambda b: None)
    mask_path = root / "pennfudan/masks" / f"{stems[2]}_mask.png"
    with Image.open(mask_path) as m:
        m.resize((m.width // 2, m.height // 2), Image.NEAREST).save(mask_path)
    with pytest.raises(MaskSizeError, match=f"{stems[2]}_mask.png: mask is .* but its image is"):
        DetectTask().build_data(_cfg("model.arch=maskrcnn"), root)
    DetectTask().build_data(_cfg(), root)  # boxes only: the mask is not read


def test_image_without_objects_is_kept_as_a_negative_and_trains(tmp_path, data_root):
    root = _pennfudan_copy(data_root, tmp_path / "data", n=6)

    def empty_all(b):
        for k in b:
            b[k] = []

    stems = _edit_boxes(root, empty_all)
    for s in stems:  # masks must agree with the (empty) box lists
        p = root / "pennfudan/masks" / f"{s}_mask.png"
        with Image.open(p) as m:
            Image.new("L", m.size, 0).save(p)
    task = DetectTask()
    for arch in ("fasterrcnn", "maskrcnn", "fcos"):
        cfg = _cfg(f"model.arch={arch}")
        data = task.build_data(cfg, root)
        assert data.skipped == {}
        assert data.train.cache.notes["images without objects (kept as negatives)"] == 6
        batch = collate_detection([data.train[0], data.train[1]])
        assert batch[0]["boxes"].shape == (0, 4)
        model = task.build_model(cfg, data).train()
        out = task.step(model, batch, cfg)
        assert torch.isfinite(out["loss"]), arch


def test_coco_folder_categories_crowds_polygons_and_errors(tmp_path, data_root):
    src = data_root / "pennfudan"
    folder = tmp_path / "coco"
    (folder / "imgs").mkdir(parents=True)
    boxes = json.loads((src / "boxes.json").read_text())
    stems = sorted(boxes)[:6]
    images, anns = [], []
    for i, s in enumerate(stems):
        shutil.copy(src / "images" / f"{s}.jpg", folder / "imgs")
        with Image.open(src / "images" / f"{s}.jpg") as im:
            w, h = im.size
        images.append({"id": 100 + i, "file_name": f"imgs/{s}.jpg", "width": w, "height": h})
        for j, (x1, y1, x2, y2) in enumerate(boxes[s]):
            poly = [x1, y1, x2 + 1, y1, x2 + 1, y2 + 1, x1, y2 + 1]
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 7 if j else 3,
                         "bbox": [x1, y1, x2 + 1 - x1, y2 + 1 - y1], "iscrowd": int(i == 0 and j == 0),
                         "segmentation": [poly]})
    anns.append({"id": 999, "image_id": 12345, "category_id": 3, "bbox": [0, 0, 5, 5]})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 7, "name": "second"}, {"id": 3, "name": "first"}]}
    (folder / "instances.json").write_text(json.dumps(doc))
    cfg = _cfg("data.dataset=coco", f"data.annotations={folder / 'instances.json'}", "model.arch=maskrcnn")
    data = DetectTask().build_data(cfg, tmp_path)
    assert data.state["class_names"] == ["first", "second"]
    assert data.skipped == {"annotation of an image id not in 'images'": 1}
    cache = (data.train or data.test).cache
    first = next(r for r in cache.records if r.key == "100")
    assert first.ignore[0] == 1 and first.labels[:2] == [1, 2][: len(first.labels)]
    sample = next(s for ds in (data.train, data.val, data.test) if ds for s in ds if s["masks"].shape[0])
    assert sample["masks"].shape[1:] == sample["image"].shape[1:] and sample["masks"].sum() > 0

    (folder / "broken.json").write_text("{not json")
    with pytest.raises(DetectionDataError, match="broken.json: not valid JSON"):
        DetectTask().build_data(_cfg("data.dataset=coco", f"data.annotations={folder / 'broken.json'}"), tmp_path)
    doc["images"][1]["width"] += 10  # the JSON's size (which places the polygons) disagrees with the file
    (folder / "resized.json").write_text(json.dumps(doc))
    with pytest.raises(DetectionDataError, match=rf"{stems[1]}.jpg: annotated size .* differs"):
        DetectTask().build_data(_cfg("data.dataset=coco", f"data.annotations={folder / 'resized.json'}",
                                     "model.arch=maskrcnn"), tmp_path)


# ---------------------------------------------------------------- the task through the engine and the CLI


def test_fit_evaluate_and_predict_through_the_cli(tmp_path, data_root):
    root = _pennfudan_copy(data_root, tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data-dir", str(root), "--out", str(run), "--quiet"] + [a for s in TINY for a in ("--set", s)]
    assert main("detect", args) == 0
    for name in ("metrics.json", "metrics.jsonl", "checkpoints/best.pt", "pr_curves.png", "curves.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"ap", "ap50", "ap75", "ap_person", "images"} <= set(metrics) and metrics["images"] == 3
    # a detector in eval mode computes no loss: none is reported (metrics.json) or logged per epoch
    assert "loss" not in metrics and isinstance(metrics["images"], int)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs and not any("val_loss" in row for row in epochs) and all("train_loss" in row for row in epochs)
    assert main("detect", ["evaluate", "--checkpoint", str(run / "checkpoints/best.pt"), "--data-dir", str(root),
                           "--quiet"]) == 0
    image = root / "pennfudan/images" / f"{sorted(json.loads((root / 'pennfudan/boxes.json').read_text()))[0]}.jpg"
    junk = tmp_path / "junk.jpg"
    junk.write_text("no")
    out_dir = tmp_path / "pictures"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main("detect", ["predict", "--checkpoint", str(run / "checkpoints/best.pt"), str(image), str(junk),
                                 "--out", str(out_dir), "--score-threshold", "0.0", "--quiet"])
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert status == 1 and len(rows) == 2  # one input failed
    assert "junk.jpg" in rows[1]["error"]
    picture = Path(rows[0]["picture"])
    assert rows[0]["input"] == str(image) and "picture" not in rows[1]
    with Image.open(picture) as im, Image.open(image) as orig:  # the photo, with the caption in a band below
        assert im.format == "PNG" and im.width == orig.width and im.height > orig.height
    for d in rows[0]["detections"]:
        assert d["label"] == "person" and 0.0 <= d["score"] <= 1.0 and len(d["box"]) == 4
        assert 0 <= d["box"][0] <= d["box"][2] <= orig.size[0]


def test_maskrcnn_and_fcos_report_their_metrics(tmp_path, data_root):
    root = _pennfudan_copy(data_root, tmp_path / "data", n=8)
    res = fit(DetectTask(), _cfg("model.arch=maskrcnn"), tmp_path / "mask", root, quiet=True)
    assert {"mask_ap", "mask_ap50", "mask_ap75", "ap50"} <= set(res.test_metrics)
    res = fit(DetectTask(), _cfg("model.arch=fcos"), tmp_path / "fcos", root, quiet=True)
    assert "ap50" in res.test_metrics and "mask_ap" not in res.test_metrics


def whole_image_baseline(dataset) -> dict[str, float]:
    """Metrics of a predictor that answers every image with one box covering all of it, score 1."""
    metric = DetectionMetrics(["person"])
    for s in dataset:
        h, w = s["image"].shape[-2:]
        metric.update([{"boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]]), "scores": torch.tensor([1.0]),
                        "labels": torch.tensor([1])}], [s])
    return metric.compute()


@pytest.mark.slow
def test_ci_config_beats_the_whole_image_baseline_on_pennfudan(tmp_path, data_root, meets_floor):
    # The CI benchmark itself (its shipped ci config), on one thread so a busy shared machine does not stall it.
    cfg = ci_config(DetectTask(), "train.threads=1")
    task = DetectTask()
    result = fit(task, cfg, tmp_path / "run", data_root, quiet=True)
    baseline = whole_image_baseline(task.build_data(cfg, data_root).test)
    assert result.test_metrics["images"] == 34
    assert result.test_metrics["ap50"] > baseline["ap50"] + 0.1, (result.test_metrics, baseline)
    meets_floor("detect", result.test_metrics)
