"""Crack CAMs as the method uses them: ReLU, min-max normalised per image, times the image label.

Differentiable throughout: the classifier step needs gradients through ``M_C`` (paper eqs. 2, 18-20).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from wpcrack.models.backbones import upsample_to_input
from wpcrack.models.classifier import NUM_CLASSES

CRACK = 1  # channel of the crack class in a [B, 2, h, w] CAM
EPS = 1e-5


def crack_labels(labels: Tensor) -> Tensor:
    """[B] float crack indicator from [B] 0/1 labels or [B, 2] one-hot labels."""
    if labels.dim() == 2 and labels.shape[1] == NUM_CLASSES:
        labels = labels[:, CRACK]
    return labels.reshape(-1).float()


def crack_cam(cam_raw: Tensor, labels: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """[B, 1, h, w] crack CAM in [0, 1] (``[B, 1, *size]`` when ``size`` is given).

    ``cam_raw`` is the [B, 2, h, w] head output. With ``labels`` the CAM of a no-crack image is all
    zero. The per-image min-max uses an epsilon, so a flat (e.g. all-zero) CAM maps to zeros rather
    than NaN. Upsampling (bilinear, cell k on pixel 8k) happens after normalisation and keeps [0, 1].
    Computed in float32, also under autocast.
    """
    m = F.relu(cam_raw[:, CRACK : CRACK + 1].float())
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    m = (m - lo) / (hi - lo + EPS)
    if labels is not None:
        m = m * crack_labels(labels).to(m.device).view(-1, 1, 1, 1)
    if size is not None:
        m = upsample_to_input(m, tuple(size))
    return m

