"""The three training phases: each trains its own network and leaves the others untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from network_state import changed, snapshot
from wpcrack.config import load_config
from wpcrack.errors import TrainingError
from wpcrack.models.wpcracknet import build_model
from wpcrack.method.pseudo_labels import CRFPool
from wpcrack.train import phases
from wpcrack.train.optim import build_optimizers
from wpcrack.train.phases import Batch, Runtime, classifier_step, detector_step, reconstructor_step, train_step

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["model.cam_channels=16", "model.paam_channels=8", "model.paam_reduction=4", "model.detector_channels=8",
        "model.decoder_channels=8", "pseudo_labels.workers=0", "pseudo_labels.iterations=2", "train.lr=0.05",
        # the mechanics these tests check are those of the paper's path (CRF labels of crop CAMs, the
        # transposed-conv detector), which the smoke profile no longer takes
        "pseudo_labels.method=crf", "pseudo_labels.source=crop", "pseudo_labels.negatives=false",
        "model.detector_decoder=transposed", "loss.det_dice=0.0"]


def _cfg(*overrides: str, variant: str = "full"):
    return load_config(PARAMS, dataset="synthetic", variant=variant, profile="smoke", overrides=[*TINY, *overrides])


def _batch(seed: int = 0, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8, generator=g)
    mask = torch.zeros(4, 1, size, size)
    mask[:, :, size // 2 - 1 : size // 2 + 1, 4:-4] = 1.0
    from wpcrack.data.datasets import normalize

    return Batch(image=normalize(rgb), rgb=rgb, label=torch.tensor([1, 0, 1, 1]), mask=mask,
                 has_mask=torch.ones(4, dtype=torch.bool))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = _cfg("train.detector_target=mask")
    model = build_model(cfg)
    return cfg, model, build_optimizers(model, cfg, max_iterations=10), Runtime(torch.device("cpu"))


def test_each_phase_updates_only_its_own_network(setup):
    cfg, model, optimizers, runtime = setup
    batch = _batch()

    before = snapshot(model)
    _, carry = reconstructor_step(model, optimizers, batch, cfg, runtime, pool=None)
    after = snapshot(model)
    assert changed(before, after) == {"reconstructor"}

    classifier_step(model, optimizers, batch, cfg, runtime, carry)
    before, after = after, snapshot(model)
    assert changed(before, after) == {"classifier"}

    result = detector_step(model, optimizers, batch, cfg, runtime, carry)
    before, after = after, snapshot(model)
    assert result.losses["det_images"] == 3
    assert changed(before, after) == {"detector"}
    assert all(p.grad is None for p in model.parameters())  # frozen networks never got gradients
    assert all(p.requires_grad for p in model.parameters())  # freezing is undone after each phase


def test_detector_loss_reaches_the_encoders_only_when_configured():
    torch.manual_seed(0)
    cfg = _cfg("train.detector_target=mask", "train.detach_detector_features=false")
    model = build_model(cfg)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    runtime = Runtime(torch.device("cpu"))
    batch = _batch()
    _, carry = reconstructor_step(model, optimizers, batch, cfg, runtime, pool=None)
    classifier_step(model, optimizers, batch, cfg, runtime, carry)
    before = snapshot(model)
    decoder = {k: v.clone() for k, v in model.reconstructor.decoder.state_dict().items()}
    detector_step(model, optimizers, batch, cfg, runtime, carry)
    assert changed(before, snapshot(model)) == {"classifier", "reconstructor", "detector"}
    assert all(torch.equal(v, model.reconstructor.decoder.state_dict()[k]) for k, v in decoder.items())


def test_classifier_gradients_flow_through_the_frozen_decoder(setup, monkeypatch):
    cfg, model, optimizers, runtime = setup
    batch = _batch()
    _, carry = reconstructor_step(model, optimizers, batch, cfg, runtime, pool=None)
    seen = {}

    def spy(q, labels, image_c, o_c_hat, o_r_hat, *rest):
        seen["o_c_hat"] = o_c_hat
        return real(q, labels, image_c, o_c_hat, o_r_hat, *rest)

    real = phases.classifier_loss
    monkeypatch.setattr(phases, "classifier_loss", spy)
    parts = classifier_step(model, optimizers, batch, cfg, runtime, carry)
    assert seen["o_c_hat"].requires_grad and seen["o_c_hat"].shape[0] == 3
    assert parts["recon2_c"] < 0 and parts["recon2_r"] < 0


def test_without_adversarial_training_the_classifier_has_no_reconstruction_terms():
    cfg = _cfg("train.adversarial=false", "train.detector_target=mask")
    model = build_model(cfg)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    runtime = Runtime(torch.device("cpu"))
    result = train_step(model, optimizers, _batch(), cfg, runtime, pool=None)
    assert result.losses["cls_recon2_c"] == 0 and result.losses["cls_recon2_r"] == 0
    assert result.losses["cls_cec"] > 0  # CECCM stays on
    assert "rec_recon1_c" in result.losses  # the reconstructor still trains (Rec.E feeds the detector)


def test_classifier_only_baseline_never_runs_the_reconstructor():
    cfg = _cfg("train.detector_target=mask", variant="cls_only")
    model = build_model(cfg)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    before = snapshot(model)
    result = train_step(model, optimizers, _batch(), cfg, Runtime(torch.device("cpu")), pool=None)
    assert changed(before, snapshot(model)) == {"classifier", "detector"}
    assert not any(k.startswith("rec_") for k in result.losses) and result.losses["cls_cec"] == 0


def test_pseudo_labels_come_from_the_crf_pool_and_empty_ones_are_skipped():
    cfg = _cfg("pseudo_labels.min_pixels=0")
    model = build_model(cfg)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    runtime = Runtime(torch.device("cpu"))
    with CRFPool(cfg.pseudo_labels) as pool:
        result = train_step(model, optimizers, _batch(), cfg, runtime, pool)
        assert len(result.pseudo_labels) == 3 and all(p.shape == (32, 32) for p in result.pseudo_labels)
        assert result.kept == [True] * 3 and result.losses["det_images"] == 3
        assert set(result.seconds) == {"rec", "cls", "det", "crf_wait", "step"}

        strict = _cfg(f"pseudo_labels.min_pixels={32 * 32 + 1}")
        result = train_step(model, optimizers, _batch(), strict, runtime, pool)
        assert result.kept == [False] * 3 and "det_total" not in result.losses


def test_a_non_finite_loss_stops_before_any_update(setup, monkeypatch):
    cfg, model, optimizers, runtime = setup
    real = phases.reconstructor_loss
    monkeypatch.setattr(phases, "reconstructor_loss",
                        lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingError, match="reconstructor loss is not finite"):
        reconstructor_step(model, optimizers, _batch(), cfg, runtime, pool=None)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_whole_image_labels_train_crack_images_and_negatives_train_towards_background():
    torch.manual_seed(0)
    cfg = _cfg("pseudo_labels.source=image", "pseudo_labels.min_pixels=4", "pseudo_labels.negatives=true")
    model = build_model(cfg)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    batch = _batch()
    pseudo = torch.zeros_like(batch.mask)
    pseudo[0, :, 10:12, 4:-4] = 1.0  # image 0: a usable label; image 2: too few pixels; image 3: none made
    pseudo[2, :, 10, 4:6] = 1.0
    pseudo[0, :, 0, :] = 255.0
    batch.pseudo, batch.has_pseudo = pseudo, torch.tensor([True, True, True, False])
    carry = phases.Carry()
    target, usable, labels = phases.targets(batch, cfg, carry, whole_image=True)
    assert usable.tolist() == [True, True, False, False]  # image 1 has no crack: a negative
    assert torch.equal(target[0], pseudo[0]) and target[1].sum() == 0 and labels == []
    runtime = Runtime(torch.device("cpu"))
    _, carry = reconstructor_step(model, optimizers, batch, cfg, runtime, pool=None)
    classifier_step(model, optimizers, batch, cfg, runtime, carry)
    result = detector_step(model, optimizers, batch, cfg, runtime, carry)
    assert result.losses["det_images"] == 2

    off = _cfg("pseudo_labels.source=image", "pseudo_labels.min_pixels=4")
    assert phases.targets(batch, off, carry, whole_image=True)[1].tolist() == [True, False, False, False]
    batch.pseudo = None
    with pytest.raises(TrainingError, match="whole-image labels"):
        phases.targets(batch, off, carry, whole_image=True)


def test_finetuning_trains_the_classifier_and_detector_never_the_reconstructor():
    from wpcrack.train import finetune

    torch.manual_seed(0)
    cfg = _cfg("train.detector_target=mask", "train.finetune_epochs=1")
    model = build_model(cfg)
    optimizer, schedule = finetune.build_optimizer(model, cfg, total_steps=4)
    before = snapshot(model)
    result = finetune.finetune_step(model, optimizer, schedule, _batch(), cfg, Runtime(torch.device("cpu")))
    assert changed(before, snapshot(model)) == {"classifier", "detector"}
    assert result.losses["det_images"] == 3 and result.losses["cls_total"] > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert schedule.last_epoch == 1  # the one-cycle schedule advanced one step


def test_finetuning_targets_are_whole_image_labels_even_for_crop_labels():
    """The paper's crop labels come from the CRF pool during the step; fine-tuning has none, it
    trains on the whole-image labels made when it starts."""
    cfg = _cfg("pseudo_labels.source=crop", "pseudo_labels.min_pixels=4")
    batch = _batch()
    pseudo = torch.zeros_like(batch.mask)
    pseudo[0, :, 10:12, 4:-4] = 1.0
    batch.pseudo, batch.has_pseudo = pseudo, torch.ones(4, dtype=torch.bool)
    target, usable, _ = phases.targets(batch, cfg, phases.Carry(), whole_image=True)
    assert usable.tolist() == [True, False, False, False] and torch.equal(target[0], pseudo[0])
    assert phases.targets(batch, cfg, phases.Carry(), whole_image=False)[1].tolist() == [False] * 4  # no CRF labels: nothing
