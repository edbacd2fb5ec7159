"""``wpcrack generalise``'s scoring: predict's default path on a test split, photos enlarged."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
from torch import nn

from wpcrack.config import load_config
from wpcrack.data.prepare import prepare
from wpcrack.evaluate.generalise import score_model, score_split, table
from wpcrack.errors import DataError
from wpcrack.io import write_json

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
SMALL = ["prepare.synthetic.train_crack=2", "prepare.synthetic.train_nocrack=2", "prepare.synthetic.val_crack=1",
         "prepare.synthetic.val_nocrack=1", "prepare.synthetic.test=4", "evaluate.tile_size=64",
         "evaluate.tile_overlap=8"]


class DarkPixels(nn.Module):
    """A pointwise stand-in: crack = dark pixel. It sees cracks at any scale, so enlarging the
    photos must not change its score much, whatever scale the search picks."""

    def forward(self, x):
        return (x[:, :1] < -1.2).float()

    def classify(self, x):
        return (x[:, 0] < -1.2).flatten(1).float().mean(dim=1).clamp(max=1) * 20


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data = tmp_path_factory.mktemp("gen") / "data"
    cfg = load_config(PARAMS, dataset="synthetic", overrides=[f"paths.data={data}", *SMALL])
    prepare(cfg, "synthetic")
    return cfg


def test_enlarged_photos_are_scored_at_the_split_resolution(synthetic):
    plain = score_split(DarkPixels(), synthetic, synthetic)
    enlarged = score_split(DarkPixels(), synthetic, synthetic, enlarge=2)
    assert plain["images"] == enlarged["images"] == 4 and 0 < plain["iou"] <= 100
    assert enlarged["iou"] == pytest.approx(plain["iou"], abs=15)
    assert 0 < enlarged["scale_min"] <= enlarged["scale_median"] <= enlarged["scale_max"] <= synthetic.predict.max_scale
    first = enlarged["per_image"][0]  # each photo's choice, for a look at how it was made
    assert len(enlarged["per_image"]) == 4 and first["height"] == 2 * synthetic.prepare.synthetic.size
    assert enlarged["scale_min"] <= first["scale"] <= enlarged["scale_max"]


def test_without_a_trained_model_it_says_what_to_run(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("models: models", f"models: {tmp_path / 'none'}")
                      .replace("results: results", f"results: {tmp_path / 'results'}"))
    with pytest.raises(DataError, match="train@deepcrack"):
        score_model(params, "deepcrack")
    with pytest.raises(DataError, match="generalise@deepcrack"):
        table(params, tmp_path / "g")
    assert not (tmp_path / "g.json").exists() and not (tmp_path / "results").exists()


def _scores(iou: float) -> dict:
    return {"precision": iou + 5, "recall": iou - 5, "f1": iou + 1, "iou": iou, "images": 3, "enlarge": 1,
            "seconds_per_image": 0.5, "scale_median": 0.5, "scale_min": 0.25, "scale_max": 1.0}


def test_table_gathers_the_scored_models_with_exactly_the_issue_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    results, models = tmp_path / "results", tmp_path / "models"
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("models: models", f"models: {models}")
                      .replace("results: results", f"results: {results}"))
    scores = {"deepcrack": _scores(60.0), "cfd": _scores(20.0), "crack500": _scores(40.0)}
    scores["enlarged"] = {"1": scores["deepcrack"], "2": _scores(61.0), "4": _scores(62.0), "8": _scores(63.0)}
    write_json(results / "deepcrack" / "full" / "generalise.json",
               {"model": "deepcrack", "limit": None, "predict": {}, "minutes": 3.0, "scores": scores})
    roads = {"deepcrack": _scores(58.0), "cfd": _scores(41.5), "crack500": _scores(44.0)}
    write_json(results / "roads" / "full" / "generalise.json",
               {"model": "roads", "limit": 5, "predict": {}, "minutes": 2.0, "scores": roads})
    write_json(results / "roads" / "full" / "metrics.json", {"by_source": {"deepcrack": {"iou": 66.6}}})
    write_json(results / "cfd" / "classical" / "metrics.json", {"classical": {"iou": 12.5}})
    write_json(models / "roads" / "full" / "train_metrics.json", {"train_seconds": 4500.0})

    figures = table(params, tmp_path / "g")

    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved == figures and set(saved) == {"matrix", "scale", "train_minutes"}
    assert set(saved["matrix"]) == {"deepcrack", "cfd", "crack500", "roads"}
    assert saved["matrix"]["roads"] == {"deepcrack": 58.0, "cfd": 41.5, "crack500": 44.0}
    assert saved["matrix"]["cfd"] == {"deepcrack": None, "cfd": None, "crack500": None}
    assert saved["scale"] == {"1": 60.0, "2": 61.0, "4": 62.0, "8": 63.0}
    assert saved["train_minutes"] == {"roads": 75.0}
    md = (tmp_path / "g.md").read_text()
    assert "| roads | 58.0 (66.6) | 41.5 | 44.0 |" in md
    assert "| classical threshold (evaluate protocol) | – | 12.5 | – |" in md
    assert "first 5 photos per split" in md and "75.0 min" in md
    import mlflow

    run = mlflow.search_runs(experiment_names=["wpcrack"], filter_string="tags.mlflow.runName = 'generalisation'",
                             output_format="list")[0]
    assert run.data.metrics["matrix/roads/cfd"] == 41.5 and run.data.metrics["scale/8x"] == 63.0


@pytest.mark.parametrize("argv, message", [
    ([], "name the model(s) to score, or --table"),
    (["kitti"], "kitti: not a generalisation model"),
    (["deepcrack", "--split", "val", "--set", "train.epochs=1"], "only predict.KEY=VALUE settings"),
    (["deepcrack", "--set", "predict.max_scale=2"], "tried on --split val only (never on test)"),
])
def test_the_command_refuses_what_it_cannot_do(argv, message, capsys):
    from wpcrack.cli import main

    assert main(["generalise", *argv]) == 2
    assert message in capsys.readouterr().err
