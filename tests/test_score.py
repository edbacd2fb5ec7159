"""`wpcrack score`: folders of predictions against ground truth, with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from wpcrack.cli import main
from wpcrack.errors import WpcrackError
from wpcrack.evaluate.score import score_folders


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Two 4x4 images. a: tp 2, fp 1, fn 1, tn 12 (one value 127 is not crack, 128 is);
    b: empty prediction, 2 crack pixels missed. Summed: tp 2, fp 1, fn 3, tn 26."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pa = np.zeros((4, 4), np.uint8)
    pa[0, 0], pa[0, 1], pa[0, 2], pa[3, 3] = 255, 128, 200, 127
    ga = np.zeros((4, 4), np.uint8)
    ga[0, 0], ga[0, 1], ga[1, 0] = 255, 255, 255
    gb = np.zeros((4, 4), np.uint8)
    gb[2, 2], gb[2, 3] = 255, 255
    _write(pred / "a.png", pa)
    _write(gt / "a.png", ga)
    _write(pred / "b.png", np.zeros((4, 4), np.uint8))
    _write(gt / "b.png", gb)
    return pred, gt


def test_score_folders_known_answer(folders, capsys):
    summary = score_folders(*folders)
    assert summary["counts"] == {"tp": 2, "fp": 1, "fn": 3, "tn": 26}
    assert summary["precision"] == pytest.approx(100 * 2 / 3)
    assert summary["recall"] == pytest.approx(100 * 2 / 5)
    assert summary["f1"] == pytest.approx(50.0)
    assert summary["iou"] == pytest.approx(100 * 2 / 6)
    assert summary["accuracy"] == pytest.approx(100 * 28 / 32)
    assert summary["images"] == 2
    out = capsys.readouterr().out
    assert "| 66.667 | 40.000 | 87.500 | 50.000 | 33.333 |" in out


def test_score_resizes_ground_truth_nearest(tmp_path):
    """8x8 ground truth with a line on odd columns only: nearest-neighbour to 4x4 drops it."""
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 3] = 255
    _write(tmp_path / "gt" / "x.png", gt)
    _write(tmp_path / "pred" / "x.png", np.zeros((4, 4), np.uint8))
    summary = score_folders(tmp_path / "pred", tmp_path / "gt", size=4)
    assert summary["counts"] == {"tp": 0, "fp": 0, "fn": 0, "tn": 16}


def test_unpaired_and_unreadable_files_are_all_listed(folders):
    pred, gt = folders
    _write(pred / "only_pred.png", np.zeros((4, 4), np.uint8))
    _write(gt / "only_gt.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(WpcrackError) as err:
        score_folders(pred, gt)
    assert "only_pred.png" in str(err.value) and "only_gt.png" in str(err.value)
    (pred / "only_pred.png").unlink()
    (gt / "only_gt.png").unlink()
    (pred / "a.png").write_bytes(b"not a png")
    _write(pred / "b.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(WpcrackError) as err:
        score_folders(pred, gt)
    assert "a.png" in str(err.value) and "b.png" in str(err.value) and "2 file(s)" in str(err.value)


def test_cli_score(folders, capsys):
    pred, gt = folders
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == pytest.approx(50.0)
    (gt / "b.png").unlink()
    assert main(["score", "--pred", str(pred), "--gt", str(gt)]) == 2
    assert "b.png" in capsys.readouterr().err
