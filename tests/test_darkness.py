"""The dark-line cue: pseudo labels of the ``darkness`` method and the classical baseline."""

from __future__ import annotations

import numpy as np

from wpcrack.config import DarknessConfig, PseudoLabelConfig
from wpcrack.method.darkness import dark_pixels, remove_small
from wpcrack.method.pseudo_labels import IGNORE, confusion, make_label, with_ignore_band


def _road(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey road with grain, a 2 px crack 60 levels darker along row 40, and a 2x2 dark speck."""
    rng = np.random.default_rng(seed)
    grey = np.clip(rng.normal(150, 4, (size, size)), 0, 255)
    truth = np.zeros((size, size), np.uint8)
    truth[40:42, 10:-10] = 1
    grey[truth == 1] -= 60
    grey[80:82, 80:82] -= 60
    rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    return rgb, truth


def test_dark_pixels_find_the_crack_and_drop_small_blobs():
    rgb, truth = _road()
    cfg = DarknessConfig(block=31, offset=25, min_area=20)
    found = dark_pixels(rgb, cfg)
    assert found.dtype == np.uint8 and set(np.unique(found)) <= {0, 1}
    tp, fp, fn = confusion([found], [truth])
    assert tp / (tp + fp + fn) > 0.9
    assert found[80:82, 80:82].sum() == 0  # the 4-pixel speck is below min_area
    assert dark_pixels(rgb, DarknessConfig(block=31, offset=25, min_area=1))[80:82, 80:82].sum() == 4


def test_remove_small_counts_8_connected_pixels():
    binary = np.zeros((10, 10), np.uint8)
    binary[0, 0] = binary[1, 1] = binary[2, 2] = 1  # one diagonal component of 3
    binary[8, 8] = 1
    assert remove_small(binary, 3).sum() == 3
    assert remove_small(binary, 4).sum() == 0


def test_block_larger_than_the_image_is_clipped():
    rgb, truth = _road(size=24)
    assert dark_pixels(rgb, DarknessConfig(block=61, offset=25, min_area=1)).shape == truth.shape


def test_darkness_label_keeps_only_dark_pixels_inside_the_cam_region():
    rgb, truth = _road()
    cam = np.zeros(truth.shape, np.float32)
    cam[30:50, :48] = 0.9  # the CAM covers the left half of the crack only
    cfg = PseudoLabelConfig(method="darkness", cam_threshold=0.2, darkness=DarknessConfig(block=31, min_area=1))
    label = make_label(rgb, cam, cfg)
    assert label[40:42, 10:48].all()
    assert label[:, 48:].sum() == 0 and label[:30].sum() == 0


def test_component_gate_keeps_whole_dark_blobs_that_reach_into_the_cam_region():
    rgb, truth = _road()
    cam = np.zeros(truth.shape, np.float32)
    cam[30:50, :48] = 0.9  # the left half of the crack only; the speck at (80, 80) lies outside
    cfg = PseudoLabelConfig(method="darkness", cam_threshold=0.2, cam_gate="component",
                            darkness=DarknessConfig(block=31, min_area=1))
    label = make_label(rgb, cam, cfg)
    assert label[40:42, 10:-10].all()  # the whole crack, beyond the CAM
    assert label[80:82, 80:82].sum() == 0 and label.sum() == make_label(rgb, np.ones_like(cam), cfg).sum() - 4
    assert make_label(rgb, np.zeros_like(cam), cfg).sum() == 0


def test_ignore_band_marks_the_border_of_the_label_only():
    label = np.zeros((9, 9), np.uint8)
    label[4, 4] = 1
    banded = with_ignore_band(label, 1)
    assert banded[4, 4] == 1
    assert (banded == IGNORE).sum() == 4  # the 4-neighbours: a 1 px disc
    assert banded[3, 4] == banded[5, 4] == banded[4, 3] == banded[4, 5] == IGNORE
    assert (with_ignore_band(label, 2) == IGNORE).sum() > 8
    assert with_ignore_band(label, 0) is label
