"""A trained WP-CrackNet from its checkpoint (``best.pt``), in eval mode."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from wpcrack.config import Config
from wpcrack.errors import DataError, TrainingError


def read_checkpoint(model_dir: Path) -> tuple[Path, dict]:
    """``model_dir/best.pt`` read once: its path and contents (weights and the config it was trained with)."""
    from wpcrack.train.checkpoint import BEST, load

    path = Path(model_dir) / BEST
    if not path.is_file():
        raise DataError(path, "no trained model here (run `wpcrack train` for this dataset and variant first)")
    ckpt = load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise DataError(path, "not a wpcrack checkpoint (expected a dict with a 'model' state dict)")
    return path, ckpt


def model_from_checkpoint(path: Path, ckpt: dict, cfg: Config, device: str | torch.device = "cpu") -> torch.nn.Module:
    """WPCrackNet in eval mode from a checkpoint that ``read_checkpoint`` returned.

    The architecture is the one the checkpoint was trained with (its ``config`` entry), else the
    one ``cfg`` describes; weights that do not fit are reported as such, not as a wall of keys.
    """
    from wpcrack.config import ModelConfig
    from wpcrack.models.wpcracknet import build_model

    saved = (ckpt.get("config") or {}).get("model")
    arch = ModelConfig(**saved) if saved else cfg.model
    # The checkpoint replaces every weight: do not load ImageNet weights into the backbones first.
    model = build_model(dataclasses.replace(arch, pretrained=False, weights_path=None))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise TrainingError(
            f"{path}: weights do not fit the model built from the configuration "
            f"(profile {cfg.profile}, variant {cfg.variant}, backbone {arch.backbone}): {first}"
        ) from exc
    return model.to(device).eval()


def load_trained(model_dir: Path, cfg: Config, device: str | torch.device = "cpu") -> torch.nn.Module:
    """WPCrackNet from ``model_dir/best.pt`` in eval mode (``model_from_checkpoint``)."""
    return model_from_checkpoint(*read_checkpoint(model_dir), cfg, device)


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
