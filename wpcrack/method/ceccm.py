"""Centre-enhanced CAM consistency (paper eqs. 4-6 and 20), and the release's plain L1.

Coordinates are pixel centres divided by the map's larger side L = max(H, W): pixel (i, j) sits at
((i + 0.5) / L, (j + 0.5) / L). That keeps the Gaussian round on non-square maps and makes
``sigma`` a fraction of the larger side (config ``ceccm.sigma``), independent of the CAM resolution.

Choices where the paper is silent:
- The Gaussian is a prior: its centre is computed without gradient, so the loss moves CAM values,
  not the centre (a gradient through eq. 4 divides by the CAM's mass and explodes on faint CAMs).
- An all-zero CAM has no centre of mass; it falls back to the centre of the map.
- ``release`` mode is what the authors' code effectively trains: its centre enhancement returns the
  CAM unchanged whenever a class CAM is all zero, which one-hot labels make always true, leaving a
  plain mean L1 between the two normalised CAMs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MASS_EPS = 1e-6


def _as_maps(m: Tensor) -> Tensor:
    """[B, 1, H, W] float32 view of a [B, H, W] or [B, 1, H, W] CAM."""
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"expected CAMs shaped [B, H, W] or [B, 1, H, W], got {tuple(m.shape)}")
    return m.float()


def _grid(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    side = float(max(height, width))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / side
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / side
    return ys.view(1, 1, height, 1), xs.view(1, 1, 1, width)


def centre_of_mass(m: Tensor) -> Tensor:
    """[B, 2] (mu_y, mu_x) of each CAM (eq. 4), in units of the larger side; map centre if all zero."""
    m = _as_maps(m).detach()
    height, width = m.shape[-2:]
    ys, xs = _grid(height, width, m.device)
    mass = m.sum(dim=(1, 2, 3))
    safe = mass.clamp_min(MASS_EPS)
    mu = torch.stack([(m * ys).sum(dim=(1, 2, 3)) / safe, (m * xs).sum(dim=(1, 2, 3)) / safe], dim=1)
    side = float(max(height, width))
    centre = torch.tensor([height / (2 * side), width / (2 * side)], device=m.device)
    return torch.where((mass > MASS_EPS)[:, None], mu, centre)


def centre_gaussian(m: Tensor, sigma: float) -> Tensor:
    """[B, 1, H, W] Gaussian G centred on each CAM's centre of mass (eq. 5), no gradient."""
    m = _as_maps(m)
    height, width = m.shape[-2:]
    ys, xs = _grid(height, width, m.device)
    mu = centre_of_mass(m)
    d2 = (ys - mu[:, 0].view(-1, 1, 1, 1)) ** 2 + (xs - mu[:, 1].view(-1, 1, 1, 1)) ** 2
    return torch.exp(-d2 / (2.0 * sigma**2))


def centre_enhance(m: Tensor, sigma: float) -> Tensor:
    """M_CG = M * G (eq. 6), [B, 1, H, W]."""
    m = _as_maps(m)
    return m * centre_gaussian(m, sigma)


def ceccm_loss(
    cam_cls: Tensor, cam_rec: Tensor, sigma: float = 0.25, mode: Literal["paper", "release"] = "paper"
) -> Tensor:
    """Mean |M_CG - M_CG^rec| over batch and pixels (eq. 20); zero for an empty batch.

    Both CAMs are normalised crack CAMs (``wpcrack.method.cam.crack_cam``) of the same crack images at the
    same size. Gradients flow into whichever input requires them.
    """
    a, b = _as_maps(cam_cls), _as_maps(cam_rec)
    if a.shape != b.shape:
        raise ValueError(f"CAM shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        return a.sum() + b.sum()
    if mode == "paper":
        a, b = centre_enhance(a, sigma), centre_enhance(b, sigma)
    elif mode != "release":
        raise ValueError(f"unknown CECCM mode {mode!r}; valid: paper, release")
    return (a - b).abs().mean()
