"""CAM normalisation and the losses of eqs. 13-22, including which parameters each step trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wpcrack.method.cam import crack_cam
from wpcrack.config import CECCMConfig, Config, LossConfig, ModelConfig
from wpcrack.method.losses import classifier_loss, detector_loss, one_hot, reconstructor_loss
from wpcrack.models.wpcracknet import build_model

TINY = dict(backbone="mobilenet_v2", pretrained=False, cam_channels=16, paam_channels=16,
            paam_reduction=4, detector_channels=8, decoder_channels=8)
SIZE = (40, 44)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- crack_cam ---------------------------------------------------------------------------------


def test_crack_cam_zeroes_no_crack_images_and_normalises():
    raw = torch.randn(3, 2, 5, 6)
    m = crack_cam(raw, torch.tensor([1, 0, 1]))
    assert m.shape == (3, 1, 5, 6)
    assert m[1].abs().sum() == 0
    for i in (0, 2):
        assert m[i].min() == 0 and m[i].max() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(m, crack_cam(raw, one_hot(torch.tensor([1, 0, 1]))))
    up = crack_cam(raw, torch.tensor([1, 0, 1]), size=(37, 45))
    assert up.shape == (3, 1, 37, 45) and bool(((up >= 0) & (up <= 1)).all())


def test_crack_cam_flat_map_and_gradient():
    assert torch.equal(crack_cam(torch.zeros(2, 2, 3, 3)), torch.zeros(2, 1, 3, 3))
    raw = torch.randn(2, 2, 4, 4, requires_grad=True)
    crack_cam(raw, torch.tensor([1, 1]), size=(32, 32)).pow(2).sum().backward()
    assert torch.isfinite(raw.grad).all()
    assert raw.grad[:, 1].abs().sum() > 0 and raw.grad[:, 0].abs().sum() == 0


# --- the loss functions ------------------------------------------------------------------------


def test_reconstructor_loss_by_hand():
    image = torch.ones(1, 3, 4, 4)
    mask = torch.full((1, 1, 4, 4), 0.25, requires_grad=True)
    q_rec = torch.zeros(2, 2, requires_grad=True)
    total, parts = reconstructor_loss(
        q_rec, torch.tensor([1, 0]), image, torch.zeros_like(image), torch.ones_like(image),
        mask, LossConfig(),
    )
    assert parts["cls1"] == pytest.approx(math.log(2))
    assert parts["recon1_c"] == pytest.approx(0.75)  # mean |(1 - 0.25) * (1 - 0)|
    assert parts["recon1_r"] == pytest.approx(0.0)
    assert parts["total"] == pytest.approx(math.log(2) + 0.5 * 0.75)
    total.backward()
    assert mask.grad is None and q_rec.grad is not None


def test_classifier_loss_terms_and_detached_reference():
    cfg = LossConfig()
    image = torch.ones(2, 3, 4, 4)
    o_c = torch.zeros(2, 3, 4, 4, requires_grad=True)
    m_c = torch.rand(2, 1, 4, 4, requires_grad=True)
    m_rec = torch.rand(2, 1, 4, 4, requires_grad=True)
    q = torch.zeros(2, 2)
    total, parts = classifier_loss(q, torch.tensor([1, 1]), image, o_c, torch.zeros(2, 3, 4, 4), m_c, m_rec,
                                   cfg, CECCMConfig())
    assert parts["recon2_c"] == pytest.approx(-float((1 - m_c.detach()).mean()))
    assert parts["recon2_r"] == pytest.approx(-float(m_c.detach().mean()))
    assert parts["cec"] > 0
    expected = parts["cls2"] + 0.8 * parts["recon2_c"] + 0.3 * parts["recon2_r"] + 0.5 * parts["cec"]
    assert parts["total"] == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert m_rec.grad is None and o_c.grad is not None and m_c.grad is not None
    _, off = classifier_loss(q, torch.tensor([1, 1]), image, o_c, o_c, m_c, m_rec, cfg, CECCMConfig(enabled=False))
    assert off["cec"] == 0


def test_no_crack_images_make_reconstruction_terms_zero():
    empty = torch.zeros(0, 3, 8, 8)
    m = torch.zeros(0, 1, 1, 1)
    _, parts = reconstructor_loss(torch.zeros(2, 2), torch.tensor([0, 0]), empty, empty, empty, m, LossConfig())
    assert parts["recon1_c"] == 0 and parts["recon1_r"] == 0 and math.isfinite(parts["total"])
    _, parts = classifier_loss(torch.zeros(2, 2), torch.tensor([0, 0]), empty, empty, empty, m, m, LossConfig(),
                               CECCMConfig())
    assert all(math.isfinite(v) for v in parts.values())


def test_detector_loss_valid_images_and_pos_weight():
    logits = torch.randn(3, 1, 6, 6, requires_grad=True)
    target = (torch.rand(3, 1, 6, 6) > 0.7).float()
    valid = torch.tensor([True, False, True])
    total, parts = detector_loss(logits, target, valid, pos_weight=5.0)
    expected = F.binary_cross_entropy_with_logits(logits[valid], target[valid], pos_weight=torch.tensor(5.0))
    assert total.item() == pytest.approx(expected.item())
    assert parts["det_images"] == 2
    none, _ = detector_loss(logits, target, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none == 0 and logits.grad.abs().sum() == 0


# --- gradient routing through the model --------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, *SIZE), torch.tensor([1, 0, 1])


def _fresh_model():
    torch.manual_seed(0)
    return build_model(Config(model=ModelConfig(**TINY)))


def _has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def _no_grad(module: nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def test_reconstructor_step_trains_only_the_reconstructor(batch):
    x, labels = batch
    model = _fresh_model()
    crack = labels == 1
    with torch.no_grad():
        m_c = crack_cam(model.classifier(x).cam, labels)
    enc = model.reconstructor.encode(x)
    o_c = model.reconstructor.decode(enc.fused * m_c, SIZE)
    o_r = model.reconstructor.decode(enc.fused * (1 - m_c), SIZE)
    m_rec = crack_cam(enc.cam, labels)
    loss, _ = reconstructor_loss(enc.logits, labels, x[crack], o_c[crack], o_r[crack], m_rec[crack], LossConfig())
    loss.backward()
    assert _no_grad(model.classifier) and _no_grad(model.paam) and _no_grad(model.detector)
    for part in (model.reconstructor.encoder.backbone, model.reconstructor.encoder.head,
                 model.reconstructor.encoder.fuse, model.reconstructor.decoder):
        assert _has_grad(part)


@pytest.mark.parametrize("adversarial_only", [False, True])
def test_classifier_step_trains_only_the_classifier(batch, adversarial_only):
    """With only the recon2 terms the classifier still learns: M_C reaches it through Rec.D(Z * M_C)."""
    x, labels = batch
    model = _fresh_model()
    model.reconstructor.requires_grad_(False)
    cfg = LossConfig(lambda_c2=0.0, lambda_cec=0.0) if adversarial_only else LossConfig()
    crack = labels == 1
    with torch.no_grad():
        enc = model.reconstructor.encode(x)
    cls = model.classifier(x)
    m_c = crack_cam(cls.cam, labels)
    o_c = model.reconstructor.decode(enc.fused * m_c, SIZE)
    o_r = model.reconstructor.decode(enc.fused * (1 - m_c), SIZE)
    loss, _ = classifier_loss(
        cls.logits, labels, x[crack], o_c[crack], o_r[crack],
        crack_cam(cls.cam, labels, SIZE)[crack], crack_cam(enc.cam, labels, SIZE)[crack], cfg, CECCMConfig(),
    )
    loss.backward()
    assert _has_grad(model.classifier.head) and _has_grad(model.classifier.backbone)
    assert _no_grad(model.reconstructor) and _no_grad(model.paam) and _no_grad(model.detector)


def test_detector_step_with_detached_features_trains_only_paam_and_detector(batch):
    x, labels = batch
    model = _fresh_model()
    cls = model.classifier(x)
    enc = model.reconstructor.encode(x)
    logits = model.detect(cls.mid.detach(), enc.mid.detach(), SIZE)
    target = (torch.rand_like(logits) > 0.8).float()
    loss, _ = detector_loss(logits, target, labels == 1)
    loss.backward()
    assert _has_grad(model.paam) and _has_grad(model.detector)
    assert _no_grad(model.classifier) and _no_grad(model.reconstructor)


def test_detector_loss_ignores_marked_pixels_and_adds_dice():
    from wpcrack.method.losses import detector_loss
    from wpcrack.method.pseudo_labels import IGNORE

    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [float(IGNORE), 1.0]]]])
    total, parts = detector_loss(logits, target)
    # BCE over the 3 known pixels: -log(1 - s(0)), -log s(2), -log s(3)
    s = torch.sigmoid
    expected = (-torch.log(1 - s(torch.tensor(0.0))) - torch.log(s(torch.tensor(2.0))) - torch.log(s(torch.tensor(3.0)))) / 3
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    with_dice, parts = detector_loss(logits, target, dice=1.0)
    p = s(torch.tensor([0.0, 2.0, 3.0]))
    dice = 1 - (2 * (p[1] + p[2]) + 1) / (p.sum() + 2 + 1)
    assert parts["det_dice"] == pytest.approx(dice.item(), rel=1e-5)
    assert with_dice.item() == pytest.approx(expected.item() + dice.item(), rel=1e-5)
