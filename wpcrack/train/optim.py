"""Optimisers of the three networks, as the released code trains them.

Classifier and reconstructor: SGD with poly decay ``lr * (1 - it / max_it) ** poly_power``, one
optimiser each so that each adversarial phase steps only its own network. With a pretrained
backbone, its weights train at ``lr`` and the new layers at 10x (biases at 2x / 20x, no weight
decay), as ACR's PolyOptimizer; without one, every layer is new and trains at ``lr`` (2x biases),
so ``lr`` keeps its meaning. Detector and PAAM: AdamW at ``lr_detector``. Parameters with
``requires_grad`` off when the optimisers are built (frozen BatchNorm) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, PolynomialLR

from wpcrack.config import Config
from wpcrack.models.backbones import Backbone

# ACR / WP-CrackNet release: lr multipliers (weights, biases and norm parameters) of pretrained
# layers (and of every layer when nothing is pretrained) and of new layers.
BASE_LR_MULT = (1.0, 2.0)
NEW_LAYER_LR_MULT = (10.0, 20.0)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def network_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters of each trained part: classifier, reconstructor, and the rest (PAAM + detector)."""
    cls_ids = {id(p) for p in model.classifier.parameters()}
    rec_ids = {id(p) for p in model.reconstructor.parameters()}
    return {
        "classifier": list(model.classifier.parameters()),
        "reconstructor": list(model.reconstructor.parameters()),
        "detector": [p for p in model.parameters() if id(p) not in cls_ids | rec_ids],
    }


def freeze_batchnorm(model: nn.Module) -> None:
    """ACR's frozen BatchNorm: affine parameters never train (eval mode: ``set_train_mode``)."""
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def _poly_groups(net: nn.Module, cfg: Config) -> list[dict]:
    """ACR's four groups (pretrained/new x weights/biases)."""
    pretrained = cfg.model.pretrained or cfg.model.weights_path is not None
    backbone_ids = {id(p) for m in net.modules() if isinstance(m, Backbone) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in net.parameters():
        if p.requires_grad:
            base_rate = id(p) in backbone_ids or not pretrained
            groups.setdefault((base_rate, p.ndim <= 1), []).append(p)
    out = []
    for (base_rate, is_bias), params in sorted(groups.items()):
        mult = (BASE_LR_MULT if base_rate else NEW_LAYER_LR_MULT)[int(is_bias)]
        out.append({
            "params": params,
            "lr": cfg.train.lr * mult,
            "weight_decay": 0.0 if is_bias else cfg.train.weight_decay,
        })
    return out


@dataclass
class Optimizers:
    """One optimiser per network and the poly schedules of the two adversarial ones; with
    detector fine-tuning (``wpcrack.train.finetune``) also its optimiser and one-cycle schedule."""

    classifier: torch.optim.SGD
    reconstructor: torch.optim.SGD
    detector: torch.optim.AdamW
    schedulers: dict[str, LRScheduler]
    finetune: torch.optim.AdamW | None = None

    def add_finetune(self, optimizer: torch.optim.AdamW, schedule: LRScheduler) -> None:
        self.finetune = optimizer
        self.schedulers["finetune"] = schedule

    def as_dict(self) -> dict[str, torch.optim.Optimizer]:
        out = {"classifier": self.classifier, "reconstructor": self.reconstructor, "detector": self.detector}
        return out | ({"finetune": self.finetune} if self.finetune is not None else {})

    def step_schedules(self, names: tuple[str, ...] = ("classifier", "reconstructor")) -> None:
        """Advance the poly schedules of the networks that trained this iteration."""
        for name in names:
            self.schedulers[name].step()

    def state_dict(self) -> dict:
        return {
            "optimizers": {k: o.state_dict() for k, o in self.as_dict().items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for k, o in self.as_dict().items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])


def build_optimizers(model: nn.Module, cfg: Config, max_iterations: int) -> Optimizers:
    """Optimisers for ``model``; the poly schedules reach zero after ``max_iterations`` steps."""
    t = cfg.train
    sgd = {
        name: torch.optim.SGD(_poly_groups(getattr(model, name), cfg), lr=t.lr, momentum=t.momentum)
        for name in ("classifier", "reconstructor")
    }
    detector = torch.optim.AdamW([p for p in network_parts(model)["detector"] if p.requires_grad], lr=t.lr_detector)
    schedulers = {
        name: PolynomialLR(opt, total_iters=max(max_iterations, 1), power=t.poly_power) for name, opt in sgd.items()
    }
    return Optimizers(sgd["classifier"], sgd["reconstructor"], detector, schedulers)


def set_train_mode(module: nn.Module, training: bool, freeze_bn: bool) -> None:
    """``module.train(training)``; with ``freeze_bn`` BatchNorm layers stay in eval mode (ACR)."""
    module.train(training)
    if freeze_bn:
        for m in module.modules():
            if isinstance(m, _BN_TYPES):
                m.eval()
