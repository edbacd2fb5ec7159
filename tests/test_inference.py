"""Tiled and patch-gated inference, checkpoint loading, dataset rules, and evaluate end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wpcrack.config import load_config
from wpcrack.errors import DataError, TrainingError
from wpcrack.inference.loading import load_trained
from wpcrack.inference.tiles import patch_gated, predict_image, predict_patch_gated, to_batch
from wpcrack.evaluate.protocol import eval_views
from wpcrack.geometry import tile_starts
from wpcrack.models.wpcracknet import build_model

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["model.backbone=mobilenet_v2", "model.pretrained=false", "model.cam_channels=16", "model.paam_channels=16",
        "model.paam_reduction=4", "model.detector_channels=8", "model.decoder_channels=8",
        "evaluate.flip=false"]  # one pass unless a test turns the flips on


def _cfg(dataset: str, *overrides: str):
    return load_config(PARAMS, dataset=dataset, overrides=[*TINY, *overrides])


class PixelNet(nn.Module):
    """Conv-only stand-in with the model API. ``k=1`` is pointwise, so tiling cannot change it.

    ``classify`` calls an image crack when its mean brightness is above mid-grey.
    """

    def __init__(self, k: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, k, padding=k // 2)
        self.head = nn.Conv2d(3, 2, 1)

    @torch.inference_mode()
    def predict(self, x):
        return torch.sigmoid(self.conv(x))

    @torch.inference_mode()
    def classify(self, x):
        return (x.mean(dim=(1, 2, 3)) > 0).float()

    def classifier(self, x):
        return SimpleNamespace(cam=self.head(F.avg_pool2d(x, 8, ceil_mode=True)))


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_tile_starts_cover_the_axis():
    assert tile_starts(200, 256, 32) == [0]
    assert tile_starts(544, 256, 32) == [0, 224, 288]
    assert tile_starts(480, 256, 32) == [0, 224]
    with pytest.raises(ValueError):
        tile_starts(600, 256, 256)


def test_tiled_equals_untiled_for_a_pointwise_model():
    cfg = _cfg("synthetic", "evaluate.tile_size=32", "evaluate.tile_overlap=8")
    model, rgb = PixelNet(k=1), _rgb(70, 90)
    whole = model.predict(to_batch([rgb], torch.device("cpu")))[0, 0].numpy()
    np.testing.assert_allclose(predict_image(model, rgb, cfg), whole, atol=1e-6)


def test_one_tile_is_exactly_the_untiled_output_and_seams_stay_close():
    cfg = _cfg("synthetic", "evaluate.tile_size=32", "evaluate.tile_overlap=8")
    model = PixelNet(k=3)
    small = _rgb(32, 30)
    whole = model.predict(to_batch([small], torch.device("cpu")))[0, 0].numpy()
    assert np.array_equal(predict_image(model, small, cfg), whole)
    big = _rgb(70, 90)
    whole = model.predict(to_batch([big], torch.device("cpu")))[0, 0].numpy()
    tiled = predict_image(model, big, cfg)
    # A 3x3 conv differs only on tile edges inside the image (zero padding there), down-weighted.
    seam = np.zeros(big.shape[:2], bool)
    for y in tile_starts(70, 32, 8):
        for x in tile_starts(90, 32, 8):
            edge = np.zeros((32, 32), bool)
            edge[:, 0] |= x > 0
            edge[:, -1] |= x + 32 < 90
            edge[0, :] |= y > 0
            edge[-1, :] |= y + 32 < 70
            seam[y:y + 32, x:x + 32] |= edge
    np.testing.assert_allclose(tiled[~seam], whole[~seam], atol=1e-6)
    assert np.abs(tiled - whole)[seam].max() < 0.05


def test_flip_averages_the_four_mirrored_predictions():
    model, rgb = PixelNet(k=3), _rgb(20, 24)
    x = to_batch([rgb], torch.device("cpu"))
    plain = model.predict(x)[0, 0].numpy()
    mirrored = [torch.flip(model.predict(torch.flip(x, dims)), dims)[0, 0].numpy() for dims in ((3,), (2,), (2, 3))]
    assert np.array_equal(predict_image(model, rgb, _cfg("synthetic")), plain)
    flipped = predict_image(model, rgb, _cfg("synthetic", "evaluate.flip=true"))
    np.testing.assert_allclose(flipped, np.mean([plain, *mirrored], axis=0), atol=1e-6)
    assert np.abs(flipped - plain).max() > 1e-4  # a 3x3 conv is not mirror-symmetric: the flips count
    # Tiled images average the flips of each tile.
    tiled = predict_image(model, _rgb(70, 90), _cfg("synthetic", "evaluate.flip=true", "evaluate.tile_size=32",
                                                     "evaluate.tile_overlap=8"))
    assert tiled.shape == (70, 90) and np.isfinite(tiled).all()


def test_patch_gating_zeroes_patches_the_classifier_rejects():
    cfg = _cfg("cfd", "prepare.cfd.grid=3", "prepare.cfd.patch_size=16")
    rgb = np.zeros((30, 45, 3), np.uint8)
    rgb[10:20, 15:30] = 255  # the centre cell is bright: the stand-in classifier calls it crack
    rgb[0:10, 0:15] = 255  # and the top-left one
    prob = predict_patch_gated(PixelNet(), rgb, cfg)
    assert prob.shape == (30, 45)
    kept = np.zeros((30, 45), bool)
    kept[10:20, 15:30] = kept[0:10, 0:15] = True
    assert (prob[~kept] == 0).all()
    assert (prob[kept] > 0).all()
    gate = patch_gated(PixelNet(), rgb, cfg, lambda ps: {})["gate"]
    assert set(np.unique(gate[kept])) == {1.0} and set(np.unique(gate[~kept])) == {0.0}


def test_load_trained_round_trip_and_clear_errors(tmp_path):
    cfg = _cfg("synthetic")
    torch.manual_seed(1)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    loaded = load_trained(tmp_path, cfg)
    assert not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = _cfg("synthetic", "model.cam_channels=8")
    with pytest.raises(TrainingError, match="do not fit"):
        load_trained(tmp_path, other)
    # The architecture saved with the checkpoint wins over the evaluating configuration.
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "best.pt")
    assert load_trained(tmp_path, other).classifier.head.fc8.out_channels == 16
    with pytest.raises(DataError, match="no trained model"):
        load_trained(tmp_path / "missing", cfg)
    (tmp_path / "best.pt").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="cannot be loaded"):
        load_trained(tmp_path, cfg)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(_cfg("synthetic")).eval()


@pytest.mark.parametrize(
    ("dataset", "overrides", "shape"),
    [
        ("deepcrack", ["prepare.deepcrack.image_size=48", "prepare.deepcrack.eval_size=40"], (40, 40)),
        ("crack500", ["prepare.crack500.image_size=48"], (36, 64)),
        ("synthetic", [], (36, 64)),
        ("cfd", ["prepare.cfd.patch_size=32"], (36, 64)),
    ],
)
def test_eval_views_follow_the_dataset_rules(tiny_model, dataset, overrides, shape):
    cfg = _cfg(dataset, "pseudo_labels.iterations=2", *overrides)
    views = eval_views(tiny_model, _rgb(36, 64), cfg)
    assert views.rgb.shape == (*shape, 3)
    for values in (views.prob, views.cam, views.pseudo):
        assert values.shape == shape
    assert 0.0 <= views.prob.min() and views.prob.max() <= 1.0
    assert 0.0 <= views.cam.min() and views.cam.max() <= 1.0
    assert set(np.unique(views.pseudo)) <= {0, 1}


def test_evaluate_end_to_end_on_synthetic_data(tmp_path, monkeypatch, tiny_model):
    """prepare -> a checkpoint of an untrained tiny model -> evaluate; `score` reproduces the metrics."""
    from wpcrack.data.prepare import prepare
    from wpcrack.evaluate import run
    from wpcrack.evaluate.score import score_folders
    from wpcrack.train.checkpoint import config_fingerprint

    tracked = []
    monkeypatch.setattr(run, "_track", lambda *args: tracked.append(args))  # MLflow: the lead's e2e test
    cfg = _cfg(
        "synthetic", f"paths.data={tmp_path / 'data'}", "prepare.synthetic.size=48", "prepare.synthetic.train_crack=2",
        "prepare.synthetic.train_nocrack=2", "prepare.synthetic.val_crack=1", "prepare.synthetic.val_nocrack=1",
        "prepare.synthetic.test=3", "evaluate.figure_images=2", "pseudo_labels.iterations=2",
    )
    prepare(cfg, "synthetic")
    torch.save({"model": tiny_model.state_dict(), "config": cfg.to_dict()}, tmp_path / "best.pt")
    out = tmp_path / "results"
    metrics = run.evaluate(cfg, tmp_path, out)
    assert len(tracked) == 1
    assert metrics["model"]["config_sha256"] == config_fingerprint(cfg.to_dict())  # what compare checks
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for mode in run.MODES:
        assert {"precision", "recall", "accuracy", "f1", "iou", "extra_miou", "extra_ods_f1"} <= set(metrics[mode])
        assert metrics[mode]["images"] == 3
    assert metrics["detector_ungated"]["counts"] == metrics["detector"]["counts"]  # synthetic is not gated
    assert metrics["gate"]["tiles"] == 3 and 0 <= metrics["gate"]["skipped"] <= 3
    if metrics["gate"]["skipped"] == 0:
        assert metrics["detector_gated"]["counts"] == metrics["detector"]["counts"]
    assert len(list((out / "predictions").glob("*.png"))) == 3
    assert (out / "figure.png").stat().st_size > 1000
    assert (out / "pr_curve.csv").read_text().splitlines()[0] == "threshold,precision,recall,f1,iou"
    gt_dir = tmp_path / "data" / "prepared" / "synthetic" / "masks" / "test"
    again = score_folders(out / "predictions", gt_dir)
    assert again["counts"] == metrics["detector"]["counts"]
