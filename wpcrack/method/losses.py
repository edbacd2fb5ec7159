"""Losses of paper section 3.4 (eqs. 13-22), each returning (total, named components).

Conventions where the paper is silent:
- ``|.|_1`` in eqs. 14-19 is the mean over crack images, channels and pixels of the masked absolute
  difference (``torch.nn.L1Loss`` on masked tensors), so weights do not depend on the image size.
- The reconstruction terms concern crack images ``I_C`` only: callers pass the crack images'
  tensors (possibly none, then those terms are 0). Masks may be at CAM or image resolution.
- Masks that weight a reconstruction error are detached, as in ACR: they say where to compare, and
  the adversarial signal reaches the classifier through the reconstructions ``O = Rec.D(Z * M_C)``.
  In the classifier step the reconstructor's CAM is a fixed reference for CECCM (also detached).
- The returned components are Python floats, for logging; ``total`` is the tensor to backpropagate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wpcrack.method.cam import crack_labels
from wpcrack.method.ceccm import ceccm_loss
from wpcrack.config import CECCMConfig, LossConfig
from wpcrack.models.backbones import upsample_to_input
from wpcrack.method.pseudo_labels import IGNORE


def one_hot(labels: Tensor) -> Tensor:
    """T = [1, 0] (road) or [0, 1] (crack) per image, from [B] 0/1 labels (or one-hot already)."""
    crack = crack_labels(labels)
    return torch.stack([1.0 - crack, crack], dim=1)


def image_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Eqs. 13 / 17: BCE with logits between q and T, mean over images and both classes."""
    return F.binary_cross_entropy_with_logits(logits.float(), one_hot(labels).to(logits.device))


def _masked_l1(mask: Tensor, image: Tensor, recon: Tensor) -> Tensor:
    """mean |mask * (image - recon)|; ``mask`` [N, 1, h, w] is detached and brought to image size."""
    if image.shape[0] == 0:
        return recon.sum() * 0.0
    mask = upsample_to_input(mask.detach().float(), tuple(image.shape[-2:]))
    return (mask * (image.float() - recon.float())).abs().mean()


def _items(parts: dict[str, Tensor]) -> dict[str, float]:
    return {name: float(value.detach()) for name, value in parts.items()}


def reconstructor_loss(
    q_rec: Tensor,
    labels: Tensor,
    image_c: Tensor,
    o_c: Tensor,
    o_r: Tensor,
    m_rec_c: Tensor,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """L_Rec (eq. 16) = l_c1 * BCE(q_rec, T) + l_r1^C * |(1 - M^rec_C)(I_C - O_C)| + l_r1^R * |M^rec_C (I_C - O_R)|.

    ``q_rec`` [B, 2] and ``labels`` [B] cover the batch; ``image_c``, ``o_c``, ``o_r`` [N, 3, H, W] and
    ``m_rec_c`` [N, 1, h, w] (the reconstructor's normalised crack CAM) cover its N crack images.
    ``o_c``/``o_r`` are decoded from Z * M_C and Z * (1 - M_C) with M_C from the frozen classifier.
    """
    parts = {
        "cls1": image_bce(q_rec, labels),
        "recon1_c": _masked_l1(1.0 - m_rec_c, image_c, o_c),
        "recon1_r": _masked_l1(m_rec_c, image_c, o_r),
    }
    total = cfg.lambda_c1 * parts["cls1"] + cfg.lambda_r1_c * parts["recon1_c"] + cfg.lambda_r1_r * parts["recon1_r"]
    return total, _items({**parts, "total": total})


def classifier_loss(
    q: Tensor,
    labels: Tensor,
    image_c: Tensor,
    o_c_hat: Tensor,
    o_r_hat: Tensor,
    m_c: Tensor,
    m_rec_c: Tensor,
    cfg: LossConfig,
    ceccm: CECCMConfig,
) -> tuple[Tensor, dict[str, float]]:
    """L_Cls (eq. 21) = l_c2 * BCE(q, T) + l_r2^C * L^C_recon2 + l_r2^R * L^R_recon2 + l_cec * L_CEC.

    L^C_recon2 = -|(1 - M_C)(I_C - O^_C)| and L^R_recon2 = -|M_C (I_C - O^_R)| (eqs. 18-19): the
    classifier is rewarded when the frozen reconstructor fails. ``m_c`` and ``m_rec_c`` [N, 1, h, w]
    are the normalised crack CAMs of the N crack images from Cls and Rec.E; L_CEC (eq. 20) compares
    them at the size given (0 when CECCM is disabled).
    """
    parts = {
        "cls2": image_bce(q, labels),
        "recon2_c": -_masked_l1(1.0 - m_c, image_c, o_c_hat),
        "recon2_r": -_masked_l1(m_c, image_c, o_r_hat),
        "cec": ceccm_loss(m_c, m_rec_c.detach(), ceccm.sigma, ceccm.mode) if ceccm.enabled else q.sum() * 0.0,
    }
    total = (
        cfg.lambda_c2 * parts["cls2"]
        + cfg.lambda_r2_c * parts["recon2_c"]
        + cfg.lambda_r2_r * parts["recon2_r"]
        + cfg.lambda_cec * parts["cec"]
    )
    return total, _items({**parts, "total": total})


def detector_loss(
    logits: Tensor, target: Tensor, valid: Tensor | None = None, pos_weight: float = 1.0, dice: float = 0.0
) -> tuple[Tensor, dict[str, float]]:
    """L_Det (eq. 22): BCE with logits against pseudo labels, mean over the pixels of valid images.

    ``logits`` and ``target`` are [B, 1, H, W]; ``valid`` [B] bool drops images whose pseudo label
    is empty (paper 3.3). No valid image gives a zero loss that still backpropagates.
    ``pos_weight`` > 1 up-weights crack pixels (the release uses 5; the paper's eq. 22 is plain, 1).
    Target pixels equal to ``IGNORE`` (an uncertain band) count in neither term. ``dice`` > 0 adds
    that weight of a soft Dice loss over the batch's pixels, which does not drown a 2 % crack
    class in background the way a pixel mean does.
    """
    if valid is not None:
        logits, target = logits[valid], target[valid]
    if logits.shape[0] == 0:
        total = logits.sum() * 0.0
        return total, {"det": float(total.detach()), "det_images": 0.0}
    known = (target != IGNORE).float()
    target = target.float().clamp(max=1.0) * known
    weight = torch.tensor(pos_weight, device=logits.device, dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, weight=known, pos_weight=weight, reduction="sum")
    parts = {"det_bce": bce / known.sum().clamp(min=1.0)}
    total = parts["det_bce"]
    if dice > 0:
        prob = torch.sigmoid(logits.float()) * known
        parts["det_dice"] = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
        total = total + dice * parts["det_dice"]
    return total, {"det": float(total.detach()), "det_images": float(logits.shape[0]), **_items(parts)}
