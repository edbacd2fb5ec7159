"""wpcrack tune-crf: grid parsing, scoring against the masks, the test split refused, files written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wpcrack.diagnostics import crf_tuning
from wpcrack.cli import main
from wpcrack.config import load_config
from wpcrack.data.prepare import prepare
from wpcrack.errors import ConfigError
from wpcrack.models.wpcracknet import build_model

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
DATA = ["prepare.synthetic.size=48", "prepare.synthetic.train_crack=4", "prepare.synthetic.train_nocrack=2",
        "prepare.synthetic.val_crack=2", "prepare.synthetic.val_nocrack=1", "prepare.synthetic.test=2",
        "pseudo_labels.iterations=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """Prepared synthetic data and an (untrained) smoke model's best.pt under one root."""
    root = tmp_path_factory.mktemp("tune")
    overrides = [f"paths.data={root / 'data'}", f"paths.models={root / 'models'}",
                 f"paths.reports={root / 'reports'}", *DATA]
    cfg = load_config(PARAMS, dataset="synthetic", overrides=overrides)
    prepare(cfg, "synthetic")
    model_dir = root / "models" / "synthetic" / "full"
    model_dir.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, model_dir / "best.pt")
    return model_dir, overrides


def test_parse_grid_and_settings():
    grid = crf_tuning.parse_grid(["bg_power=0.5,1", "gaussian=1,3"])
    assert grid == {"bg_power": [0.5, 1.0], "gaussian": [1.0, 3.0]}
    base = dataclasses.replace(load_config(PARAMS, dataset="deepcrack").pseudo_labels,
                               bg_power=0.5, gaussian_sxy=1.0, gaussian_compat=1.0)
    candidates = crf_tuning.settings(base, grid)
    assert len(candidates) == 4 and candidates[0] == base  # base is in the grid: not added twice
    assert {(p.bg_power, p.gaussian_sxy, p.gaussian_compat) for p in candidates} == {
        (0.5, 1.0, 1.0), (0.5, 3.0, 3.0), (1.0, 1.0, 1.0), (1.0, 3.0, 3.0)}
    assert crf_tuning.settings(base, {"bg_power": [2.0]})[0] == base  # base first when not in the grid
    assert crf_tuning.parse_grid(None) == crf_tuning.DEFAULT_GRID
    for bad in ("bogus=1", "bg_power", "bg_power=a,b", "bg_power="):
        with pytest.raises(ConfigError, match="--grid"):
            crf_tuning.parse_grid([bad])


def test_scores_are_counted_over_the_set():
    masks = [np.array([[1, 1, 0, 0]], bool), np.array([[0, 0, 0, 1]], bool)]
    labels = [np.array([[1, 0, 1, 0]], bool), np.zeros((1, 4), bool)]
    s = crf_tuning._scores(labels, masks)  # TP 1, FP 1, FN 2
    assert s["IoU"] == pytest.approx(1 / 4) and s["precision"] == pytest.approx(1 / 2)
    assert s["recall"] == pytest.approx(1 / 3) and s["non-empty"] == pytest.approx(1 / 2)


def test_a_perfect_cam_scores_one_and_rows_are_ranked(trained, monkeypatch):
    """With the masks themselves as CAMs, the plain threshold is exact and ranks first."""
    model_dir, overrides = trained
    cfg = load_config(PARAMS, dataset="synthetic", overrides=overrides)
    rgbs, masks = crf_tuning._samples(cfg, "val", None, 64, 0)
    by_image = {r.tobytes(): m.astype(np.float32) for r, m in zip(rgbs, masks)}
    monkeypatch.setattr("wpcrack.inference.tiles.crack_cams",
                        lambda model, batch: np.stack([by_image[r.tobytes()] for r in batch]))
    frame = crf_tuning.tune(cfg, model_dir, {"bg_power": [1.0, 2.0]}, split="val")
    assert frame.attrs["images"] == len(masks) == 2
    assert frame.loc[0, "IoU"] == pytest.approx(1.0) and frame.loc[0, "setting"].startswith("CAM > ")
    assert list(frame["IoU"]) == sorted(frame["IoU"], reverse=True)
    assert len(frame) == 3 + 3  # three thresholds; the profile's setting (bg_power 0.5) and the two of the grid
    assert "current params.yaml" in set(frame["setting"])
    assert frame["IoU"].between(0, 1).all()


def test_cli_writes_markdown_and_csv_and_refuses_test(trained, capsys):
    model_dir, overrides = trained
    sets = [arg for o in overrides for arg in ("--set", o)]
    out = model_dir.parent.parent.parent / "reports" / "synthetic" / "crf_tuning.md"
    # the smoke profile's own bg_power 5 is added to the grid
    assert main(["tune-crf", "synthetic", "--grid", "bg_power=1,2", "--limit", "3", *sets]) == 0
    assert "wpcrack tune-crf: 6 rows" in capsys.readouterr().out
    table = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == 3 + 3 and {"setting", "IoU", "precision", "recall", "non-empty", "bg_power"} <= set(table)
    text = out.read_text()
    assert text.startswith("# denseCRF settings for synthetic") and "random 96 px training crops" in text
    assert "3 crack images of the train split" in text
    with pytest.raises(ConfigError, match="test split"):
        crf_tuning.tune(load_config(PARAMS, dataset="synthetic", overrides=overrides), model_dir, {}, split="test")
