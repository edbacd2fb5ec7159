"""Optimisers (poly decay, ACR's parameter groups, frozen BatchNorm) and checkpoint files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wpcrack.config import load_config
from wpcrack.errors import TrainingError
from wpcrack.models.backbones import Backbone
from wpcrack.models.wpcracknet import build_model
from wpcrack.train import checkpoint
from wpcrack.train.optim import build_optimizers, freeze_batchnorm
from wpcrack.train.phases import Runtime, reconstructor_step
from test_train_phases import TINY, _batch

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _cfg(*overrides: str):
    return load_config(PARAMS, dataset="synthetic", profile="smoke", overrides=[*TINY, *overrides])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_poly_decay_and_parameter_groups():
    cfg = _cfg("model.pretrained=false", "train.lr=0.01", "train.poly_power=0.9")
    optimizers = build_optimizers(build_model(cfg), cfg, max_iterations=10)
    # Without pretrained weights every layer is new: weights at lr, biases and norms at 2 lr.
    assert sorted({g["lr"] for g in optimizers.classifier.param_groups}) == pytest.approx([0.01, 0.02])
    for _ in range(4):
        optimizers.step_schedules()
    weights = next(g for g in optimizers.classifier.param_groups if g["weight_decay"] > 0)
    assert weights["lr"] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)
    assert optimizers.detector.param_groups[0]["lr"] == cfg.train.lr_detector  # AdamW, no decay


def test_pretrained_backbones_train_ten_times_slower_than_new_layers():
    model = build_model(_cfg("model.pretrained=false"))
    cfg = _cfg("model.pretrained=false", "model.weights_path=weights.pt")  # a weight file counts as pretrained
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    backbone = {id(p) for m in model.classifier.modules() if isinstance(m, Backbone) for p in m.parameters()}
    for group in optimizers.classifier.param_groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1
        is_bias = group["weight_decay"] == 0
        expected = (1, 2) if in_backbone.pop() else (10, 20)
        assert group["lr"] == pytest.approx(cfg.train.lr * expected[is_bias])


def test_frozen_batchnorm_keeps_statistics_and_affine_parameters():
    cfg = _cfg("train.freeze_bn=true", "train.detector_target=mask")
    model = build_model(cfg)
    freeze_batchnorm(model)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    bns = [m for m in model.reconstructor.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    convs = [p.clone() for p in model.reconstructor.decoder.parameters()]
    reconstructor_step(model, optimizers, _batch(), cfg, Runtime(torch.device("cpu")), pool=None)
    assert bns and all(torch.equal(v, m.state_dict()[k]) for m, b in zip(bns, before) for k, v in b.items())
    assert any(not torch.equal(a, p) for a, p in zip(convs, model.reconstructor.decoder.parameters()))


def test_random_generators_round_trip_through_a_weights_only_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.rng_state(generator), "config": {"a": (1, None)}})
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=generator))

    expected = draw()
    state = checkpoint.load(tmp_path / "c.pt")
    checkpoint.set_rng_state(state["rng"], generator)
    assert draw() == expected
    assert state["config"] == {"a": (1, None)}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_a_broken_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot be loaded"):
        checkpoint.load(tmp_path / "bad.pt")
    with pytest.raises(TrainingError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")
