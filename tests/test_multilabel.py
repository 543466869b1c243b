"""Multi-label task on real VOC-mini: masked losses and metrics, thresholds chosen on validation and saved with the
checkpoint, a fit that beats the label-frequency predictor, predict/evaluate through the CLI, a user's labels CSV,
and bad input (missing or unreadable images, unknown labels) as counted skips or errors naming the file."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from cnnapps.engine.checkpoint import load_checkpoint
from cnnapps.engine.config import load_config
from cnnapps.engine.trainer import fit
from cnnapps.metrics.multilabel import MultiLabelMetrics, best_f1_thresholds, masked_average_precision
from cnnapps.tasks.cli import main
from cnnapps.tasks.multilabel.model import balanced_pos_weight, multilabel_loss
from cnnapps.tasks.multilabel.task import MultiLabelConfig, MultiLabelTask
from conftest import ci_config, read_eval


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # caches of damaged copies must never land in the user's cache
    monkeypatch.setenv("CNNAPPS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(*overrides: str) -> MultiLabelConfig:
    return load_config(MultiLabelConfig, None, list(overrides))


# ---------------------------------------------------------------- losses and metrics (no data)


def test_masked_labels_change_neither_loss_nor_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    mask = torch.ones(4, 3)
    mask[0, 2] = 0.0
    for kind in ("bce", "focal", "asl"):
        loss = multilabel_loss(logits, y, mask, kind)
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad[0, 2] == 0 and grad.abs().sum() > 0, kind
        flipped = y.clone()
        flipped[0, 2] = 1 - flipped[0, 2]  # the ignored label's value cannot matter
        assert torch.allclose(loss, multilabel_loss(logits, flipped, mask, kind)), kind
    with pytest.raises(ValueError, match="unknown multi-label loss 'hinge'"):
        multilabel_loss(logits, y, mask, "hinge")


def test_balanced_pos_weight_is_negatives_over_positives_clipped():
    y = torch.tensor([[1, 0], [0, 0], [0, 0], [0, 1]], dtype=torch.float32).repeat(10, 1)
    w = balanced_pos_weight(y, torch.ones_like(y), max_weight=2.0)
    assert w == [2.0, 2.0]
    assert balanced_pos_weight(y, torch.ones_like(y), max_weight=10.0) == [3.0, 3.0]


def test_thresholds_maximise_f1_and_ap_skips_masked_rows():
    probs = np.array([[0.9], [0.8], [0.35], [0.3], [0.1]])
    y = np.array([[1], [1], [1], [0], [0]], float)
    mask = np.ones_like(y)
    assert best_f1_thresholds(probs, y, mask)[0] == pytest.approx(0.35)  # all three positives, no negative
    mask[2, 0] = 0.0  # drop the 0.35 positive: the best cut is now at 0.8
    assert best_f1_thresholds(probs, y, mask)[0] == pytest.approx(0.8)
    keep = mask[:, 0] > 0
    assert masked_average_precision(probs, y, mask)[0] == pytest.approx(
        average_precision_score(y[keep, 0], probs[keep, 0]))
    assert np.isnan(masked_average_precision(probs, np.zeros_like(y), mask)[0])  # no positive: undefined


def test_calibration_rows_choose_thresholds_and_are_not_scored():
    metric = MultiLabelMetrics(["a", "b"])
    logit = torch.logit(torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.1], [0.8, 0.9]]))
    y = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.float32)
    metric.update(logit[:2], {"y": y[:2], "mask": torch.ones(2, 2), "calib": torch.tensor([True, True])})
    metric.update(logit[2:], {"y": y[2:], "mask": torch.ones(2, 2), "calib": torch.tensor([False, False])})
    values = metric.compute()
    assert metric.calibrated == pytest.approx([0.6, 0.7])  # F1 = 1 on the two calibration rows
    assert values["examples"] == 2  # scored on the other two rows only
    # a later pass without calibration rows scores with the thresholds that come with the model's outputs
    metric.reset()
    metric.update({"logits": logit[2:], "thresholds": torch.tensor([0.6, 0.7])}, {"y": y[2:], "mask": torch.ones(2, 2)})
    again = metric.compute()
    assert metric.thresholds() == pytest.approx([0.6, 0.7]) and again["micro_f1"] == values["micro_f1"]
    # constant scores: AP equals the prevalence
    metric.reset()
    metric.update(torch.zeros(4, 2), {"y": y, "mask": torch.ones(4, 2)})
    assert metric.compute()["constant_predictor_mAP"] == pytest.approx(0.5)


# ---------------------------------------------------------------- real data


def test_voc_mini_splits_and_difficult_labels_are_masked(data_root):
    data = MultiLabelTask().build_data(_cfg("data.image_size=32"), data_root)
    assert len(data.state["class_names"]) == 20 and data.skipped == {}
    sizes = data.state["split_sizes"]
    assert sizes == {"train": 1275, "val": 225, "test": 500}
    assert len(data.test) == 500 and bool(data.val.calib.all())  # validation images calibrate the thresholds
    ann = json.loads((data_root / "voc_mini" / "annotations.json").read_text())
    difficult = sum(1 for im in ann["images"] if im["split"] == "trainval" and
                    set(im["difficult_labels"]) - set(im["labels"]))
    masked = int((data.train.mask == 0).any(1).sum()) + int((data.val.mask == 0).any(1).sum())
    assert masked == difficult > 0
    item = data.train[0]
    assert item["x"].shape == (3, 32, 32) and item["x"].dtype == torch.uint8 and item["y"].shape == (20,)
    assert 0.3 < data.state["label_freq"][data.state["class_names"].index("person")] < 0.45


def test_build_data_uses_the_checkpoints_preprocessing(data_root):
    state = {"class_names": ["wrong"] * 20, "image_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3}
    with pytest.raises(ValueError, match="differ from the checkpoint's"):
        MultiLabelTask().build_data(_cfg(), data_root, state=state)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("multilabel") / "run"
    result = fit(MultiLabelTask(), ci_config(MultiLabelTask()), run, data_root, quiet=True)
    return run, result


@pytest.mark.slow
def test_fit_beats_the_label_frequency_predictor(fitted, data_root, meets_floor):
    run, result = fitted
    data = MultiLabelTask().build_data(ci_config(MultiLabelTask()), data_root)
    train_y = (data.train.targets * data.train.mask).numpy()
    freq = train_y.sum(0) / data.train.mask.numpy().sum(0)
    test_ds = data.test
    y, mask = test_ds.targets.numpy(), test_ds.mask.numpy()
    baseline = np.nanmean(masked_average_precision(np.tile(freq, (len(y), 1)), y, mask))
    m_ap = result.test_metrics["mAP"]
    assert result.test_metrics["examples"] == 500
    assert m_ap > baseline + 0.05, (m_ap, baseline)
    assert result.test_metrics["constant_predictor_mAP"] == pytest.approx(baseline)
    meets_floor("multilabel", result.test_metrics)
    for name in ("ap_per_class.png", "thresholds.json", "curves.png", "checkpoints/best.pt"):
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_saved_thresholds_are_the_best_epochs_and_predict_uses_them(fitted, data_root, tmp_path, capsys):
    run, _ = fitted
    ck = load_checkpoint(run / "checkpoints" / "best.pt")
    saved = ck["model"]["thresholds"].tolist()
    names = ck["data_state"]["class_names"]
    assert saved != [0.5] * len(names)  # calibrated on validation, kept in the model's weights
    last = load_checkpoint(run / "checkpoints" / "last.pt")["model"]["thresholds"].tolist()
    assert (ck["epoch"] == load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]) == (saved == last)
    used = json.loads((run / "thresholds.json").read_text())["thresholds"]
    assert [used[n] for n in names] == pytest.approx(saved, abs=1e-4)  # test pass used the best epoch's

    images = sorted((data_root / "voc_mini" / "JPEGImages").glob("*.jpg"))[:3]
    picture = tmp_path / "pred.png"
    assert main("multilabel", ["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(images[0]),
                               "--out", str(picture), "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert picture.is_file() and row["picture"] == str(picture)
    # exactly the labels at or above their saved threshold, highest probability first
    model_probs = dict(zip(names, _probabilities(run, images[0])))
    expected = [n for n in names if model_probs[n] >= saved[names.index(n)]]
    assert sorted(row["labels"]) == sorted(expected)
    assert list(row["labels"].values()) == sorted(row["labels"].values(), reverse=True)

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    assert main("multilabel", ["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(bad),
                               str(images[1]), "--quiet"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert "broken.jpg" in rows[0]["error"] and "labels" in rows[1]


def _probabilities(run, image_path) -> list[float]:
    from cnnapps.data.images import read_image, resize_image
    from cnnapps.engine.trainer import model_from_checkpoint

    model, _, state = model_from_checkpoint(MultiLabelTask(), run / "checkpoints" / "best.pt")
    img = resize_image(read_image(image_path), int(state["image_size"]))
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    with torch.inference_mode():
        return torch.sigmoid(model(model.prepare(x)))[0].tolist()


@pytest.mark.slow
def test_evaluate_a_checkpoint_keeps_its_thresholds(fitted, data_root, tmp_path, capsys):
    run, result = fitted
    out = tmp_path / "eval"
    assert main("multilabel", ["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--data-dir",
                               str(data_root), "--out", str(out), "--quiet"]) == 0
    values = read_eval(out)
    assert values["examples"] == 500 and isinstance(values["examples"], int)
    assert values["mAP"] == pytest.approx(result.test_metrics["mAP"], abs=1e-6)
    assert values["micro_f1"] == pytest.approx(result.test_metrics["micro_f1"], abs=1e-6)


# ---------------------------------------------------------------- bad input and a user's folder


def _voc_copy(data_root, dest, n_trainval=40, n_test=12):
    """A small VOC-mini with the real layout: the first images of each split, annotations trimmed to them."""
    src = data_root / "voc_mini"
    ann = json.loads((src / "annotations.json").read_text())
    ids = {s: (src / "splits" / f"{s}.txt").read_text().split() for s in ("trainval", "test")}
    keep = {"trainval": ids["trainval"][:n_trainval], "test": ids["test"][:n_test]}
    (dest / "voc_mini" / "splits").mkdir(parents=True)
    (dest / "voc_mini" / "JPEGImages").mkdir()
    wanted = set(keep["trainval"]) | set(keep["test"])
    ann["images"] = [im for im in ann["images"] if im["id"] in wanted]
    for im in ann["images"]:
        shutil.copy(src / im["file"], dest / "voc_mini" / im["file"])
    (dest / "voc_mini" / "annotations.json").write_text(json.dumps(ann))
    for s, lst in keep.items():
        (dest / "voc_mini" / "splits" / f"{s}.txt").write_text("\n".join(lst) + "\n")
    return dest, ann


def _val_images(data) -> set[bytes]:
    return {data.val.images[r].tobytes() for r in data.val.rows}


def test_missing_and_unreadable_images_are_counted_skips_naming_the_file(tmp_path, data_root, caplog):
    root, ann = _voc_copy(data_root, tmp_path)
    intact = _val_images(MultiLabelTask().build_data(_cfg("data.image_size=32", "data.val_fraction=0.5"), root))
    missing = root / "voc_mini" / ann["images"][0]["file"]
    missing.unlink()
    broken = root / "voc_mini" / ann["images"][1]["file"]
    broken.write_bytes(broken.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        data = MultiLabelTask().build_data(_cfg("data.image_size=32"), root)
    assert data.skipped == {"annotation names a missing image": 1, "unreadable image": 1}
    assert missing.name in caplog.text and broken.name in caplog.text
    assert sum(data.state["split_sizes"].values()) == 40 + 12 - 2
    # the damaged files leave every other image in its split
    damaged = _val_images(MultiLabelTask().build_data(_cfg("data.image_size=32", "data.val_fraction=0.5"), root))
    assert damaged <= intact and len(intact - damaged) <= 2


def test_unknown_label_and_orphan_split_ids(tmp_path, data_root, caplog):
    root, ann = _voc_copy(data_root, tmp_path)
    split = root / "voc_mini" / "splits" / "test.txt"
    split.write_text(split.read_text() + "999999\n")
    with caplog.at_level(logging.WARNING):
        data = MultiLabelTask().build_data(_cfg("data.image_size=32"), root)
    assert data.skipped == {"split list names an image without annotation": 1} and "999999" in caplog.text
    ann["images"][3]["labels"].append("unicorn")
    (root / "voc_mini" / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=f"image {ann['images'][3]['id']} has unknown label 'unicorn'"):
        MultiLabelTask().build_data(_cfg("data.image_size=32"), root)


def test_a_user_folder_with_a_labels_csv(tmp_path, data_root):
    root, ann = _voc_copy(data_root, tmp_path / "src")
    folder = tmp_path / "mine"
    folder.mkdir()
    lines = ["file,labels"]
    for im in ann["images"]:
        shutil.copy(root / "voc_mini" / im["file"], folder / f"{im['id']}.jpg")
        lines.append(f"{im['id']}.jpg,{';'.join(im['labels'])}")
    lines.append("absent.jpg,dog")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    cfg = _cfg("data.dataset=folder", f"data.path={folder}", "data.image_size=32", "data.test_fraction=0.25")
    data = MultiLabelTask().build_data(cfg, tmp_path)
    assert data.skipped == {"annotation names a missing image": 1}
    assert data.state["class_names"] == sorted({lb for im in ann["images"] for lb in im["labels"]} | {"dog"})
    sizes = data.state["split_sizes"]
    assert sizes["test"] == round(52 * 0.25) and sum(sizes.values()) == 52
    # a model trained on the folder evaluates every readable row of it (evaluate --split all)
    fit(MultiLabelTask(), load_config(MultiLabelConfig, None, [
        "data.dataset=folder", f"data.path={folder}", "data.image_size=32", "train.epochs=1",
        "train.max_steps_per_epoch=1"]), tmp_path / "run", tmp_path, quiet=True)
    assert main("multilabel", ["evaluate", "--checkpoint", str(tmp_path / "run/checkpoints/best.pt"), "--split", "all",
                               "--data-dir", str(folder), "--out", str(tmp_path / "all"), "--quiet"]) == 0
    values = read_eval(tmp_path / "all")
    assert values["examples"] == 52 and values["skipped: annotation names a missing image"] == 1
    # with a checkpoint's classes, a label outside them names the CSV line
    (folder / "labels.csv").write_text("file,labels\n" + f"{ann['images'][0]['id']}.jpg,dog;unicorn\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: unknown label 'unicorn'"):
        MultiLabelTask().build_data(cfg, tmp_path, state=dict(data.state), split="all")
    (folder / "labels.csv").write_text("name,classes\nx.jpg,dog\n")
    with pytest.raises(ValueError, match="labels.csv: header must name the columns 'file' and 'labels'"):
        MultiLabelTask().build_data(cfg, tmp_path)
