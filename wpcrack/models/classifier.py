"""Classifier ``Cls``: backbone + CAM head; image logits are the spatial mean of the CAM."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from wpcrack.models.backbones import Backbone

NUM_CLASSES = 2  # index 0: road (no crack), index 1: crack, as the paper's T^R = [1, 0], T^C = [0, 1]


class ClassifierOutput(NamedTuple):
    cam: Tensor  # [B, 2, h, w] raw class activation maps, h = ceil(H / 8)
    logits: Tensor  # [B, 2] image-level logits q (sigmoid per class, paper eq. 17)
    mid: Tensor  # [B, mid_channels, h, w] detector input Z_in^Cls
    skips: list[Tensor]  # the backbone's [stride-2, stride-4] maps (the unet detector's fine path)


class CAMHead(nn.Module):
    """Two 1x1 convs (features -> cam_channels, ReLU, -> 2 classes), as in the released code.

    Because the logits are the mean of the CAM, the CAM is exactly what image labels train.
    """

    def __init__(self, in_channels: int, cam_channels: int):
        super().__init__()
        self.fc8 = nn.Conv2d(in_channels, cam_channels, 1, bias=False)
        self.fc9 = nn.Conv2d(cam_channels, NUM_CLASSES, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.xavier_uniform_(self.fc9.weight)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        cam = self.fc9(self.fc8(features).relu())
        return cam, cam.mean(dim=(2, 3))


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, cam_channels: int):
        super().__init__()
        self.backbone = backbone
        self.head = CAMHead(backbone.out_channels, cam_channels)

    def forward(self, x: Tensor) -> ClassifierOutput:
        features = self.backbone(x)
        cam, logits = self.head(features.final)
        return ClassifierOutput(cam, logits, features.mid, features.skips)
