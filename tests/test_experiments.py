"""wpcrack experiments: a row per train run, varying parameters only, the evaluation that followed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from wpcrack.tracking import runs as tracking
from wpcrack.cli import main
from wpcrack.config import load_config
from wpcrack.tracking.experiments import experiment_rows

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _train(lr: float, val_scores: list[float], pseudo: float) -> None:
    cfg = load_config(PARAMS, dataset="synthetic", overrides=[f"train.lr={lr}", f"paths.models=/tmp/m{lr}",
                                                              f"prepare.cfd.grid={int(lr * 100)}"])
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
    assert "prepare.cfd.grid" not in df  # another dataset's preparation
    first, second = df.iloc[0], df.iloc[1]
    assert first["best val score"] == pytest.approx(0.6) and first["val det IoU (best)"] == pytest.approx(0.3)
    assert first["epochs done"] == 3 and first["pseudo-label IoU (last)"] == pytest.approx(0.3)
    assert first["test iou"] == pytest.approx(33.5) and first["test ODS F1"] == pytest.approx(60.0)
    assert second["best val score"] == pytest.approx(0.3) and second["test iou"] != second["test iou"]  # NaN
    assert experiment_rows("deepcrack").empty



def test_a_lone_run_shows_what_it_changed_from_params_yaml(store):
    _train(0.05, [0.5], pseudo=0.2)  # the smoke profile's lr is 0.01
    assert "train.lr" not in experiment_rows("synthetic")  # nothing varies between rows
    alone = experiment_rows("synthetic", params_file=PARAMS)
    assert list(alone["train.lr"]) == ["0.05"] and "train.epochs" not in alone


def test_cli_writes_a_page_per_store_and_the_index(store, capsys):
    pages, index = store / "experiments", store / "experiments.md"
    assert main(["experiments", "synthetic", "--pages", str(pages), "--out", str(index)]) == 2
    assert "holds no training run of synthetic" in capsys.readouterr().err and not index.exists()

    earlier = pages / "2020-01-01.md"  # the page an earlier store left: kept as it was generated
    pages.mkdir()
    earlier.write_text("# Experiments of the tracking store started 2020-01-01\n")
    _train(0.01, [0.5], pseudo=0.2)
    assert main(["experiments", "synthetic", "deepcrack", "--pages", str(pages), "--out", str(index)]) == 0
    today = datetime.now(UTC).date().isoformat()  # the store's first training started now
    (page,) = pages.glob(f"{today}-[0-9][0-9][0-9][0-9].md")
    text = page.read_text()
    assert "## synthetic" in text and "| synthetic |" in text and "_no training runs recorded_" in text
    assert earlier.read_text() == "# Experiments of the tracking store started 2020-01-01\n"
    listed = [line for line in index.read_text().splitlines() if line.startswith("- [")]
    assert listed == [f"- [{page.stem}](experiments/{page.name})", "- [2020-01-01](experiments/2020-01-01.md)"]
    assert main(["experiments", "nowhere", "--out", str(index)]) == 2
    assert "unknown dataset(s) nowhere" in capsys.readouterr().err
