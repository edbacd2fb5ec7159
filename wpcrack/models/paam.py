"""Path-Aware Attention Module (paper 3.3, eqs. 7-11), for any input size.

Choices where the paper is silent:
- ``D_theta`` are k-tap line kernels through the centre of a k x k window (k = 3 by default):
  0 deg = the middle row (a 1 x k conv), 90 deg = the middle column (k x 1), 45 deg = the
  anti-diagonal (bottom-left to top-right, image rows grow downwards), 135 deg = the main diagonal.
  Only the taps on the line are parameters; the rest of the window is structurally zero. (The
  release uses 2x2 kernels for the diagonals and crops them to 32x32, i.e. 256x256 inputs only.)
- Each ``D_theta`` maps all C input channels to one response, so ``A_spatial`` is a single-channel
  map shared by every channel, as a spatial attention map in Fig. 3 and the release. Because the
  responses are absolute values, ``A_spatial = sigmoid(sum |R|)`` lies in [0.5, 1): a soft mask that
  can only lift features on strong directional paths, never erase them.
- SE hidden width = max(C // reduction, 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DirectionalConv(nn.Module):
    """The four ``D_theta`` as one conv with 4 output channels whose kernels are lines."""

    def __init__(self, in_channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"directional kernel size must be odd and >= 3, got {kernel_size}")
        k = kernel_size
        self.kernel_size = k
        self.taps = nn.Parameter(torch.empty(4, in_channels, k))
        nn.init.uniform_(self.taps, -1 / math.sqrt(in_channels * k), 1 / math.sqrt(in_channels * k))
        t = torch.arange(k)
        centre = torch.full_like(t, k // 2)
        rows = torch.stack([centre, k - 1 - t, t, t])  # 0, 45, 90, 135 degrees
        cols = torch.stack([t, t, centre, t])
        self.register_buffer("positions", rows * k + cols, persistent=False)

    def kernels(self) -> Tensor:
        """[4, C, k, k] kernels, zero off their line."""
        directions, channels, k = self.taps.shape
        index = self.positions[:, None, :].expand(directions, channels, k)
        flat = self.taps.new_zeros(directions, channels, k * k).scatter(2, index, self.taps)
        return flat.view(directions, channels, k, k)

    def forward(self, z: Tensor) -> Tensor:
        """[B, 4, h, w] responses R_theta before the absolute value."""
        return F.conv2d(z, self.kernels(), padding=self.kernel_size // 2)


class PAAM(nn.Module):
    """Z -> Z * A_spatial -> 1x1 conv-BN-ReLU -> squeeze-and-excitation -> Z^F (detector input)."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 16, kernel_size: int = 3):
        super().__init__()
        self.directional = DirectionalConv(in_channels, kernel_size)
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )
        hidden = max(out_channels // reduction, 1)
        self.excite = nn.Sequential(
            nn.Linear(out_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_channels), nn.Sigmoid()
        )

    def spatial_attention(self, z: Tensor) -> Tensor:
        """A_spatial, [B, 1, h, w] (eqs. 7-8)."""
        return torch.sigmoid(self.directional(z).abs().sum(dim=1, keepdim=True))

    def forward(self, z: Tensor) -> Tensor:
        z_spatial = self.reduce(z * self.spatial_attention(z))  # eq. 9
        a_channel = self.excite(z_spatial.mean(dim=(2, 3)))  # eqs. 10-11
        return z_spatial * a_channel[:, :, None, None]


class Projection(nn.Sequential):
    """1x1 conv-BN-ReLU in place of PAAM, for the ablation rows without it (Table 1 rows 1-3)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )
