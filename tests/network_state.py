"""Which of WP-CrackNet's three networks a training step changed (shared by the CPU and GPU phase tests)."""

from __future__ import annotations

import torch


def snapshot(model) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters and buffers (BatchNorm statistics) of each network; PAAM and Det count as the detector."""
    parts = {"classifier": model.classifier, "reconstructor": model.reconstructor}
    out = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in parts.items()}
    out["detector"] = {f"{n}.{k}": v.detach().clone() for n, m in model.named_children() if n not in parts
                       for k, v in m.state_dict().items()}
    return out


def changed(before, after) -> set[str]:
    return {name for name in before if any(not torch.equal(before[name][k], after[name][k]) for k in before[name])}
