"""Detector fine-tuning (``train.finetune_epochs``), after the three-phase epochs.

The three-phase step trains the detector on 128 px crops with features that the classifier and
reconstructor learnt for their own tasks. A plain supervised segmenter (MobileNetV2 + U-Net decoder,
192 px crops, AdamW with a one-cycle schedule, encoder trained by the segmentation loss) reaches
71.65 test IoU on DeepCrack's masks and 67.83 on weak labels (issue 13's probe). Fine-tuning gives
our detector that recipe: starting from the best model of the three-phase epochs (chosen by
``val_score``, image labels only), the classifier (backbone and CAM head) and PAAM + detector train
together on larger crops with one AdamW and a one-cycle learning rate; the detector loss reaches the
classifier's backbone, and the classifier's image BCE keeps it a classifier (its CAMs and the tile
gate). The reconstructor is frozen: it only feeds its encoder's features.

Targets (``train.finetune_labels``), made once when fine-tuning starts, from that best model:
- ``pseudo``: the run's own whole-image pseudo labels (``pseudo_labels`` settings), remade by the
  final classifier;
- ``detector``: self-training, the detector's own whole-image masks (p > 0.5).
The supervised variant (``detector_target: mask``) fine-tunes on the masks. Crack-free images are
all-background targets when ``pseudo_labels.negatives`` is on. Selection by ``val_score`` goes on
over the fine-tuning epochs, so fine-tuning is kept only when it raises the score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wpcrack.config import Config
from wpcrack.method.losses import detector_loss, image_bce
from wpcrack.train import relabel
from wpcrack.train.phases import (Batch, Carry, Clock, Runtime, StepResult, detector_modules, optimizer_step, targets,
                                  training_only)


def trained_modules(model: nn.Module) -> list[nn.Module]:
    """What fine-tuning trains: the classifier and every detector part (not the reconstructor)."""
    return [model.classifier, *detector_modules(model)]


def build_optimizer(model: nn.Module, cfg: Config, total_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over the fine-tuned parameters, a one-cycle schedule peaking at ``finetune_lr``."""
    params = [p for m in trained_modules(model) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.finetune_lr, weight_decay=cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.train.finetune_lr, total_steps=max(total_steps, 1), pct_start=0.2
    )
    return optimizer, schedule


def make_labels(model: nn.Module, dataset, cfg: Config, runtime: Runtime, pool) -> dict[str, float]:
    """Set ``dataset.pseudo`` to the fine-tuning targets of its crack rows; the label diagnostic.

    The supervised variant needs none (its targets are the masks)."""
    if cfg.train.detector_target == "mask":
        dataset.pseudo = {}
        return {}
    if cfg.train.finetune_labels == "detector":
        return detector_labels(model, dataset, cfg, runtime)
    return relabel.refresh(model, dataset, cfg, runtime, pool)


def detector_labels(model: nn.Module, dataset, cfg: Config, runtime: Runtime) -> dict[str, float]:
    """Self-training targets: each crack row's whole-image detector mask (p > 0.5)."""

    def labels_of(rgbs: list[np.ndarray], x: torch.Tensor, source: str) -> list[np.ndarray]:
        with runtime.autocast():
            prob = torch.sigmoid(model(x).float())[:, 0].cpu().numpy()
        return [(p > 0.5).astype(np.uint8) for p in prob]

    return relabel.relabel_crack_rows(model, dataset, cfg, runtime, labels_of)


def finetune_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, batch: Batch, cfg: Config,
                  runtime: Runtime) -> StepResult:
    """One step: detector loss on the usable images + the classifier's image BCE on all of them."""
    clock = Clock(runtime)
    target, usable, _ = targets(batch, cfg, Carry(), whole_image=True)
    x = batch.image
    with training_only(model, trained_modules(model), cfg.train.freeze_bn), runtime.autocast():
        with torch.no_grad():
            rec_mid = model.reconstructor.encoder.backbone.forward_mid(x) if model.uses_rec else None
        cls_out = model.classifier(x)
        logits = model.detect(cls_out.mid, rec_mid, batch.size, cls_out.skips)
        det, parts = detector_loss(logits[usable], target[usable], pos_weight=cfg.loss.det_pos_weight,
                                   dice=cfg.loss.det_dice)
        bce = image_bce(cls_out.logits, batch.label)
        total = det + cfg.loss.lambda_c2 * bce
    losses = {"det_total": parts.pop("det"), **parts, "cls_total": float(bce.detach())}
    optimizer_step([optimizer], "fine-tuning", total, losses, runtime.world)
    schedule.step()
    runtime.world.sync_buffers(model)
    seconds = {"det": clock.lap()}
    seconds["step"] = seconds["det"]
    return StepResult(losses, seconds)
