"""``wpcrack predict``: crack statistics of known shapes, gated tiling, and the command end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wpcrack.cli import main
from wpcrack.config import dump_config, load_config
from wpcrack.data.datasets import normalize
from wpcrack.errors import DataError
from wpcrack.io import read_mask, write_image
from wpcrack.models.wpcracknet import build_model
from wpcrack.deploy.detection import load_resolved_config, probability_map
from wpcrack.deploy.measure import crack_stats, skeletonize
from wpcrack.deploy.predict import predict

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["model.backbone=mobilenet_v2", "model.pretrained=false", "model.cam_channels=16", "model.paam_channels=16",
        "model.paam_reduction=4", "model.detector_channels=8", "model.decoder_channels=8",
        "evaluate.flip=false"]  # one pass unless a test turns the flips on


def _cfg(*overrides: str):
    return load_config(PARAMS, dataset="synthetic", overrides=[*TINY, *overrides])


def _line(shape: tuple[int, int], p0: tuple[int, int], p1: tuple[int, int], width: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.line(mask, p0, p1, 1, thickness=width)
    return mask


# --- statistics ---------------------------------------------------------------------------------


def test_straight_crack_of_known_length_and_width():
    mask = np.zeros((60, 300), np.uint8)
    mask[27:33, 50:250] = 1  # 200 x 6 px
    stats = crack_stats(mask, mm_per_pixel=0.5)
    assert stats["length_px"] == pytest.approx(200, rel=0.1)
    assert stats["max_width_px"] == pytest.approx(6, rel=0.1)
    assert stats["mean_width_px"] == pytest.approx(6, rel=0.1)
    assert stats["crack_pixels"] == 1200 and stats["crack_share"] == pytest.approx(1200 / mask.size)
    assert stats["length_mm"] == pytest.approx(stats["length_px"] * 0.5)
    assert stats["max_width_mm"] == pytest.approx(stats["max_width_px"] * 0.5)


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_axis_aligned_width_is_exact_for_odd_and_even_widths(width):
    mask = np.zeros((40, 200), np.uint8)
    mask[20:20 + width, 20:180] = 1
    assert crack_stats(mask)["mean_width_px"] == pytest.approx(width, abs=0.05)


@pytest.mark.parametrize("angle", [10, 30, 45, 70])
def test_oblique_crack_length_does_not_inflate(angle):
    a = np.deg2rad(angle)
    p0 = (200 - round(100 * np.cos(a)), 200 - round(100 * np.sin(a)))
    p1 = (200 + round(100 * np.cos(a)), 200 + round(100 * np.sin(a)))
    true = float(np.hypot(p1[0] - p0[0], p1[1] - p0[1]))
    assert crack_stats(_line((400, 400), p0, p1, 3))["length_px"] == pytest.approx(true, rel=0.05)


def test_ring_and_branches_are_measured_once():
    ring = np.zeros((300, 300), np.uint8)
    cv2.circle(ring, (150, 150), 100, 1, thickness=4)
    assert crack_stats(ring)["length_px"] == pytest.approx(2 * np.pi * 100, rel=0.03)
    tree = _line((300, 300), (20, 150), (280, 150), 3) | _line((300, 300), (150, 150), (150, 20), 3)
    assert crack_stats(tree)["length_px"] == pytest.approx(260 + 130, rel=0.05)


def test_skeleton_is_thin_and_connected():
    mask = _line((200, 200), (20, 30), (180, 170), 7) | _line((200, 200), (20, 170), (100, 100), 5)
    skeleton = skeletonize(mask)
    assert skeleton.sum() > 0 and not (skeleton & ~mask.astype(bool)).any()
    assert cv2.connectedComponents(skeleton.astype(np.uint8), connectivity=8)[0] - 1 == 1
    assert not (skeleton[:-1, :-1] & skeleton[1:, :-1] & skeleton[:-1, 1:] & skeleton[1:, 1:]).any()



def _zhang_suen_by_the_paper(mask: np.ndarray) -> np.ndarray:
    """Zhang & Suen (1984) pixel by pixel over the whole image each sub-step: the reference."""
    img = np.pad(mask.astype(bool), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            delete = []
            for y, x in zip(*np.nonzero(img), strict=True):
                p2, p3, p4, p5, p6, p7, p8, p9 = (img[y - 1, x], img[y - 1, x + 1], img[y, x + 1], img[y + 1, x + 1],
                                                  img[y + 1, x], img[y + 1, x - 1], img[y, x - 1], img[y - 1, x - 1])
                seq = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
                count, transitions = sum(seq[:-1]), sum(not a and b for a, b in zip(seq, seq[1:]))
                guard = (p2 and p4 and p6) or (p4 and p6 and p8) if step == 0 else (p2 and p4 and p8) or (p2 and p6 and p8)
                if 2 <= count <= 6 and transitions == 1 and not guard:
                    delete.append((y, x))
            for y, x in delete:
                img[y, x] = False
            changed |= bool(delete)
    return img[1:-1, 1:-1]


def test_thinning_that_follows_the_front_equals_the_papers_whole_image_passes():
    from wpcrack.deploy.measure import _zhang_suen

    rng = np.random.default_rng(3)
    masks = [_line((40, 40), (3, 5), (36, 30), 9), _line((30, 50), (15, 2), (15, 47), 6)]
    for _ in range(20):
        blobs = rng.random(tuple(rng.integers(4, 12, 2))) < 0.5
        masks.append(cv2.resize(blobs.astype(np.uint8), None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR))
    for mask in masks:
        assert (_zhang_suen(mask) == _zhang_suen_by_the_paper(mask)).all()

def test_empty_mask_has_zero_statistics():
    stats = crack_stats(np.zeros((32, 32), np.uint8))
    assert stats["length_px"] == 0 and stats["max_width_px"] == 0 and stats["length_mm"] is None


# --- tiled, gated inference -------------------------------------------------------------------------


class DarkPixels(nn.Module):
    """Pointwise stand-in with the SlimDetector API: crack = dark pixel; crack-free = no dark pixel."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x[:, :1] < -1.0).float() * self.scale

    def classify(self, x):
        return (x[:, 0] < -1.0).flatten(1).any(dim=1).float()


@pytest.fixture(scope="module")
def slim():
    torch.manual_seed(0)
    return build_model(_cfg()).slim().eval()


def _survey_photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rgb = rng.integers(110, 160, size=(h, w, 3), dtype=np.uint8)
    cv2.line(rgb, (5, 10), (w // 3, h // 2), (20, 20, 20), 3)
    return rgb


def test_tiled_result_matches_each_tile_predicted_alone(slim):
    cfg = _cfg("evaluate.tile_size=64", "evaluate.tile_overlap=0")
    rgb = _survey_photo(128, 192)
    prob, tiles, skipped, _ = probability_map(slim, rgb, cfg, gate=0, scales=(1.0,))
    assert prob.shape == (128, 192) and (tiles, skipped) == (6, 0)
    with torch.inference_mode():
        for y in (0, 64):
            for x in (0, 64, 128):
                alone = slim(normalize(rgb[None, y:y + 64, x:x + 64]))[0, 0].numpy()
                np.testing.assert_allclose(prob[y:y + 64, x:x + 64], alone, atol=1e-5)


def test_classifier_skips_crack_free_tiles_and_overlap_blending_is_exact():
    cfg = _cfg("evaluate.tile_size=64", "evaluate.tile_overlap=16")
    rgb = np.full((150, 260, 3), 128, np.uint8)
    rgb[100:104, 180:250] = 10  # one short crack in the lower right
    prob, tiles, skipped, _ = probability_map(DarkPixels(), rgb, cfg, gate=0.5, scales=(1.0,))
    np.testing.assert_allclose(prob, (rgb[..., 0] < 65).astype(np.float32), atol=1e-6)
    assert tiles == 3 * 6 and 0 < skipped < tiles - 1
    ungated, tiles, skipped, _ = probability_map(DarkPixels(), rgb, cfg, scales=(1.0,))  # the gate is opt-in
    np.testing.assert_allclose(ungated, prob, atol=1e-6)
    assert (tiles, skipped) == (18, 0)


def test_flip_averaging_keeps_the_counts_per_tile():
    rgb = np.full((150, 260, 3), 128, np.uint8)
    rgb[100:104, 180:250] = 10
    plain = probability_map(DarkPixels(), rgb, _cfg("evaluate.tile_size=64", "evaluate.tile_overlap=16"), gate=0.5,
                            scales=(1.0,))
    cfg = _cfg("evaluate.tile_size=64", "evaluate.tile_overlap=16", "evaluate.flip=true")
    prob, tiles, skipped, _ = probability_map(DarkPixels(), rgb, cfg, gate=0.5, scales=(1.0,))
    np.testing.assert_allclose(prob, plain[0], atol=1e-6)  # a pointwise detector is flip-invariant
    assert (tiles, skipped) == plain[1:3]


def test_scales_resize_the_image_and_average_back_to_its_size():
    cfg = _cfg("evaluate.tile_size=64", "evaluate.tile_overlap=16")
    rgb = np.full((120, 200, 3), 128, np.uint8)
    rgb[40:56, 20:180] = 10  # a 16 px wide crack survives halving
    truth = (rgb[..., 0] < 65).astype(np.float32)
    half, tiles, _, _ = probability_map(DarkPixels(), rgb, cfg, scales=(0.5,))
    assert half.shape == truth.shape and tiles == 2  # 60x100 px at half scale: one row of two tiles
    assert np.abs(half - truth)[truth == 1].mean() < 0.1 and half[truth == 0].max() < 0.6
    both, _, _, _ = probability_map(DarkPixels(), rgb, cfg, scales=(0.5, 1.0))
    np.testing.assert_allclose(both, (half + truth) / 2, atol=1e-5)
    for bad in ((), (0.0,), (20.0,)):  # None is not bad: it chooses
        with pytest.raises(DataError, match="--scale"):
            probability_map(DarkPixels(), rgb, cfg, scales=bad)
    with pytest.raises(DataError, match="--gate"):
        probability_map(DarkPixels(), rgb, cfg, gate=1.5)


def test_image_smaller_than_a_tile_is_one_pass(slim):
    rgb = _survey_photo(48, 40)
    prob, tiles, _, _ = probability_map(slim, rgb, _cfg("evaluate.tile_size=64"), gate=0, scales=(1.0,))
    with torch.inference_mode():
        np.testing.assert_allclose(prob, slim(normalize(rgb[None]))[0, 0].numpy(), atol=1e-5)
    assert tiles == 1


# --- the command --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, slim):
    """A trained-model folder as training writes it: best.pt ({"model": state dict}) + config.yaml."""
    folder = tmp_path_factory.mktemp("model")
    cfg = _cfg()
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "best.pt")
    dump_config(cfg, folder / "config.yaml")
    return folder


def test_resolved_config_round_trips(model_dir):
    cfg = load_resolved_config(model_dir / "config.yaml")
    assert cfg == _cfg()


def test_predict_folder_writes_masks_statistics_and_reports_bad_files(model_dir, tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    write_image(images / "road_a.png", _survey_photo(96, 300))
    write_image(images / "road_b.jpg", _survey_photo(64, 64))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    code = main(["predict", str(images), "--model", str(model_dir), "--out", str(out),
                 "--mm-per-pixel", "0.8", "--params", str(PARAMS), "--dataset", "synthetic"])
    assert code == 0
    assert "broken.jpg" in capsys.readouterr().err
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 3
    bad = table[table["error"].notna()]
    assert list(bad["image"].map(lambda p: Path(p).name)) == ["broken.jpg"]
    good = table[table["error"].isna()]
    for row in good.itertuples():
        mask = read_mask(out / row.mask)
        assert mask.shape == (row.height, row.width)
        assert row.crack_share == pytest.approx(mask.mean())
        assert (out / row.overlay).is_file()
        assert row.length_mm == pytest.approx(row.length_px * 0.8)
    # no --scale: the synthetic roads record their pixel size (1 mm), so 0.8 mm pixels are seen at 0.8
    assert set(good["scale_source"]) == {"mm_per_pixel"} and (good["scale"] == 0.8).all()
    report = json.loads((out / "predictions.json").read_text())
    assert report["model"] == str(model_dir.resolve()) and len(report["images"]) == 3
    assert report["gate"] == 0 and report["scales"] == "auto" and good["tiles_skipped"].sum() == 0
    assert report["flip"] is False  # params.yaml's evaluate.flip
    assert main(["predict", str(images / "road_b.jpg"), "--model", str(model_dir), "--out", str(tmp_path / "auto"),
                 "--params", str(PARAMS), "--dataset", "synthetic"]) == 0
    searched = json.loads((tmp_path / "auto" / "predictions.json").read_text())["images"][0]
    assert searched["scale_source"] == "auto" and 0 < searched["scale"] <= 1  # no pixel size: searched
    assert main(["predict", str(images / "road_a.png"), "--model", str(model_dir), "--out", str(tmp_path / "flip"),
                 "--params", str(PARAMS), "--dataset", "synthetic", "--flip", "--scale", "1"]) == 0
    flipped = json.loads((tmp_path / "flip" / "predictions.json").read_text())
    assert flipped["flip"] is True and flipped["scales"] == [1.0]
    row = flipped["images"][0]
    assert (row["scale"], row["scale_source"]) == (1.0, "given") and row["tiles"] > 1  # wider than a tile: tiled


def test_predict_warns_when_the_opt_in_gate_skips_most_tiles(model_dir, tmp_path, capsys, monkeypatch):
    from wpcrack.deploy import predict as predict_module

    monkeypatch.setattr(predict_module, "load_detector", lambda *a: (DarkPixels(), _cfg("evaluate.tile_size=64"), "dark"))
    write_image(tmp_path / "plain.png", np.full((64, 256, 3), 128, np.uint8))
    code = main(["predict", str(tmp_path / "plain.png"), "--out", str(tmp_path / "out"), "--gate",
                 "--scale", "1", "--params", str(PARAMS)])
    assert code == 0
    err = capsys.readouterr().err
    assert "plain.png" in err and re.search(r"skipped (\d+) of \1 tiles", err) and "without --gate" in err
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["gate"] == 0.5


def test_predict_without_any_image_is_a_clear_error(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        predict([tmp_path / "empty"], model=str(model_dir), out_dir=tmp_path / "out", params=PARAMS)


def test_intake_records_the_scale_predict_chooses_for_each_photo(model_dir, tmp_path):
    """A retraining stores new photos at the scale ``wpcrack predict`` (no --scale) would use for
    them with the champion, width matching included; the record names the model."""
    import shutil

    from wpcrack.deploy.detection import load_model_dir, weights_digest
    from wpcrack.intake import predict_scales

    folder = tmp_path / "champion"
    shutil.copytree(model_dir, folder)
    digest = weights_digest(load_model_dir(folder)[0])
    (folder / "scale.json").write_text(json.dumps({"crack_width_px": 3.0, "weights_md5": digest}))
    photos = tmp_path / "photos"
    photos.mkdir()
    paths = [photos / "wide.png", photos / "tall.png", photos / "big.png"]
    for path, (h, w) in zip(paths, ((96, 300), (240, 90), (300, 400))):
        write_image(path, _survey_photo(h, w))
    out = tmp_path / "out"
    assert main(["predict", str(photos), "--model", str(folder), "--out", str(out), "--params", str(PARAMS),
                 "--dataset", "synthetic"]) == 0
    table = pd.read_csv(out / "predictions.csv").set_index("image")
    scales, model_md5 = predict_scales([str(p) for p in paths], folder)
    assert scales == pytest.approx([table.loc[str(p), "scale"] for p in paths], rel=1e-5)
    assert model_md5 == digest and len(set(scales)) > 1
