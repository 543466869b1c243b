"""ECG metrics on small hand-computed cases: challenge F1 (mean probability and majority vote), sequence- and
set-level F1, padding ignored, windows of one record put back together (per-beat scores: test_ecg_beats.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnapps.tasks.ecg.data import IGNORE
from cnnapps.tasks.ecg.metrics import ECGMetrics, metric_key

CINC = ["N", "A", "O", "~"]


def _logits(rows: list[list[float]], classes: int, pad_to: int = 0) -> torch.Tensor:
    """Per-step probability rows -> logits (1, classes, steps); padding steps get logits favouring class 3."""
    p = np.array(rows, dtype=np.float64)
    if pad_to > len(rows):
        junk = np.tile(np.eye(classes)[classes - 1] * 0.97 + 0.01, (pad_to - len(rows), 1))
        p = np.concatenate([p, junk])
    return torch.tensor(np.log(p).T[None], dtype=torch.float32)


def _batch(y: list[int], record: int, offset: int, length: int, pad_to: int = 0) -> dict[str, torch.Tensor]:
    y = list(y) + [IGNORE] * max(0, pad_to - len(y))
    return {"y": torch.tensor([y]), "record": torch.tensor([record]), "offset": torch.tensor([offset]),
            "length": torch.tensor([length])}


def _one_hot(c: int, k: int = 4, p: float = 0.9) -> list[float]:
    row = [(1 - p) / (k - 1)] * k
    row[c] = p
    return row


N, A, O = 0, 1, 2


def _toy_cinc() -> ECGMetrics:
    """Record 0: N, predicted N N. Record 1: A over two windows, predicted A A | N. Record 2: O, predicted N N.
    Every window carries padding steps whose (ignored) logits scream '~'."""
    m = ECGMetrics(CINC, target="record")
    m.update(_logits([_one_hot(N), _one_hot(N)], 4, pad_to=5), _batch([N, N], 0, 0, 512, pad_to=5))
    m.update(_logits([_one_hot(A), _one_hot(A)], 4), _batch([A, A], 1, 0, 512))
    m.update(_logits([_one_hot(N, p=0.5)], 4, pad_to=3), _batch([A], 1, 2, 256, pad_to=3))
    m.update(_logits([_one_hot(N), _one_hot(N)], 4, pad_to=4), _batch([O, O], 2, 0, 512, pad_to=4))
    return m


def test_challenge_f1_record_level_by_mean_probability():
    v = _toy_cinc().compute()
    # records: truth N, A, O; predicted N, A, N -> F1_N = 2/3, F1_A = 1, F1_O = 0, F1_~ = 0 (absent)
    assert v["f1_N"] == pytest.approx(2 / 3)
    assert v["f1_A"] == pytest.approx(1.0)
    assert v["f1_O"] == pytest.approx(0.0)
    assert v["f1_noise"] == pytest.approx(0.0)
    assert v["challenge_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert v["accuracy"] == pytest.approx(2 / 3)


def test_sequence_and_set_f1_hand_computed():
    v = _toy_cinc().compute()
    # steps: truth N N | A A A | O O, predicted N N | A A N | N N (padding steps ignored)
    # F1_N = 4/7 (TP 2, FP 3), F1_A = 4/5 (TP 2, FN 1), F1_O = 0; weights 2/7, 3/7, 2/7
    assert v["seq_f1_N"] == pytest.approx(4 / 7)
    assert v["seq_f1_A"] == pytest.approx(4 / 5)
    assert v["seq_f1"] == pytest.approx(2 / 7 * 4 / 7 + 3 / 7 * 4 / 5)
    assert v["seq_accuracy"] == pytest.approx(4 / 7)
    # sets per record: {N} vs {N}; {A} vs {A, N}; {O} vs {N} -> F1_N = 1/2, F1_A = 1, F1_O = 0, equal support
    assert v["set_f1"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_majority_vote_differs_from_mean_probability():
    m = ECGMetrics(CINC, target="record")
    weak_a = [0.35, 0.40, 0.24, 0.01]
    strong_n = [0.97, 0.01, 0.01, 0.01]
    m.update(_logits([weak_a, weak_a, strong_n], 4), _batch([A, A, A], 7, 0, 768))
    v = m.compute()
    # mean probability: N (0.557) beats A (0.27); the vote is A 2 : N 1
    assert v["accuracy"] == 0.0 and v["f1_A"] == 0.0
    assert v["challenge_f1_majority"] == pytest.approx(1 / 3)  # F1_A = 1, N and O absent -> 0


def test_windows_of_one_record_aggregate_and_repeats_count_once():
    m = _toy_cinc()
    before = m.compute()
    # DistributedSampler pads by repeating examples: the same (record, offset) must not count twice
    m.update(_logits([_one_hot(N), _one_hot(N)], 4), _batch([O, O], 2, 0, 512))
    assert m.compute() == before
    art = m.artifacts()
    assert art["classes"] == CINC
    assert art["confusion"].sum() == 3  # three records
    assert art["seq_confusion"].sum() == 7  # seven labelled steps, no padding
    assert list(art["record_steps"][1]) == [A, A, N]  # windows in offset order
    m.reset()
    assert m.compute()["seq_f1"] == 0.0


def test_valid_steps_follow_the_length_not_the_labels():
    """Mean probability uses steps whose centre is real signal, even where labels are absent."""
    m = ECGMetrics(CINC, target="record")
    # 3 steps, length 300 samples: only step 0 (centre 128) and step 1 (centre 384 >= 300: no) ... -> 1 valid
    m.update(_logits([_one_hot(A), _one_hot(N), _one_hot(N)], 4), _batch([A, IGNORE, IGNORE], 0, 0, 300))
    assert m.compute()["accuracy"] == 1.0


def test_rhythm_target_has_sequence_metrics_only():
    m = ECGMetrics(["N", "AFIB"], target="rhythm")
    m.update(_logits([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], 2), _batch([0, 1, 1], 3, 0, 768))
    v = m.compute()
    assert "challenge_f1" not in v
    assert v["accuracy"] == pytest.approx(2 / 3)
    # F1_N = 2/3 (TP 1, FP 1), F1_AFIB = 2/3 (TP 1, FN 1); weights 1/3, 2/3
    assert v["seq_f1"] == pytest.approx(2 / 3)
    assert v["set_f1"] == pytest.approx(1.0)  # both classes present and both predicted


def test_metric_key_names():
    assert metric_key("~") == "noise"
    assert metric_key("AFIB") == "AFIB"
    assert metric_key("(SVTA") == "SVTA"


# ---------------------------------------------------------------- intervals, ranking scores, macro F1


def test_bootstrap_interval_matches_a_direct_resampling():
    """The vectorised interval equals scikit-learn's F1 on each resample drawn the same way."""
    from sklearn.metrics import f1_score

    from cnnapps.tasks.ecg.metrics import bootstrap_f1_interval

    rng = np.random.default_rng(3)
    true = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.7, true, rng.integers(0, 4, 60))
    low, high = bootstrap_f1_interval(true, pred, [0, 1, 2], n_boot=200, seed=5)
    counts = np.random.default_rng(5).multinomial(60, np.full(60, 1 / 60), size=200)
    scores = []
    for c in counts:
        idx = np.repeat(np.arange(60), c)
        scores.append(f1_score(true[idx], pred[idx], labels=[0, 1, 2], average=None, zero_division=0).mean())
    assert (low, high) == pytest.approx(tuple(np.quantile(scores, [0.025, 0.975])))
    point = f1_score(true, pred, labels=[0, 1, 2], average=None, zero_division=0).mean()
    assert low < point < high
    assert bootstrap_f1_interval(true, true, [0, 1, 2]) == (1.0, 1.0)  # perfect predictions: no spread


def test_auroc_and_auprc_hand_computed():
    from cnnapps.tasks.ecg.metrics import ranking_scores

    true = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    v = ranking_scores(true, probs, ["N", "A"])
    # class A: positives score 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered right
    assert v["auroc_A"] == pytest.approx(0.75)
    # ranked 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): precision 1 at recall 1/2, 2/3 at recall 1
    assert v["auprc_A"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert v["auroc_N"] == pytest.approx(0.75) and v["auroc_macro"] == pytest.approx(0.75)
    assert "auroc_O" not in ranking_scores(true, probs, ["N", "A"])
    # a class absent from the truth has no curve: left out, not scored 0.5
    assert "auroc_A" not in ranking_scores(np.array([0, 0]), probs[:2], ["N", "A"])


def test_record_target_reports_interval_and_ranking_scores():
    v = _toy_cinc().compute()
    assert v["challenge_f1_ci_low"] <= v["challenge_f1"] <= v["challenge_f1_ci_high"]
    # records N (p_A 0.033), A (mean p_A 0.72), O (p_A 0.033): A ranked first -> AUROC 1
    assert v["auroc_A"] == pytest.approx(1.0) and v["auprc_A"] == pytest.approx(1.0)
    assert "auroc_noise" not in v  # no noisy record


def test_macro_sequence_f1_is_the_plain_mean_over_classes_present():
    m = ECGMetrics(["N", "AFIB", "VT"], target="rhythm")
    m.update(_logits([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]], 3),
             _batch([0, 1, 1, 0], 3, 0, 1024))
    v = m.compute()
    # F1_N = 0.8 (TP 2, FP 1), F1_AFIB = 2/3 (TP 1, FN 1); VT absent from the truth is not averaged in
    assert v["seq_f1_N"] == pytest.approx(0.8) and v["seq_f1_AFIB"] == pytest.approx(2 / 3)
    assert v["seq_f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert v["seq_f1"] == pytest.approx(0.5 * 0.8 + 0.5 * 2 / 3)  # weighted by support: equal here
