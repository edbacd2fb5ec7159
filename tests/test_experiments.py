"""wpcrack experiments: a row per train run, varying parameters only, the evaluation that followed."""

from __future__ import annotations

from pathlib import Path

import pytest

from wpcrack import tracking
from wpcrack.cli import main
from wpcrack.config import load_config
from wpcrack.experiments import experiment_rows

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _train(lr: float, val_scores: list[float], pseudo: float) -> None:
    cfg = load_config(PARAMS, dataset="synthetic", overrides=[f"train.lr={lr}", f"paths.models=/tmp/m{lr}"])
    with tracking.start_run(cfg, stage="train@synthetic") as tracker:
        tracker.log_params(cfg.to_dict())
        for epoch, score in enumerate(val_scores, 1):
            tracker.log_metrics({"val_score": score, "val_diag_det_iou": score / 2, "pseudo_label_iou": pseudo},
                                step=epoch)


def _evaluate(iou: float) -> None:
    cfg = load_config(PARAMS, dataset="synthetic")
    with tracking.start_run(cfg, stage="evaluate@synthetic") as tracker:
        tracker.log_metrics({"detector/iou": iou, "detector/precision": 50.0, "detector/recall": 40.0,
                             "detector/extra_ods_f1": 60.0})


def test_rows_pair_each_training_with_the_evaluation_after_it(store):
    _train(0.01, [0.2, 0.6, 0.4], pseudo=0.3)
    _evaluate(33.5)
    _train(0.02, [0.1, 0.3], pseudo=0.1)  # a try that was never evaluated

    df = experiment_rows("synthetic")
    assert list(df["train.lr"]) == ["0.01", "0.02"]
    assert "paths.models" not in df and "model.backbone" not in df  # ignored, and equal in both
    first, second = df.iloc[0], df.iloc[1]
    assert first["best val score"] == pytest.approx(0.6) and first["val det IoU (best)"] == pytest.approx(0.3)
    assert first["epochs done"] == 3 and first["pseudo-label IoU (last)"] == pytest.approx(0.3)
    assert first["test iou"] == pytest.approx(33.5) and first["test ODS F1"] == pytest.approx(60.0)
    assert second["best val score"] == pytest.approx(0.3) and second["test iou"] != second["test iou"]  # NaN
    assert experiment_rows("deepcrack").empty


def test_cli_writes_the_page(store, capsys):
    _train(0.01, [0.5], pseudo=0.2)
    out = store / "experiments.md"
    assert main(["experiments", "synthetic", "deepcrack", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## synthetic" in text and "| synthetic |" in text and "_no training runs recorded_" in text
    assert main(["experiments", "nowhere", "--out", str(out)]) == 2
    assert "unknown dataset(s) nowhere" in capsys.readouterr().err
