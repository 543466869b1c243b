"""COCO-style detection metrics against cases small enough to compute by hand (101-point interpolated AP)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnapps.metrics.detection import DetectionMetrics, ImageDetections, ImageTruth, coco_evaluate, masks_to_rles


def truth(boxes, labels, ignore=None, size=(200, 200)) -> ImageTruth:
    n = len(labels)
    return ImageTruth(size[0], size[1], np.array(boxes, float).reshape(-1, 4), np.array(labels, int),
                      np.array(ignore if ignore is not None else [0] * n, bool))


def dets(boxes, scores, labels) -> ImageDetections:
    return ImageDetections(np.array(boxes, float).reshape(-1, 4), np.array(scores, float), np.array(labels, int))


GT = [[0, 0, 100, 100]]


def test_one_true_positive_at_iou_062():
    # IoU = 62 / 100: a match at thresholds 0.50, 0.55, 0.60 of the ten 0.50:0.05:0.95, a miss at the other seven.
    v = coco_evaluate([truth(GT, [1])], [dets([[0, 0, 100, 62]], [0.9], [1])], ["person"]).values
    assert v["ap50"] == pytest.approx(1.0)
    assert v["ap75"] == pytest.approx(0.0)
    assert v["ap"] == pytest.approx(0.3)
    assert v["ap_person"] == pytest.approx(0.3) and v["ap_50_person"] == pytest.approx(1.0)


def test_false_positive_ranked_first_halves_precision():
    # The higher-scored detection misses (precision 0 at rank 1); the second hits with IoU 0.78 (precision 1/2 at
    # recall 1), so the interpolated precision is 0.5 at every recall point: AP50 = AP75 = 0.5, and AP = 0.5 x 6/10
    # (0.78 clears the thresholds 0.50 ... 0.75).
    v = coco_evaluate([truth(GT, [1])], [dets([[150, 150, 190, 190], [0, 0, 100, 78]], [0.9, 0.8], [1, 1])],
                      ["person"]).values
    assert v["ap50"] == pytest.approx(0.5)
    assert v["ap75"] == pytest.approx(0.5)
    assert v["ap"] == pytest.approx(0.3)


def test_half_recall_uses_101_point_interpolation():
    # One of two objects found with precision 1: precision 1 at the 51 recall points 0.00 ... 0.50, 0 beyond.
    v = coco_evaluate([truth([[0, 0, 100, 100], [100, 100, 200, 200]], [1, 1])],
                      [dets([[0, 0, 100, 100]], [0.9], [1])], ["person"]).values
    assert v["ap50"] == pytest.approx(51 / 101)
    assert v["ar100"] == pytest.approx(0.5)


def test_ignored_object_neither_matches_nor_misses():
    # A detection on an ignored (difficult / crowd) object is not a false positive, and the object is not a miss.
    gts = [truth([[0, 0, 100, 100], [100, 100, 200, 200]], [1, 1], ignore=[0, 1])]
    d = [dets([[100, 100, 200, 200], [0, 0, 100, 100]], [0.9, 0.8], [1, 1])]
    assert coco_evaluate(gts, d, ["person"]).values["ap50"] == pytest.approx(1.0)
    gts_plain = [truth([[0, 0, 100, 100], [100, 100, 200, 200]], [1, 1])]
    assert coco_evaluate(gts_plain, [dets([[0, 0, 100, 100]], [0.8], [1])], ["person"]).values["ap50"] < 0.51


def test_per_class_ap_and_classes_without_truth():
    # Class "cat" is found perfectly; "dog" is predicted on the cat (a wrong label cannot match); "bird" has no
    # ground truth anywhere, so its AP is undefined and left out.
    gts = [truth([[0, 0, 100, 100], [100, 100, 200, 200]], [1, 2])]
    d = [dets([[0, 0, 100, 100], [0, 0, 100, 100]], [0.9, 0.9], [1, 2])]
    v = coco_evaluate(gts, d, ["cat", "dog", "bird"]).values
    assert v["ap_50_cat"] == pytest.approx(1.0)
    assert v["ap_50_dog"] == pytest.approx(0.0)
    assert "ap_bird" not in v
    assert v["ap50"] == pytest.approx(0.5)  # the mean over the classes with ground truth


def test_no_detections_and_no_truth_give_zero_not_minus_one():
    v = coco_evaluate([truth(GT, [1])], [dets([], [], [])], ["person"]).values
    assert v["ap"] == 0.0 and v["ap50"] == 0.0
    v = coco_evaluate([truth([], [])], [dets([[0, 0, 10, 10]], [0.5], [1])], ["person"]).values
    assert v["ap50"] == 0.0 and "ap_person" not in v


def test_pycocotools_prints_nothing(capsys):
    coco_evaluate([truth(GT, [1])], [dets([[0, 0, 100, 62]], [0.9], [1])], ["person"])
    assert capsys.readouterr().out == ""


def _square(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def test_metric_object_with_torch_batches_and_masks():
    # The engine hands the metric torchvision's output and the batch (a list of sample dicts). The box matches
    # exactly; the mask covers 62% of the object's mask, so mask AP50 = 1 and mask AP75 = 0.
    h, w = 120, 160
    sample = {"image": torch.zeros(3, h, w, dtype=torch.uint8), "boxes": torch.tensor([[10.0, 10.0, 110.0, 110.0]]),
              "labels": torch.tensor([1]), "ignore": torch.tensor([False]),
              "masks": _square(h, w, 10, 10, 110, 110)[None]}
    prob = _square(h, w, 10, 10, 110, 72).float()[None, None] * 0.9  # (1, 1, H, W) probabilities
    output = [{"boxes": torch.tensor([[10.0, 10.0, 110.0, 110.0]]), "scores": torch.tensor([0.8]),
               "labels": torch.tensor([1]), "masks": prob}]
    metric = DetectionMetrics(["person"], masks=True)
    metric.update(output, [sample])
    v = metric.compute()
    assert v["ap"] == pytest.approx(1.0)
    assert v["mask_ap50"] == pytest.approx(1.0) and v["mask_ap75"] == pytest.approx(0.0)
    assert v["mask_ap"] == pytest.approx(0.3)
    assert (v["images"], v["gt_boxes"], v["detections"]) == (1, 1, 1)
    assert metric.artifacts()["precision"].shape == (10, 101, 1)
    metric.reset()
    assert metric.compute()["images"] == 0


def test_masks_to_rles_thresholds_probabilities():
    probs = torch.tensor([[[0.2, 0.7], [0.9, 0.4]]])
    from pycocotools import mask as mask_utils

    assert mask_utils.decode(masks_to_rles(probs)).squeeze(-1).tolist() == [[0, 1], [1, 0]]
    assert masks_to_rles(torch.zeros(0, 4, 4)) == []
