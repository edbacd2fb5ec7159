"""WP-CrackNet: classifier, reconstructor, PAAM (or a 1x1 projection) and detector.

``WPCrackNet`` holds every trained part; the training phases call the parts directly. For
prediction only the path image -> mid features (and the fine skips) -> PAAM -> detector is needed, and ``slim()`` copies
just that into a ``SlimDetector`` (plus, by default, the whole classifier for CFD patch gating).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from copy import deepcopy

import torch
from torch import Tensor, nn

from wpcrack.config import Config, ModelConfig
from wpcrack.models.backbones import Backbone, create_backbone
from wpcrack.models.classifier import CAMHead, Classifier
from wpcrack.models.detector import build_detector
from wpcrack.models.paam import PAAM, Projection
from wpcrack.models.reconstructor import Reconstructor


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _crack_probability(logits: Tensor) -> Tensor:
    """Image logits are trained with a sigmoid per class (eq. 17), so crack = sigmoid(q[:, 1])."""
    return torch.sigmoid(logits[:, 1].float())


def _fuse_mids(cls_mid: Tensor, rec_mid: Tensor | None, uses_rec: bool) -> Tensor:
    if not uses_rec:
        return cls_mid
    if rec_mid is None:
        raise ValueError("detector_inputs is cls+rec: rec_mid is required")
    return torch.cat([cls_mid, rec_mid], dim=1)  # Z_in^Con


class WPCrackNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.uses_rec = cfg.detector_inputs == "cls+rec"
        self.classifier = Classifier(create_backbone(cfg.backbone, cfg.pretrained, cfg.weights_path), cfg.cam_channels)
        self.reconstructor = Reconstructor(
            create_backbone(cfg.backbone, cfg.pretrained, cfg.weights_path), cfg.cam_channels, cfg.decoder_channels
        )
        mid = self.classifier.backbone.mid_channels
        in_channels = 2 * mid if self.uses_rec else mid
        self.paam = (
            PAAM(in_channels, cfg.paam_channels, cfg.paam_reduction)
            if cfg.paam
            else Projection(in_channels, cfg.paam_channels)
        )
        self.detector = build_detector(
            cfg.detector_decoder, cfg.paam_channels, cfg.detector_channels, self.classifier.backbone.skip_channels
        )

    def detect(self, cls_mid: Tensor, rec_mid: Tensor | None, size: tuple[int, int],
               skips: list[Tensor] | None = None) -> Tensor:
        """[B, 1, H, W] crack logits from the mid features (``rec_mid`` is used only for cls+rec;
        ``skips``, the classifier backbone's fine maps, only by the ``unet`` decoder)."""
        return self.detector(self.paam(_fuse_mids(cls_mid, rec_mid, self.uses_rec)), size, skips)

    def forward(self, x: Tensor) -> Tensor:
        """Detector logits for images, computing the backbones only up to ``mid``."""
        rec_mid = self.reconstructor.encoder.backbone.forward_mid(x) if self.uses_rec else None
        cls_mid, skips = self.classifier.backbone.forward_mid_skips(x)
        return self.detect(cls_mid, rec_mid, tuple(x.shape[-2:]), skips)

    @torch.inference_mode()
    def predict(self, x: Tensor) -> Tensor:
        """[B, 1, H, W] crack probabilities, in eval mode (each submodule's mode is restored after)."""
        with eval_mode(self):
            return torch.sigmoid(self(x).float())

    @torch.inference_mode()
    def classify(self, x: Tensor) -> Tensor:
        """[B] probability that each image contains a crack (classifier head, for patch gating)."""
        with eval_mode(self):
            return _crack_probability(self.classifier(x).logits)

    def slim(self, gating: bool = True) -> SlimDetector:
        """An eval-mode copy of what prediction needs.

        With ``gating`` the whole classifier is kept so ``SlimDetector.classify`` works (CFD patch
        gating); without it the classifier backbone is also cut after ``mid``. The reconstructor
        encoder is always cut after ``mid`` and dropped entirely for detector_inputs = cls.
        """
        cls_backbone = self.classifier.backbone
        slim = SlimDetector(
            cls_backbone=deepcopy(cls_backbone) if gating else cls_backbone.truncated(),
            cls_head=deepcopy(self.classifier.head) if gating else None,
            rec_backbone=self.reconstructor.encoder.backbone.truncated() if self.uses_rec else None,
            paam=deepcopy(self.paam),
            detector=deepcopy(self.detector),
        )
        return slim.eval()


class SlimDetector(nn.Module):
    """Inference-only WP-CrackNet: ``forward(x)`` gives [B, 1, H, W] crack probabilities."""

    def __init__(
        self,
        cls_backbone: Backbone,
        cls_head: CAMHead | None,
        rec_backbone: Backbone | None,
        paam: nn.Module,
        detector: nn.Module,
    ):
        super().__init__()
        self.cls_backbone = cls_backbone
        self.cls_head = cls_head
        self.rec_backbone = rec_backbone
        self.paam = paam
        self.detector = detector

    def logits(self, x: Tensor) -> Tensor:
        uses_rec = self.rec_backbone is not None
        rec_mid = self.rec_backbone.forward_mid(x) if uses_rec else None
        cls_mid, skips = self.cls_backbone.forward_mid_skips(x)
        z = _fuse_mids(cls_mid, rec_mid, uses_rec)
        return self.detector(self.paam(z), tuple(x.shape[-2:]), skips)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x).float())

    def classify(self, x: Tensor) -> Tensor:
        """[B] crack probability per image; needs a model sliced with ``gating=True``."""
        if self.cls_head is None:
            raise RuntimeError("this SlimDetector was made with gating=False and has no classifier head")
        return _crack_probability(self.cls_head(self.cls_backbone(x).final)[1])


def build_model(cfg: Config | ModelConfig) -> WPCrackNet:
    """The full model for ``cfg.model`` (a ModelConfig is accepted too)."""
    return WPCrackNet(cfg.model if isinstance(cfg, Config) else cfg)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then give each back its own mode (a training loop may keep
    BatchNorm frozen in eval while the rest trains)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
