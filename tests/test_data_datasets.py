"""WeakDataset contract (docs/architecture.md), seeded augmentation, normalisation; synthetic images."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wpcrack.config import Config, PathsConfig, PrepareConfig, SyntheticPrepare
from wpcrack.data.datasets import WeakDataset, augment, denormalize, normalize
from wpcrack.data.prepare import prepare
from wpcrack.data.synthetic import add_crack, make_image, survey_photo
from wpcrack.errors import DataError


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    syn = SyntheticPrepare(size=40, train_crack=4, train_nocrack=4, val_crack=1, val_nocrack=1, test=2, seed=3)
    return prepare(Config(paths=PathsConfig(data=str(data)), prepare=PrepareConfig(synthetic=syn)), "synthetic")


def test_item_contract(manifest):
    ds = WeakDataset(manifest, "train", crop_size=32, augment=True, seed=1)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["rgb"].shape == (32, 32, 3) and item["rgb"].dtype == torch.uint8
    assert item["label"].dtype == torch.int64 and item["label"].item() in (0, 1)
    assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["has_mask"] is True and item["index"] == 0
    assert torch.allclose(normalize(item["rgb"]), item["image"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    assert ds.labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_augmentation_is_seeded_per_epoch(manifest):
    ds = WeakDataset(manifest, "train", crop_size=24, augment=True, seed=5)
    again = WeakDataset(manifest, "train", crop_size=24, augment=True, seed=5)
    assert torch.equal(ds[1]["rgb"], again[1]["rgb"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["rgb"], again[1]["rgb"])


def test_eval_variant_returns_full_images(manifest):
    ds = WeakDataset(manifest, "test")
    item = ds[0]
    assert item["image"].shape == (3, 40, 40) and item["mask"].sum() > 0
    assert torch.equal(ds[0]["rgb"], item["rgb"])
    centred = WeakDataset(manifest, "val", crop_size=20)[0]
    assert centred["rgb"].shape == (20, 20, 3)


def test_augment_keeps_mask_aligned_and_pads_small_images():
    rng = np.random.default_rng(0)
    rgb = np.zeros((10, 12, 3), np.uint8)
    mask = np.zeros((10, 12), np.uint8)
    rgb[4, :] = 255
    mask[4, :] = 1
    out_rgb, out_mask = augment(rgb, mask, rng, crop_size=16, scale_range=(1.0, 1.0))
    assert out_rgb.shape == (16, 16, 3) and out_mask.shape == (16, 16)
    assert np.array_equal(out_rgb[..., 0] == 255, out_mask == 1)


def test_augment_never_shrinks_an_image_below_the_crop():
    rng = np.random.default_rng(0)
    rgb, mask = np.full((16, 16, 3), 200, np.uint8), np.zeros((16, 16), np.uint8)
    out_rgb, _ = augment(rgb, mask, rng, crop_size=16, scale_range=(0.5, 0.5))
    assert (out_rgb == 200).all()  # no padding: a small crack-free patch must not look padded
    ramp = np.repeat(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    out_rgb, _ = augment(ramp, np.zeros((64, 64), np.uint8), rng, crop_size=32, scale_range=(0.5, 0.5), flip=False)
    span = int(out_rgb[0, -1, 0]) - int(out_rgb[0, 0, 0])
    assert span > 200  # a large image still shrinks (64 -> 32, the whole ramp); a plain 32 crop spans 124


def test_normalize_round_trip():
    rgb = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    x = normalize(rgb)
    assert x.shape == (2, 3, 5, 6)
    assert torch.equal(denormalize(x), rgb)
    mean = np.array([[[124, 116, 104]]], np.uint8)  # ImageNet mean colour -> ~0
    assert normalize(mean).abs().max() < 0.02


def test_empty_split_is_an_error(tmp_path):
    syn = SyntheticPrepare(size=16, train_crack=1, train_nocrack=0, val_crack=0, val_nocrack=0, test=1, seed=0)
    path = prepare(Config(paths=PathsConfig(data=str(tmp_path)), prepare=PrepareConfig(synthetic=syn)), "synthetic")
    with pytest.raises(DataError, match="no rows in split 'val'"):
        WeakDataset(path, "val")


def test_synthetic_is_deterministic_thin_and_exact():
    a_rgb, a_mask = make_image(7, "train", 3, 64, crack=True)
    b_rgb, b_mask = make_image(7, "train", 3, 64, crack=True)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_rgb, make_image(7, "train", 4, 64, crack=True)[0])
    assert set(np.unique(a_mask)) == {0, 255} and 0 < (a_mask > 0).mean() < 0.2
    rgb, mask = make_image(7, "val", 0, 64, crack=False)
    assert rgb.shape == (64, 64, 3) and mask.max() == 0


def _thin(mask: np.ndarray) -> bool:
    """Lines 1-3 px wide: a 5x5 erosion leaves only where they cross or bend (round line caps)."""
    eroded = cv2.erode((mask > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
    return bool(mask.any()) and eroded.sum() <= 0.1 * (mask > 0).sum()


def test_synthetic_cracks_are_thin_and_darker():
    darker = 0
    for i in range(10):
        rgb, m = make_image(1, "train", i, 96, crack=True)
        assert _thin(m), i
        grey = rgb.mean(axis=2)
        near = cv2.dilate(m, np.ones((7, 7), np.uint8)) > 0
        darker += grey[m > 0].mean() < grey[near & (m == 0)].mean()
    assert darker == 10


def test_synthetic_cracks_fade_in_and_out_along_their_length():
    """A crack's darkening varies along it (fades), never vanishing entirely where the mask says crack."""
    h = w = 200
    spread = []
    for seed in range(6):
        depth, mask = np.zeros((h, w), np.float32), np.zeros((h, w), np.uint8)
        add_crack(np.random.default_rng(seed), depth, mask, np.array([100.0, 100.0]), 150.0)
        values = depth[mask > 0]
        assert values.min() > 0
        spread.append(values.min() / values.max())
    assert np.median(spread) < 0.5, spread


def test_crack_free_images_hold_dark_line_like_marks():
    """What makes a dark-line threshold fail on roads: crack-free images with long dark marks (joints,
    tar, shadows, paint edges, stains) in about as many images as crack images have them."""
    from wpcrack.config import DarknessConfig
    from wpcrack.method.darkness import dark_pixels

    def long_dark(rgb):
        return int(dark_pixels(rgb, DarknessConfig()).sum() >= 150)

    free = sum(long_dark(make_image(5, "train", i, 96, crack=False)[0]) for i in range(40))
    assert free >= 16, free  # at least 40 % of the crack-free images would fool a threshold


def test_synthetic_marks_follow_one_law_for_both_classes():
    """Long dark marks away from the cracks are as common in crack images as in crack-free ones, so the
    image label says nothing about them (a classifier cannot learn "dark mark = crack")."""
    from wpcrack.config import DarknessConfig
    from wpcrack.method.darkness import dark_pixels

    share = {}
    for crack in (True, False):
        hits = 0
        for i in range(60):
            rgb, mask = make_image(9, "train", i, 96, crack=crack)
            away = cv2.dilate(mask, np.ones((9, 9), np.uint8)) == 0
            hits += int((dark_pixels(rgb, DarknessConfig()).astype(bool) & away).sum() >= 150)
        share[crack] = hits / 60
    assert share[False] >= 0.3 and abs(share[True] - share[False]) < 0.2, share


def test_survey_photo_is_at_the_training_pixel_scale():
    rgb, mask = survey_photo(3, 600, 800)
    assert rgb.shape == (600, 800, 3) and rgb.dtype == np.uint8 and mask.shape == (600, 800)
    assert _thin(mask) and 0.001 < mask.mean() < 0.05
    again, _ = survey_photo(3, 600, 800)
    assert np.array_equal(rgb, again) and not np.array_equal(rgb, survey_photo(4, 600, 800)[0])


def test_cli_writes_a_survey_photo_and_its_truth(tmp_path):
    from wpcrack.cli import main
    from wpcrack.io import read_image, read_mask

    assert main(["survey-photo", str(tmp_path / "road.jpg"), "--height", "300", "--width", "500"]) == 0
    assert read_image(tmp_path / "road.jpg").shape == (300, 500, 3)
    assert read_mask(tmp_path / "road_truth.png").any()
    assert main(["survey-photo", str(tmp_path / "tiny.jpg"), "--height", "50"]) == 2


def test_synthetic_is_fast():
    start = time.perf_counter()
    for i in range(20):
        make_image(0, "train", i, 96, crack=i % 2 == 0)
    assert time.perf_counter() - start < 1.0


def test_whole_image_pseudo_labels_are_cropped_and_flipped_with_the_image(manifest):
    ds = WeakDataset(manifest, "train", crop_size=24, augment=True, seed=2)
    plain = ds[0]
    rgb, _, _ = ds.raw(0)
    # A label that encodes each pixel's column parity in the image: it must follow the crop and flip.
    label = (np.arange(rgb.shape[1])[None, :] % 2).repeat(rgb.shape[0], 0).astype(np.uint8)
    label[:, 0] = 255
    ds.pseudo = {0: label}
    item = ds[0]
    assert torch.equal(item["rgb"], plain["rgb"]) and torch.equal(item["mask"], plain["mask"])
    assert item["has_pseudo"] is True and ds[1]["has_pseudo"] is False and ds[1]["pseudo"].sum() == 0
    cols = item["pseudo"][0]
    assert set(cols.unique().tolist()) <= {0.0, 1.0, 255.0}
    assert all(len(set(cols[:, j].tolist())) == 1 for j in range(cols.shape[1]))  # whole columns
    ds.pseudo = {0: label[:-1]}
    with pytest.raises(DataError, match="pseudo label"):
        ds[0]


def test_corrupt_image_in_a_worker_is_a_data_error_naming_the_file(manifest, tmp_path):
    """The paper profile loads with workers: a corrupt file must still reach the CLI as a DataError."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(manifest.parent, root)
    ds = WeakDataset(root / manifest.name, "train", crop_size=32)
    bad = root / ds.frame.iloc[0]["image"]
    bad.write_bytes(b"not a png")
    loader = DataLoader(torch.utils.data.Subset(ds, [0]), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert info.value.path == bad, str(info.value)
    assert info.value.problem and "Traceback" not in str(info.value)
