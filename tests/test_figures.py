"""Figures that open offline: the PR curve and the training's per-epoch curves as one PNG."""

from __future__ import annotations

import cv2

from wpcrack.evaluate.figures import HISTORY_PANELS, write_curves


def test_curves_png_has_one_panel_per_history_group(tmp_path):
    points = [{"recall": r, "precision": 100 - r / 2} for r in range(0, 101, 10)]
    alone = write_curves(tmp_path / "pr.png", points)
    history = tmp_path / "history.csv"
    history.write_text("epoch,val_score,pseudo_label_iou,rec_total,cls_total,det_total\n"
                       "1,0.5,,0.6,0.1,\n2,0.7,0.55,0.4,-0.1,1.2\n")
    both = write_curves(tmp_path / "curves.png", points, history, title="synthetic")
    (h1, w1), (h2, w2) = cv2.imread(str(alone)).shape[:2], cv2.imread(str(both)).shape[:2]
    assert h1 == h2 and w2 > w1 * (1 + len(HISTORY_PANELS)) * 0.9  # the history panels sit beside the PR curve
    assert write_curves(tmp_path / "no_history.png", points, tmp_path / "missing.csv").is_file()
