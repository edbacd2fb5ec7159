"""Weight averaging (``train.ema_decay``): an exponential moving average of the model's weights.

Why: the weak model chases pseudo labels that change at every relabelling, so its weights, and the
test IoU of the epoch that validation picks, move by 2-3 points from one epoch to the next
(docs/method.md). The average over the last few hundred steps smooths that walk; it is what
validation scores, what ``best.pt`` stores and so what evaluate, predict and serving use. Training
itself (gradients, relabelling) runs on the live weights, so averaging never changes the trajectory.

Every floating-point entry of the state dict (parameters and BatchNorm running statistics) is
averaged; integer entries (``num_batches_tracked``) are copied. The decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages are not dominated by the
ImageNet initialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"weight-average decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {}
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average again from the model's current weights."""
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimiser step)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), 1 - d)
            else:
                shadow.copy_(value)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model carries the averaged weights inside the block and its own weights again after."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(live)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


@contextlib.contextmanager
def averaged(average: WeightAverage | None, model: nn.Module) -> Iterator[None]:
    """``average.applied(model)``, or nothing when averaging is off."""
    if average is None:
        yield
    else:
        with average.applied(model):
            yield
