"""Table 1 with repeats: means and spread over the seeds that are evaluated."""

import json
import math

import pandas as pd
import pytest

from wpcrack.evaluate.tables import Results, ablation_table, to_markdown


def _metrics(root, variant: str, iou: float, precision: float) -> None:
    folder = root / "deepcrack" / variant
    folder.mkdir(parents=True)
    detector = {"precision": precision, "recall": 80.0, "accuracy": 98.0, "f1": 75.0, "iou": iou}
    (folder / "metrics.json").write_text(json.dumps({"detector": detector}))


def test_ablation_rows_average_the_evaluated_seeds(tmp_path):
    _metrics(tmp_path, "rec", 60.0, 70.0)
    _metrics(tmp_path, "rec-seed1", 62.0, 74.0)
    _metrics(tmp_path, "rec-seed2", 67.0, 78.0)
    _metrics(tmp_path, "full", 68.0, 80.0)
    _metrics(tmp_path, "full-seed2", 70.0, 82.0)  # full-seed1 is defined but not evaluated yet
    _metrics(tmp_path, "cls_only-seed1", 10.0, 10.0)  # not a Table 1 row
    variants = {"rec", "rec-seed1", "rec-seed2", "full", "full-seed1", "full-seed2", "cls_det", "cls_only-seed1"}
    table = ablation_table(Results(tmp_path, "deepcrack"), variants).set_index("variant")

    assert list(table.index) == ["cls_det", "rec", "full"]
    rec = table.loc["rec"]
    assert rec["ours_iou"] == pytest.approx(63.0) and rec["ours_precision"] == pytest.approx(74.0)
    assert rec["ours_iou_sd"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # sample sd of 60, 62, 67
    assert rec["seeds"] == "3 of 3"
    full = table.loc["full"]
    assert full["ours_iou"] == pytest.approx(69.0) and full["ours_iou_sd"] == pytest.approx(math.sqrt(2))
    assert full["seeds"] == "2 of 3"
    cls_det = table.loc["cls_det"]  # defined, never evaluated: dashes, no spread
    assert pd.isna(cls_det["ours_iou"]) and pd.isna(cls_det["ours_iou_sd"]) and cls_det["seeds"] == "0 of 1"
    one = ablation_table(Results(tmp_path, "deepcrack"), {"rec"}).set_index("variant").loc["rec"]
    assert one["ours_iou"] == pytest.approx(60.0) and pd.isna(one["ours_iou_sd"]) and one["seeds"] == "1 of 1"
    assert "| cls_det |  |  |  | – |" in to_markdown(table.reset_index())  # unevaluated: dashes
