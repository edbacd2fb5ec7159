"""Detector ``Det``: stride-8 features -> full-resolution crack logits (one channel).

No sigmoid here: it is applied once, by BCE-with-logits in the loss or by ``predict`` (the release
feeds a sigmoid output to BCE-with-logits, a double sigmoid we do not copy).
"""

from __future__ import annotations

from torch import Tensor, nn

from wpcrack.models.backbones import crop_or_resize


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True)]


def _up_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """x2 transposed conv (kernel 4, stride 2, padding 1: exactly doubles any size)."""
    return [
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(True),
    ]


class Detector(nn.Module):
    """Two 3x3 conv-BN-ReLU at stride 8, then three x2 transposed convs (the last gives the logits);
    the 8h x 8w result is cropped to the input size (the backbone padded it to a multiple of 8)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        c2, c4 = max(channels // 2, 4), max(channels // 4, 4)
        self.body = nn.Sequential(
            *_conv_bn_relu(in_channels, channels),
            *_conv_bn_relu(channels, channels),
            *_up_bn_relu(channels, c2),
            *_up_bn_relu(c2, c4),
            nn.ConvTranspose2d(c4, 1, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor, size: tuple[int, int]) -> Tensor:
        return crop_or_resize(self.body(z), size)
