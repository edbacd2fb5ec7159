"""Field check sets: every kind of bad input stops with the files named, a good set loads."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wpcrack.data.field import field_photos
from wpcrack.errors import DataError


def _set(root: Path, n: int = 3, name: str = "town") -> Path:
    folder = root / "field" / name
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / "images" / f"p{i}.jpg"), rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
        mask = np.zeros((30, 40), np.uint8)
        mask[10:12, 5:30] = 255
        cv2.imwrite(str(folder / "masks" / f"p{i}.png"), mask)
    return folder


def test_a_good_set_gives_its_pairs_in_order(tmp_path):
    folder = _set(tmp_path)
    pairs = field_photos(tmp_path, "town")
    assert [(i.name, m.name) for i, m in pairs] == [("p0.jpg", "p0.png"), ("p1.jpg", "p1.png"), ("p2.jpg", "p2.png")]
    assert all(i.parent == folder / "images" for i, _ in pairs)


def test_every_bad_file_is_named_at_once(tmp_path):
    folder = _set(tmp_path, n=5)
    (folder / "masks" / "p0.png").unlink()                                             # missing
    cv2.imwrite(str(folder / "masks" / "p1.png"), np.zeros((20, 40), np.uint8))        # wrong size
    grey = np.zeros((30, 40), np.uint8)
    grey[5, 5] = 128
    cv2.imwrite(str(folder / "masks" / "p2.png"), grey)                                # not binary
    (folder / "images" / "p3.jpg").write_bytes(b"\xff\xd8 truncated")                   # unreadable photo
    with pytest.raises(DataError) as err:
        field_photos(tmp_path, "town")
    text = str(err.value)
    assert str(folder) in text
    assert "no mask of the same name in masks/: images/p0.jpg" in text
    assert "mask size differs from the photo's: masks/p1.png (40x20 vs 40x30)" in text
    assert "mask is not binary 0/255: masks/p2.png (values 0,128)" in text
    assert "photo unreadable: images/p3.jpg" in text
    assert "p4" not in text


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "masks" / "stray.png").write_bytes((f / "masks" / "p0.png").read_bytes()),
     "masks without a photo of the same name: stray.png"),
    (lambda f: [p.unlink() for p in (f / "images").iterdir()], "no images"),
    (lambda f: __import__("shutil").rmtree(f / "masks"), "needs images/ and masks/ folders"),
])
def test_a_malformed_set_says_what_is_wrong(tmp_path, damage, message):
    damage(_set(tmp_path))
    with pytest.raises(DataError, match=message):
        field_photos(tmp_path, "town")


def test_a_set_that_is_not_there_is_named(tmp_path):
    with pytest.raises(DataError, match=r"field/nowhere/images: field set 'nowhere' needs"):
        field_photos(tmp_path, "nowhere")


def test_wpcrack_field_scores_a_model_on_each_set_and_logs_it(tmp_path, monkeypatch):
    """The real command on a tiny model saved as a run folder: figures per set, an MLflow run."""
    import json

    import mlflow
    import torch

    from wpcrack.cli import main
    from wpcrack.config import dump_config, load_config
    from wpcrack.models.wpcracknet import build_model

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data, models, results = tmp_path / "data", tmp_path / "models", tmp_path / "results"
    _set(data, n=2, name="town")  # data/field/town
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text().replace("data: data", f"data: {data}")
                      .replace("models: models", f"models: {models}").replace("results: results", f"results: {results}")
                      .replace("  sets: []", "  sets: [town]"))
    cfg = load_config(params, dataset="synthetic")
    torch.manual_seed(0)
    folder = models / "synthetic" / "full"  # a trained-model folder as training writes it
    folder.mkdir(parents=True)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "best.pt")
    dump_config(cfg, folder / "config.yaml")

    assert main(["field", "synthetic", "--params", str(params)]) == 0
    figures = json.loads((results / "synthetic" / "full" / "field.json").read_text())
    town = figures["sets"]["town"]
    assert town["images"] == 2 and 0.0 <= town["iou"] <= 100.0 and town["scale_min"] > 0
    run = mlflow.search_runs(experiment_names=["wpcrack"], output_format="list")[0]
    assert run.data.tags["mlflow.runName"] == "field@synthetic"
    assert run.data.metrics["field/town/iou"] == pytest.approx(town["iou"])

    (data / "field" / "town" / "masks" / "p1.png").unlink()
    assert main(["field", "synthetic", "--params", str(params)]) == 2  # named, nothing rewritten
    assert json.loads((results / "synthetic" / "full" / "field.json").read_text()) == figures
