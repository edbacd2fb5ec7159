"""Choosing a photo's scale (``wpcrack.deploy.scale``): the ladder, the sampled tiles, and a detector
that sees only thin cracks finding the scale at which a wide crack looks thin."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from torch import nn

from wpcrack.config import load_config
from wpcrack.deploy.detection import probability_map
from wpcrack.deploy.scale import ScaleChoice, choose_scale, evidence, ladder, pick, sample_boxes, spread, train_row_side
from wpcrack.errors import ConfigError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _cfg(*overrides: str):
    return load_config(PARAMS, dataset="deepcrack", overrides=["model.pretrained=false", *overrides])


class ThinDarkLines(nn.Module):
    """Detector stand-in that, like a trained one, sees cracks only at the width it learned: dark
    pixels that a 5x5 opening removes (dark lines at most 4 px wide)."""

    def forward(self, x):
        dark = (x[:, :1] < -1.0).float()
        eroded = -nn.functional.max_pool2d(-dark, 5, 1, 2)
        opened = nn.functional.max_pool2d(eroded, 5, 1, 2)
        return dark * (1 - opened)


def _road(h: int, w: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    rgb = rng.integers(120, 150, size=(h, w, 3), dtype=np.uint8)
    cv2.line(rgb, (w // 10, h // 5), (9 * w // 10, 4 * h // 5), (15, 15, 15), width)
    cv2.line(rgb, (w // 8, 7 * h // 8), (7 * w // 8, h // 3), (15, 15, 15), width)
    return rgb


def test_ladder_goes_by_octaves_from_the_largest_scale_to_half_a_training_row():
    cfg = _cfg("predict.max_scale=2.0")
    assert train_row_side(cfg) == 256
    assert ladder((384, 544), cfg) == [2.0, 1.0, 0.5, 0.25]  # 544 * 0.25 = 136 >= 128; 0.125 would be 68 px
    big = ladder((3024, 4284), cfg)  # 4096 px at most: 1/2 is the largest power of 2 below 4096 / 4284
    assert big[0] == 0.5 and 4284 * big[-1] >= 128 > 4284 * big[-1] / 2
    assert ladder((3072, 4352), cfg)[1:] == [s / 8 for s in ladder((384, 544), cfg)]  # 8x: the same views
    assert ladder((100, 100), _cfg("predict.max_scale=1.0")) == [1.0]  # already smaller than half a row
    assert ladder((100, 100), _cfg("predict.max_scale=2.0")) == [2.0, 1.0]  # enlarged at most, never only


def test_sampled_tiles_are_spread_and_capped():
    boxes = sample_boxes(1000, 2000, 256, 6)
    assert len(boxes) == 6 and boxes[0][:3:2] == (0, 0) and boxes[-1][1::2] == (1000, 2000)
    assert len(sample_boxes(300, 300, 256, 12)) == 4  # fewer tiles than the budget: all of them


def test_evidence_is_crack_length_per_photo_pixel():
    prob = np.zeros((100, 100), np.float32)
    prob[50, 10:90] = 1.0  # an 80 px crack
    assert evidence([prob], 1.0, 0.5, "length") == pytest.approx(80 / 1e4, rel=0.02)
    assert evidence([prob], 0.5, 0.5, "length") == pytest.approx(0.5 * 80 / 1e4, rel=0.02)  # 160 px in the photo / 4e4 px
    assert evidence([prob * 0.4], 1.0, 0.5, "mass") == 0.0


@pytest.mark.parametrize("width", [3, 12, 24])
def test_a_wide_crack_is_predicted_where_it_looks_thin(width):
    cfg = _cfg("evaluate.tile_size=128", "evaluate.tile_overlap=16", "predict.sample_tiles=64",
               "predict.min_side_rows=0.2")  # down to 51 px: the ladder reaches 1/8
    rgb = _road(360, 480, width)
    result = probability_map(ThinDarkLines(), rgb, cfg)
    assert result.choice.source == "auto" and 1.0 <= width * result.choice.scale <= 4.5  # what the stand-in sees
    truth = rgb[..., 0] < 65
    found = result.prob > 0.5
    at_one = probability_map(ThinDarkLines(), rgb, cfg, scales=(1.0,)).prob > 0.5
    iou, iou_at_one = ((truth & m).sum() / (truth | m).sum() for m in (found, at_one))
    assert iou > 0.6 and (width == 3 or iou > 3 * iou_at_one)


def test_the_chosen_scale_is_averaged_with_its_neighbours_and_still_reported_as_chosen():
    rgb = _road(360, 480, 12)
    single = probability_map(ThinDarkLines(), rgb, _cfg("evaluate.tile_size=128", "predict.spread=0"))
    spread = probability_map(ThinDarkLines(), rgb, _cfg("evaluate.tile_size=128", "predict.spread=0.25"))
    s = single.choice.scale
    assert single.choice.scales == (s,) and spread.choice.scale == pytest.approx(s)
    assert spread.choice.scales == pytest.approx((s / 2 ** 0.25, s, s * 2 ** 0.25))
    by_hand = sum(probability_map(ThinDarkLines(), rgb, _cfg("evaluate.tile_size=128"), scales=(f,)).prob
                  for f in spread.choice.scales) / 3
    np.testing.assert_allclose(spread.prob, by_hand, atol=1e-6)


def test_spreading_a_choice_keeps_how_it_was_made():
    choice = ScaleChoice((0.5,), "auto", {0.5: 0.9, 1.0: 0.2}, True, "classifier", 6.0, 0.25)
    assert spread(choice, 0) is choice
    wide = spread(choice, 1.0)
    assert wide.scales == (0.25, 0.5, 1.0) and wide.scale == pytest.approx(0.5)
    assert (wide.source, wide.evidence, wide.at_edge, wide.kind, wide.crack_width, wide.evidence_scale) == \
        ("auto", {0.5: 0.9, 1.0: 0.2}, True, "classifier", 6.0, 0.25)


def test_without_evidence_the_photo_stays_at_its_own_scale():
    cfg = _cfg("evaluate.tile_size=128")
    choice = choose_scale(np.full((200, 300, 3), 128, np.uint8), cfg, lambda views, scale: 0.2, "classifier")
    assert choice.scales == (1.0,) and set(choice.evidence.values()) == {0.2} and not choice.at_edge


def test_pick_ends_the_run_at_the_first_fall_and_never_jumps_to_a_blurred_view():
    # the classifier's crack probability by scale on a DeepCrack val photo enlarged 8x (measured): sure
    # when the photo is shrunk, unsure once cracks are wider than its training cracks, fooled again by
    # the smooth views of a photo enlarged far beyond its detail
    measured = {0.03: 1.0, 0.06: 0.997, 0.08: 0.866, 0.12: 0.517, 0.24: 0.008, 0.47: 0.0, 0.94: 0.92}
    assert pick(measured, 0.9, 0.5) == 0.06
    assert pick(measured, 0.8, 0.5) == 0.08
    assert pick({0.25: 0.1, 0.5: 0.95, 1.0: 0.93, 2.0: 0.2}, 0.9, 0.5) == 1.0  # the run may start above the coarsest
    assert pick({0.5: 0.3, 1.0: 0.2, 2.0: 0.1}, 0.9, 0.5) == 1.0  # nothing seen: scale 1


class DarkLineClassifier(ThinDarkLines):
    """The stand-in with a classifier head: an image holds a crack when most of its dark pixels are
    thin lines (the detector finds them)."""

    def classify(self, x):
        dark = (x[:, :1] < -1.0).float().flatten(1).sum(dim=1)
        return (self(x).flatten(1).sum(dim=1) > 0.5 * dark.clamp(min=1)).float()


def test_a_model_with_a_classifier_head_is_scored_by_it_and_an_onnx_like_one_by_its_detector():
    rgb = _road(360, 480, 12)
    cfg = _cfg("evaluate.tile_size=128", "evaluate.tile_overlap=16", "predict.min_side_rows=0.2")
    with_head = probability_map(DarkLineClassifier(), rgb, cfg).choice
    detector_only = probability_map(ThinDarkLines(), rgb, cfg).choice
    assert (with_head.kind, detector_only.kind) == ("classifier", "mass")
    assert 1.0 <= 12 * with_head.scale <= 4.5 and 1.0 <= 12 * detector_only.scale <= 4.5


@pytest.mark.parametrize("key,value", [("scale_step", "1.0"), ("max_scale", "0"), ("sample_tiles", "0"),
                                       ("evidence", "votes"), ("spread", "-0.5")])
def test_bad_scale_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"predict.{key}"):
        _cfg(f"predict.{key}={value}")



def test_a_recorded_training_pixel_size_and_the_photos_set_the_scale():
    rgb = _road(200, 300, 3)
    synthetic = load_config(PARAMS, dataset="synthetic", overrides=["prepare.synthetic.mm_per_pixel=2.0"])
    choice = probability_map(ThinDarkLines(), rgb, synthetic, mm_per_pixel=0.5).choice
    assert (choice.scales, choice.source) == ((0.25,), "mm_per_pixel")  # pixels 4x finer than training: shrink 4x
    deepcrack = _cfg("evaluate.tile_size=128")  # DeepCrack publishes no pixel size: searched
    assert probability_map(ThinDarkLines(), rgb, deepcrack, mm_per_pixel=0.5).choice.source == "auto"


# --- width matching ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", [3, 6, 12, 24])
def test_ridge_width_reads_a_dark_bars_width_from_the_grey_levels(width):
    from wpcrack.deploy.measure import skeletonize
    from wpcrack.deploy.scale import ridge_width

    gray = np.full((160, 200), 140, np.uint8)
    gray[:, 80:80 + width] = 20
    bar = np.zeros_like(gray)
    bar[:, 80:80 + width] = 1
    assert ridge_width(gray, skeletonize(bar > 0)) == pytest.approx(width, rel=0.2)  # a third of an octave apart
    diagonal = np.full((160, 200), 140, np.uint8)
    cv2.line(diagonal, (10, 40), (190, 120), 20, 2 * width)  # OpenCV's thick diagonal lines come out a little wider
    line = cv2.line(np.zeros_like(diagonal), (10, 40), (190, 120), 1, 2 * width) > 0
    assert ridge_width(diagonal, skeletonize(line)) == pytest.approx(2 * width, rel=0.3)
    assert ridge_width(gray, np.zeros_like(bar, bool)) is None


def test_a_large_photos_crack_width_is_measured_shrunk_and_given_in_its_own_pixels():
    from wpcrack.deploy.scale import WIDTH_MEASURE_SIDE, photo_crack_width

    rgb = _road(1500, 2400, 24)  # shrunk to 1024 px: 10 px cracks, read back as 24
    prob = (rgb[..., 0] < 65).astype(np.float32)
    assert max(rgb.shape) > WIDTH_MEASURE_SIDE
    assert photo_crack_width(rgb, prob, 0.5) == pytest.approx(24, rel=0.2)
    assert photo_crack_width(rgb, np.zeros((10, 10), np.float32), 0.5) is None


def test_match_width_takes_the_geometric_mean_within_the_ladder():
    from wpcrack.deploy.scale import ScaleChoice, match_width

    evidence_says = ScaleChoice((0.25,), "auto", {0.25: 0.99}, False, "classifier")
    moved = match_width(evidence_says, photo_width=12.0, trained_width=6.0, weight=0.5, bounds=(0.1, 2.0))
    assert moved.scale == pytest.approx((0.25 * 0.5) ** 0.5) and moved.crack_width == 12.0
    assert moved.evidence_scale == 0.25 and moved.source == "auto"
    assert match_width(evidence_says, 12.0, 6.0, 1.0, (0.1, 2.0)).scale == pytest.approx(0.5)
    assert match_width(evidence_says, 0.5, 6.0, 1.0, (0.1, 2.0)).scale == 2.0  # clipped to the ladder
    assert match_width(evidence_says, None, 6.0, 0.5, (0.1, 2.0)) is evidence_says


def test_a_calibrated_model_sees_a_wide_crack_at_its_trained_width():
    cfg = _cfg("evaluate.tile_size=128", "evaluate.tile_overlap=16", "predict.min_side_rows=0.2",
               "predict.width_weight=1.0")
    model = DarkLineClassifier()
    rgb = _road(360, 480, 12)
    uncalibrated = probability_map(model, rgb, cfg).choice
    model.training_crack_width = 3.0
    choice = probability_map(model, rgb, cfg).choice
    assert choice.crack_width == pytest.approx(12, rel=0.2) and choice.evidence_scale == uncalibrated.scale
    assert choice.scale == pytest.approx(3.0 / choice.crack_width)


def test_calibrate_measures_the_models_own_finds_on_its_crack_rows(tmp_path, monkeypatch):
    import json

    import pandas as pd

    from wpcrack.deploy import calibrate as calibration
    from wpcrack.deploy import detection
    from wpcrack.io import write_image

    root = tmp_path / "data" / "prepared" / "deepcrack"
    rows = []
    for i, (width, label) in enumerate([(3, 1), (3, 1), (4, 1), (0, 0)]):
        rgb = np.full((128, 128, 3), 130, np.uint8)
        rgb[:, 40:40 + width] = 15  # a straight crack of this width (none on the crack-free row)
        write_image(root / "images" / f"r{i}.png", rgb)
        write_image(root / "masks" / f"r{i}.png", np.full((128, 128), 255 * label, np.uint8))  # wrong on purpose:
        rows.append({"image": f"images/r{i}.png", "mask": f"masks/r{i}.png", "label": label, "split": "train",
                     "dataset": "deepcrack", "source_id": f"r{i}", "height": 128, "width": 128})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    model_dir = tmp_path / "models" / "deepcrack" / "full"
    model_dir.mkdir(parents=True)
    (model_dir / "best.pt").write_bytes(b"stand-in")
    cfg = _cfg("evaluate.tile_size=128", "evaluate.tile_overlap=16", f"paths.data={tmp_path / 'data'}")
    monkeypatch.setattr(detection, "load_model_dir", lambda folder: (ThinDarkLines(), cfg))
    result = calibration.calibrate(cfg, model_dir)
    assert result["by_source"]["deepcrack"]["rows"] == 3  # the crack rows only, and no mask read (all-crack masks)
    assert result["crack_width_px"] == pytest.approx(3, rel=0.3)
    assert json.loads((model_dir / "scale.json").read_text())["weights_md5"] == detection.weights_digest(ThinDarkLines())
    assert calibration.weighted_median([1.0, 2.0, 9.0], [1.0, 1.0, 2.0]) == 2.0  # half the weight on each side
    assert calibration.weighted_median([1.0, 2.0, 9.0], [1.0, 1.0, 2.1]) == 9.0


def test_a_scale_file_of_other_weights_is_ignored(tmp_path):
    import json

    from wpcrack.deploy.detection import attach_crack_width, training_crack_width, weights_digest

    model = nn.Linear(2, 2)
    (tmp_path / "scale.json").write_text(json.dumps({"crack_width_px": 5.0, "weights_md5": "other"}))
    assert training_crack_width(attach_crack_width(model, tmp_path)) is None
    (tmp_path / "scale.json").write_text(json.dumps({"crack_width_px": 5.0, "weights_md5": weights_digest(model)}))
    assert training_crack_width(attach_crack_width(model, tmp_path)) == 5.0


class SureOfDarkPixels(nn.Module):
    """A stand-in sure of a crack at every scale (its classifier), whose detector marks every dark pixel:
    the evidence always picks the ladder's largest scale, and the width is the photo's own."""

    def forward(self, x):
        return (x[:, :1] < -1.0).float()

    def classify(self, x):
        return x.new_ones(x.shape[0])


def test_training_factors_follow_the_prepare_geometry():
    from wpcrack.deploy.calibrate import training_factor

    p = _cfg().prepare  # DeepCrack: 544x384 squashed to 256x256; CFD: 480x320 cut 3x3, each cell enlarged to 256
    assert training_factor(p, "deepcrack", 384, 544) == pytest.approx(np.sqrt(256 / 384 * 256 / 544))
    assert training_factor(p, "cfd", 320, 480) == pytest.approx(np.sqrt(768 / 320 * 768 / 480))
    assert training_factor(p, "synthetic", 96, 96) is None


def test_replayed_weights_are_the_geometric_mean_within_the_ladder():
    from wpcrack.deploy.calibrate import octaves_off, replay

    cfg = _cfg()
    record = {"height": 384, "width": 544, "scale": 0.7, "evidence_scale": 0.5, "crack_width_px": 4.0,
              "training_factor": 1.0}
    assert replay(record, 8.0, 0.0, cfg) == pytest.approx(0.5)
    assert replay(record, 8.0, 1.0, cfg) == pytest.approx(2.0)  # 8 px trained / 4 px found
    assert replay(record, 8.0, 0.5, cfg) == pytest.approx(1.0)  # sqrt(0.5 * 2)
    assert replay(record, 80.0, 1.0, cfg) == pytest.approx(cfg.predict.max_scale)  # clamped to the ladder's top
    assert replay({**record, "evidence_scale": None}, 8.0, 1.0, cfg) == 0.7  # no width found: the choice stands
    assert octaves_off({"deepcrack": [record]}, 8.0, 0.0, cfg) == {"deepcrack": pytest.approx(1.0)}


def test_the_width_weight_is_fitted_to_the_training_geometry_of_the_val_photos(tmp_path):
    import json

    from wpcrack.deploy.calibrate import fit_width_weight, training_factor
    from wpcrack.deploy.detection import WIDTH_WEIGHT_ATTR, probability_map, width_weight
    from wpcrack.io import write_image

    raw = tmp_path / "data" / "raw" / "deepcrack"
    for name in ("100-1", "100-2", "200-1"):  # scenes 100 (val) and 200 (train)
        write_image(raw / "train_img" / f"{name}.jpg", _road(384, 544, 12))
        write_image(raw / "train_lab" / f"{name}.png", np.zeros((384, 544), np.uint8))  # never read
    listing = tmp_path / "data" / "prepared" / "deepcrack" / "split.json"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps({"val": ["100"]}))
    cfg = _cfg("evaluate.tile_size=128", "evaluate.tile_overlap=16", f"paths.data={tmp_path / 'data'}")
    factor = training_factor(cfg.prepare, "deepcrack", 384, 544)
    model = SureOfDarkPixels()
    # the evidence says 2 (the ladder's top); cracks 12 px wide are as wide as the trained ones at the factor
    fitted = fit_width_weight(cfg, model, trained_width=12 * factor, share={"deepcrack": 1.0})
    assert fitted["width_weight"] == 1.0 and fitted["width_fit"]["val_photos"] == {"deepcrack": 2}
    table = fitted["width_fit"]["mean_octaves_off"]
    assert table["1.0"]["deepcrack"] == pytest.approx(0, abs=0.3)
    assert table["0.0"]["deepcrack"] == pytest.approx(np.log2(2 / factor))
    assert fit_width_weight(cfg, model, 3.0, {"synthetic": 1.0}) == {}  # no geometry known: nothing fitted

    assert getattr(model, "training_crack_width") is None  # the fit leaves no width on record
    model.training_crack_width = 12 * factor
    setattr(model, WIDTH_WEIGHT_ATTR, 1.0)  # predict uses the fitted weight unless told to use the setting
    assert width_weight(model, cfg) == 1.0
    assert width_weight(model, load_config(PARAMS, dataset="deepcrack", overrides=["predict.width_from=setting"])) == 0.5
    assert probability_map(model, _road(384, 544, 12), cfg).choice.scale == pytest.approx(factor, rel=0.25)
