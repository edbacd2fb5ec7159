"""Detector ``Det``: PAAM's stride-8 map (plus, for ``unet``, the fine skips) -> crack logits.

Two decoders (``model.detector_decoder``):
- ``transposed``: the release's: two 3x3 conv-BN-ReLU at stride 8, then three x2 transposed convs.
  Nothing finer than stride 8 reaches it, so a 1-3 px crack can only be drawn as a blurred band.
- ``unet``: bilinear x2 upsampling + conv, fusing the classifier backbone's stride-4 and stride-2
  maps on the way (U-Net style, no checkerboard), then a full-resolution 3x3 conv. The fine maps
  carry the crack's exact position; PAAM's map says which dark lines are cracks.

No sigmoid here: it is applied once, by BCE-with-logits in the loss or by ``predict`` (the release
feeds a sigmoid output to BCE-with-logits, a double sigmoid we do not copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wpcrack.models.backbones import crop_or_resize

DECODERS = ("transposed", "unet")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(True),
    ]


def _up_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """x2 transposed conv (kernel 4, stride 2, padding 1: exactly doubles any size)."""
    return [
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(True),
    ]


class Detector(nn.Module):
    """The release's decoder: two 3x3 conv-BN-ReLU at stride 8, then three x2 transposed convs (the
    last gives the logits); the 8h x 8w result is cropped to the input size (the backbone padded it
    to a multiple of 8). ``skips`` are accepted and ignored."""

    uses_skips = False

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

    def forward(self, z: Tensor, size: tuple[int, int], skips: list[Tensor] | None = None) -> Tensor:
        return crop_or_resize(self.body(z), size)


class _Fuse(nn.Module):
    """Upsample ``x`` bilinearly to the skip's size, concatenate the projected skip, two 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        projected = max(out_channels // 2, 8)
        self.project = nn.Sequential(*_conv_bn_relu(skip_channels, projected, kernel_size=1))
        self.body = nn.Sequential(
            *_conv_bn_relu(in_channels + projected, out_channels), *_conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, self.project(skip)], dim=1))


class UNetDetector(nn.Module):
    """Stride 8 -> fuse stride 4 -> fuse stride 2 -> bilinear to the input size -> 3x3 conv -> 1x1 logits."""

    uses_skips = True

    def __init__(self, in_channels: int, channels: int, skip_channels: tuple[int, int]):
        super().__init__()
        c2, c4 = max(channels // 2, 8), max(channels // 4, 8)
        self.head = nn.Sequential(*_conv_bn_relu(in_channels, channels))
        self.fuse4 = _Fuse(channels, skip_channels[1], c2)
        self.fuse2 = _Fuse(c2, skip_channels[0], c4)
        self.full = nn.Sequential(*_conv_bn_relu(c4, c4))
        self.logits = nn.Conv2d(c4, 1, 1)

    def forward(self, z: Tensor, size: tuple[int, int], skips: list[Tensor] | None = None) -> Tensor:
        if not skips or len(skips) != 2:
            raise ValueError("the unet detector needs the backbone's [stride-2, stride-4] skips")
        s2, s4 = skips
        x = self.fuse2(self.fuse4(self.head(z), s4), s2)
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return self.logits(self.full(x))


def build_detector(decoder: str, in_channels: int, channels: int, skip_channels: tuple[int, int]) -> nn.Module:
    if decoder == "transposed":
        return Detector(in_channels, channels)
    if decoder == "unet":
        return UNetDetector(in_channels, channels, skip_channels)
    raise ValueError(f"unknown detector decoder {decoder!r}; valid: {', '.join(DECODERS)}")
