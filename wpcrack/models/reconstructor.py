"""Reconstructor ``Rec``: encoder ``Rec.E`` (backbone, CAM head, multi-layer fusion) and decoder ``Rec.D``.

The decoder sees only the masked fused map ``Z * M_C`` or ``Z * (1 - M_C)`` (paper eqs. 2-3). Its
U-Net skips come from its own down path over that masked map, never from the encoder: an unmasked
encoder skip would carry the erased region past the mask and make the adversarial game trivial.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wpcrack.models.backbones import Backbone, crop_or_resize
from wpcrack.models.classifier import CAMHead


class EncoderOutput(NamedTuple):
    cam: Tensor  # [B, 2, h, w] raw CAM M^rec
    logits: Tensor  # [B, 2] image-level logits q^rec
    mid: Tensor  # [B, mid_channels, h, w] detector input Z_in^Rec
    fused: Tensor  # [B, fused_channels, h, w] multi-layer fused map Z


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: independent of batch size and of BatchNorm freezing, fine on 1x1 maps."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_block(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        _norm(out_channels),
        nn.ReLU(inplace=True),
    )


class ReconEncoder(nn.Module):
    """Backbone + CAM head + fusion: each level -> 1x1 conv (widths c, 2c, 4c) -> concatenated ``Z``.

    The widths follow the release (64 + 128 + 256 = 448 channels for c = 64).
    """

    def __init__(self, backbone: Backbone, cam_channels: int, fusion_channels: int):
        super().__init__()
        self.backbone = backbone
        self.head = CAMHead(backbone.out_channels, cam_channels)
        widths = [fusion_channels * 2**i for i in range(len(backbone.level_channels))]
        self.fuse = nn.ModuleList(
            nn.Conv2d(cin, cout, 1, bias=False) for cin, cout in zip(backbone.level_channels, widths, strict=True)
        )
        self.fused_channels = sum(widths)

    def forward(self, x: Tensor) -> EncoderOutput:
        features = self.backbone(x)
        cam, logits = self.head(features.final)
        size = features.mid.shape[-2:]
        fused = torch.cat(
            [
                conv(level if level.shape[-2:] == size else F.interpolate(level, size=size, mode="bilinear"))
                for conv, level in zip(self.fuse, features.levels, strict=True)
            ],
            dim=1,
        )
        return EncoderOutput(cam, logits, features.mid, fused)


class ReconDecoder(nn.Module):
    """U-Net over the masked stride-8 map (two downsamplings, skips from that path), then three
    x2 upsamplings to full resolution and a 3x3 conv to RGB in the normalised input space."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        c = channels
        c2, c4 = max(c // 2, 8), max(c // 4, 8)
        self.inc = nn.Sequential(_conv_block(in_channels, c, kernel_size=1), _conv_block(c, c))
        self.down1 = _conv_block(c, 2 * c, stride=2)
        self.down2 = _conv_block(2 * c, 2 * c, stride=2)
        self.up1 = _conv_block(4 * c, c)
        self.up0 = _conv_block(2 * c, c)
        self.to_s4 = _conv_block(c, c2)
        self.to_s2 = _conv_block(c2, c4)
        self.out = nn.Conv2d(c4, 3, 3, padding=1)

    @staticmethod
    def _up_to(x: Tensor, ref: Tensor) -> Tensor:
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    @staticmethod
    def _x2(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, z: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        e0 = self.inc(z)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        d1 = self.up1(torch.cat([self._up_to(e2, e1), e1], dim=1))
        d0 = self.up0(torch.cat([self._up_to(d1, e0), e0], dim=1))
        y = self.to_s2(self._x2(self.to_s4(self._x2(d0))))
        y = self.out(self._x2(y))
        return y if size is None else crop_or_resize(y, size)


class Reconstructor(nn.Module):
    def __init__(self, backbone: Backbone, cam_channels: int, decoder_channels: int):
        super().__init__()
        self.encoder = ReconEncoder(backbone, cam_channels, decoder_channels)
        self.decoder = ReconDecoder(self.encoder.fused_channels, decoder_channels)

    def encode(self, x: Tensor) -> EncoderOutput:
        return self.encoder(x)

    def decode(self, z: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """[B, 3, H, W] image from a (masked) fused map; ``size`` defaults to 8x the map's size."""
        return self.decoder(z, size)

    def forward(self, x: Tensor) -> EncoderOutput:
        return self.encoder(x)

