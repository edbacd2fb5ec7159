"""Metrics against hand-computed confusion counts (design.md 1), including the 0/0 conventions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wpcrack.evaluate.metrics import (
    Confusion,
    ConfusionAccumulator,
    align,
    binarize,
    confusion,
    pr_thresholds,
    reduce,
    resize_gt,
    sweep,
)

# Two images whose counts are easy to check by hand.
A = Confusion(tp=2, fp=1, fn=1, tn=6)
B = Confusion(tp=0, fp=0, fn=2, tn=8)


def _image(c: Confusion) -> tuple[np.ndarray, np.ndarray]:
    """A prediction/ground-truth pair of 1xN pixels with exactly these counts."""
    pred = [1] * c.tp + [1] * c.fp + [0] * c.fn + [0] * c.tn
    gt = [1] * c.tp + [0] * c.fp + [1] * c.fn + [0] * c.tn
    return np.array([pred], np.uint8), np.array([gt], np.uint8)


def test_confusion_counts_pixels():
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    gt = np.array([[1, 0, 0], [1, 0, 0]])
    assert confusion(pred, gt) == Confusion(tp=1, fp=1, fn=1, tn=3)
    assert confusion(*_image(A)) == A


def test_dataset_reduction_sums_counts_over_the_set():
    s = reduce(np.array([A, B]), "dataset")  # summed: tp 2, fp 1, fn 3, tn 14
    p, r = 2 / 3, 2 / 5
    assert s["precision"] == pytest.approx(p)
    assert s["recall"] == pytest.approx(r)
    assert s["accuracy"] == pytest.approx(16 / 20)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["f1"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(2 / 6)
    assert s["background_iou"] == pytest.approx(14 / 18)


def test_per_image_reduction_is_a_mean_of_image_scores():
    s = reduce(np.array([A, B]), "per_image")
    assert s["f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert s["iou"] == pytest.approx((2 / 4 + 0.0) / 2)


def test_unknown_reduction_lists_valid_names():
    with pytest.raises(ValueError, match="dataset, per_image"):
        reduce(np.array([A]), "micro")


def test_zero_denominators():
    empty = Confusion(tp=0, fp=0, fn=0, tn=10)
    data = reduce(np.array([empty]), "dataset")
    assert [data[k] for k in ("precision", "recall", "f1", "iou")] == [0.0] * 4
    assert data["accuracy"] == 1.0
    # Per image, nothing to find and nothing found is a perfect image.
    per = reduce(np.array([empty]), "per_image")
    assert per["f1"] == per["iou"] == per["precision"] == per["recall"] == 1.0
    # Empty prediction on a cracked image, and a false alarm on a clean one, score 0.
    missed, false_alarm = Confusion(0, 0, 3, 7), Confusion(0, 3, 0, 7)
    assert reduce(np.array([missed]), "per_image")["f1"] == 0.0
    assert reduce(np.array([false_alarm]), "per_image")["iou"] == 0.0
    assert reduce(np.array([empty, false_alarm]), "per_image")["f1"] == pytest.approx(0.5)


def test_binarisation_of_8_bit_values_is_greater_than_127():
    values = np.array([0, 126, 127, 128, 255], np.uint8)
    assert binarize(values, 0.5).tolist() == [False, False, False, True, True]
    assert binarize(values.astype(np.float64) / 255, 0.5).tolist() == [False, False, False, True, True]


def test_sweep_is_exact_for_strict_thresholds():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    values[0, :5] = 51  # 51/255 == 0.2 exactly: not above threshold 0.2
    gt = rng.random((20, 30)) > 0.7
    thresholds = pr_thresholds(51)
    assert thresholds[10] == 0.2 and thresholds[25] == 0.5
    counts = sweep(values, gt, thresholds)
    for i, t in enumerate(thresholds):
        assert tuple(counts[i]) == confusion(values.astype(np.float64) / 255 > t, gt)


def test_accumulator_summary_and_extras():
    acc = ConfusionAccumulator(threshold=0.5, n_thresholds=11)
    for c in (A, B):
        pred, gt = _image(c)
        acc.add(pred.astype(np.float64), gt)
    s = acc.summary()
    assert s["counts"] == {"tp": 2, "fp": 1, "fn": 3, "tn": 14}
    assert s["f1"] == pytest.approx(50.0)
    assert s["iou"] == pytest.approx(100 * 2 / 6)
    assert s["extra_miou"] == pytest.approx(100 * (2 / 6 + 14 / 18) / 2)
    assert s["extra_per_image_f1"] == pytest.approx(100 * (2 / 3) / 2)
    # Binary predictions: every threshold in [0, 1) gives the same counts.
    assert s["extra_ods_f1"] == pytest.approx(50.0)
    assert s["extra_ois_f1"] == pytest.approx(100 * (2 / 3) / 2)
    curve = acc.pr_curve()
    assert len(curve) == 11 and curve[5]["threshold"] == 0.5
    assert curve[5]["f1"] == pytest.approx(0.5)
    assert curve[-1]["recall"] == 0.0  # nothing is > 1


def test_ods_and_ois_pick_thresholds():
    acc = ConfusionAccumulator(threshold=0.5, n_thresholds=11)
    gt = np.array([[1, 1, 0, 0]])
    acc.add(np.array([[0.35, 0.35, 0.1, 0.1]]), gt)  # perfect above 0.3, empty at 0.5
    acc.add(np.array([[0.9, 0.9, 0.45, 0.45]]), gt)  # perfect above 0.5
    assert acc.summary()["f1"] == pytest.approx(100 * 2 / 3)  # p 1, r 0.5
    f1, t = acc.ods()
    assert (f1, t) == (pytest.approx(0.8), pytest.approx(0.1))  # tp 4, fp 2 for t in [0.1, 0.3]; lowest wins
    assert acc.ois() == pytest.approx(1.0)


def test_ground_truth_resize_is_nearest_neighbour():
    """A one-pixel line on an odd column: nearest drops it, bilinear + threshold would keep it."""
    gt = np.zeros((10, 10), np.uint8)
    gt[:, 3] = 1
    nearest = resize_gt(gt, (5, 5))
    linear = (cv2.resize(gt * 255, (5, 5), interpolation=cv2.INTER_LINEAR) > 127).astype(np.uint8)
    assert nearest.sum() == 0
    assert linear.sum() > 0
    gt[:, 2] = 1  # source columns 0, 2, 4, 6, 8 survive
    assert resize_gt(gt, (5, 5))[:, 1].all()
    assert np.array_equal(resize_gt(gt, (5, 5)), cv2.resize(gt, (5, 5), interpolation=cv2.INTER_NEAREST))


def test_align_resizes_prediction_bilinearly_and_checks_shapes():
    from wpcrack.errors import WpcrackError

    pred = np.full((8, 12), 200, np.uint8)
    prob, gt = align(pred, np.ones((6, 9), np.uint8), size=4)
    assert prob.shape == gt.shape == (4, 4)
    assert prob == pytest.approx(200 / 255, abs=1e-6)
    with pytest.raises(WpcrackError, match="12x8"):
        align(pred, np.ones((6, 9), np.uint8))
