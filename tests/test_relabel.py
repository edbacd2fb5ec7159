"""Whole-image pseudo labels (pseudo_labels.source: image): made from the classifier's CAM of the
stored image, kept with the dataset for its crack rows only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wpcrack.config import Config, PathsConfig, PrepareConfig, SyntheticPrepare, load_config
from wpcrack.data.datasets import WeakDataset
from wpcrack.data.prepare import prepare
from wpcrack.models.wpcracknet import build_model
from wpcrack.method.pseudo_labels import IGNORE, CRFPool
from wpcrack.train.phases import Runtime
from wpcrack.train.relabel import image_cams, refresh

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["model.cam_channels=16", "model.paam_channels=8", "model.paam_reduction=4", "model.detector_channels=8",
        "model.decoder_channels=8", "pseudo_labels.workers=0", "pseudo_labels.iterations=2",
        # the mechanics these tests check are those of the paper's path (CRF labels of crop CAMs, the
        # transposed-conv detector), which the smoke profile no longer takes
        "pseudo_labels.method=crf", "pseudo_labels.source=crop", "pseudo_labels.negatives=false",
        "model.detector_decoder=transposed", "loss.det_dice=0.0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    syn = SyntheticPrepare(size=40, train_crack=3, train_nocrack=2, val_crack=1, val_nocrack=1, test=2, seed=5)
    return prepare(Config(paths=PathsConfig(data=str(data)), prepare=PrepareConfig(synthetic=syn)), "synthetic")


class _Half(torch.nn.Module):
    """A classifier whose crack CAM is the image's left half (its mirror image under a flip)."""

    def forward(self, x):
        cam = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        cam[:, 1, :, : x.shape[-1] // 2] = 1.0
        return type("Out", (), {"cam": cam})()


def test_image_cams_average_scales_and_flips_and_peak_at_one():
    x = torch.zeros(2, 3, 16, 16)
    plain = image_cams(_Half(), x, (1.0,), flip=False)
    assert plain.shape == (2, 16, 16) and plain.max() == pytest.approx(1.0)
    assert plain[:, :, :8].min() > 0.99 and plain[:, :, 8:].max() < 0.01
    flipped = image_cams(_Half(), x, (1.0, 0.5), flip=True)
    # The left half (plain views) and the right half (flipped views) each get half the votes.
    assert flipped[:, :, :8].mean().item() == pytest.approx(flipped[:, :, 8:].mean().item(), rel=0.05)


@pytest.mark.parametrize("method", ["crf", "darkness"])
def test_refresh_labels_every_crack_row_in_train_mode_afterwards(manifest, method):
    torch.manual_seed(0)
    cfg = load_config(PARAMS, dataset="synthetic", variant="full", profile="smoke",
                      overrides=[*TINY, "pseudo_labels.source=image", f"pseudo_labels.method={method}",
                                 "pseudo_labels.ignore_band=1"])
    model = build_model(cfg)
    model.train()
    dataset = WeakDataset(manifest, "train", crop_size=32, augment=True, seed=0)
    with CRFPool(cfg.pseudo_labels) as pool:
        diag = refresh(model, dataset, cfg, Runtime(torch.device("cpu")), pool)
    crack_rows = [i for i, label in enumerate(dataset.labels) if label == 1]
    assert sorted(dataset.pseudo) == crack_rows
    for i in crack_rows:
        rgb = dataset.raw(i)[0]
        assert dataset.pseudo[i].shape == rgb.shape[:2]
        assert set(np.unique(dataset.pseudo[i])) <= {0, 1, IGNORE}
    assert 0.0 <= diag["pseudo_label_iou"] <= 1.0 and 0.0 <= diag["pseudo_label_kept"] <= 1.0
    assert all(m.training for m in model.modules())
    assert dataset[crack_rows[0]]["has_pseudo"] is True


def test_self_training_labels_are_the_detectors_own_masks(manifest):
    from wpcrack.data.datasets import normalize
    from wpcrack.train.finetune import detector_labels, make_labels

    torch.manual_seed(0)
    cfg = load_config(PARAMS, dataset="synthetic", variant="full", profile="smoke",
                      overrides=[*TINY, "train.finetune_epochs=1", "train.finetune_labels=detector"])
    model = build_model(cfg)
    dataset = WeakDataset(manifest, "train", crop_size=32, augment=True, seed=0)
    last = [m for m in model.detector.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    model.eval()
    with torch.no_grad():  # centre the untrained detector's logits so that it marks about half the pixels
        logits = model(normalize(torch.from_numpy(dataset.raw(0)[0][None])))
        last.bias -= logits.median()
    diag = detector_labels(model, dataset, cfg, Runtime(torch.device("cpu")))
    crack_rows = [i for i, label in enumerate(dataset.labels) if label == 1]
    assert sorted(dataset.pseudo) == crack_rows
    model.eval()
    for i in crack_rows:
        rgb = dataset.raw(i)[0]
        with torch.no_grad():
            expected = (torch.sigmoid(model(normalize(torch.from_numpy(rgb[None]))))[0, 0] > 0.5).numpy()
        assert np.array_equal(dataset.pseudo[i], expected.astype(np.uint8))
        assert 0 < dataset.pseudo[i].sum() < dataset.pseudo[i].size  # an untrained detector marks some pixels
    assert 0.0 <= diag["pseudo_label_iou"] <= 1.0
    supervised = load_config(PARAMS, dataset="synthetic", variant="supervised", profile="smoke",
                             overrides=[*TINY, "train.finetune_epochs=1"])
    assert make_labels(model, dataset, supervised, Runtime(torch.device("cpu")), None) == {} and dataset.pseudo == {}


class _RecordingPool(CRFPool):
    """The real pool, inline, remembering which settings labelled how many images."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def submit(self, rgbs, cams, cfg=None):
        self.calls.append((cfg, len(rgbs)))
        return super().submit(rgbs, cams, cfg)


def test_a_composite_dataset_labels_each_source_with_its_own_settings(manifest, tmp_path):
    import pandas as pd

    frame = pd.read_csv(manifest, keep_default_na=False)
    crack_train = frame.index[(frame["split"] == "train") & (frame["label"] == 1)]
    frame.loc[crack_train[:1], "dataset"] = "cfd"  # one crack row from another source
    mixed = manifest.parent / "mixed.csv"
    frame.to_csv(mixed, index=False)
    cfg = load_config(PARAMS, dataset="synthetic", variant="full", profile="smoke",
                      overrides=[*TINY, "pseudo_labels.source=image", "pseudo_labels.method=darkness",
                                 "pseudo_labels.by_source={cfd: {darkness: {offset: 3.0}, ignore_band: 2}}"])
    dataset = WeakDataset(mixed, "train")
    with _RecordingPool(cfg.pseudo_labels) as pool:
        refresh(build_model(cfg), dataset, cfg, Runtime(torch.device("cpu")), pool)
    by_offset = {}
    for used, n in pool.calls:
        by_offset[(used.darkness.offset, used.ignore_band)] = by_offset.get((used.darkness.offset, used.ignore_band), 0) + n
    assert by_offset == {(3.0, 2): 1, (cfg.pseudo_labels.darkness.offset, cfg.pseudo_labels.ignore_band): len(crack_train) - 1}
