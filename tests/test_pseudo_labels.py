"""denseCRF pseudo labels and the worker pool."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wpcrack.config import PseudoLabelConfig
from wpcrack.method.pseudo_labels import CRFPool, pseudo_label_iou, refine


def _crack(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dark thin polyline on a noisy grey road and a CAM as a classifier gives it: a soft band
    several times wider than the crack (stride-8 features), noisy, min-max normalised."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    pts = rng.integers(4, size - 4, size=(4, 2)).astype(np.int32)
    cv2.polylines(mask, [pts], False, 1, 2)
    rgb = rng.normal(150, 10, (size, size, 3)).clip(0, 255)
    rgb[mask > 0] *= 0.5
    band = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))).astype(np.float32)
    cam = cv2.GaussianBlur(band, (0, 0), 3)
    cam = np.clip(cam / cam.max() + rng.normal(0, 0.1, cam.shape), 0, None)
    return rgb.astype(np.uint8), (cam - cam.min()) / (cam.max() - cam.min()), mask


def test_crf_turns_a_noisy_cam_into_the_crack():
    cfg = PseudoLabelConfig()
    for seed in range(3):
        rgb, cam, mask = _crack(seed)
        label = refine(rgb, cam, cfg)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert pseudo_label_iou([label], [mask]) > 0.5
        assert pseudo_label_iou([label], [mask]) > pseudo_label_iou([cam > 0.5], [mask])


def test_refine_rejects_a_cam_of_another_size():
    rgb, cam, _ = _crack(0)
    with pytest.raises(ValueError, match="CAM"):
        refine(rgb, cam[:-1], PseudoLabelConfig())


@pytest.mark.parametrize("workers", [0, 2])
def test_pool_matches_inline_refinement_in_order(workers):
    cfg = PseudoLabelConfig(workers=workers, iterations=5)
    samples = [_crack(seed, size=48) for seed in range(5)]
    rgbs, cams = [s[0] for s in samples], [s[1] for s in samples]
    with CRFPool(cfg) as pool:
        labels = pool.submit(rgbs, cams).result()
        assert pool.submit([], []).result() == []
    expected = [refine(r, c.astype(np.float16), cfg) for r, c in zip(rgbs, cams)]
    assert len(labels) == 5
    assert all(np.array_equal(a, b) for a, b in zip(labels, expected))


def test_pseudo_label_iou_sums_over_the_set():
    a = np.array([[1, 1, 0, 0]], np.uint8)
    b = np.array([[1, 0, 0, 0]], np.uint8)
    assert pseudo_label_iou([a, b], [b, b]) == pytest.approx(2 / 3)
    assert pseudo_label_iou([np.zeros((2, 2))], [np.zeros((2, 2))]) == 0.0  # evaluate/metrics.py's rule
