"""``wpcrack generalise``'s scoring: predict's default path on a test split, photos enlarged."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from wpcrack.config import load_config
from wpcrack.data.prepare import prepare
from wpcrack.evaluate.generalise import generalise, score_split
from wpcrack.errors import DataError

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
    assert 0 < enlarged["scale_min"] <= enlarged["scale_median"] <= enlarged["scale_max"] <= 1.0


def test_without_any_trained_model_it_says_what_to_run(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("models: models", f"models: {tmp_path / 'none'}"))
    with pytest.raises(DataError, match="train@deepcrack"):
        generalise(params, out=tmp_path / "g")
    assert not (tmp_path / "g.json").exists()
