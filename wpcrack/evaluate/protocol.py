"""The evaluation protocol of each dataset (design.md 1-2): how a test image is shown to the model
and at what resolution it is scored; the model itself runs through ``wpcrack.inference``.

Dataset rules live in ``eval_views``. The model sees a test image at the scale
its training rows had, and is scored at the protocol's resolution:

- DeepCrack: training rows were rescaled to ``prepare.deepcrack.image_size`` squares; the test
  image is rescaled the same way (``wpcrack.geometry.resize_square``) and predicted, and the output is
  brought to ``prepare.deepcrack.eval_size`` (256: the verified protocol scores there).
- CRACK500: rescaled to ``prepare.crack500.image_size`` squares likewise, predicted, and the
  probabilities resized bilinearly back to the native resolution, where they are scored.
- CFD: patch-gated (paper 4.1): the image is cut into the training grid
  (``wpcrack.geometry.grid_cells``), each cell resized to the training patch size, the
  classifier keeps the patches it calls crack, only those are predicted, and the outputs are merged
  at full size with zeros elsewhere.
- Synthetic: native resolution (its training rows are not rescaled).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from wpcrack.config import Config
from wpcrack.geometry import grid_cells, resize_map, resize_square
from wpcrack.inference.tiles import crack_cams, patch_gated, predict_images


class EvalViews(NamedTuple):
    """One test image as the three evaluation modes see it (all at the scoring resolution)."""

    rgb: np.ndarray       # uint8 HxWx3, the test image at the scoring resolution
    prob: np.ndarray      # detector probabilities, float32 HxW
    cam: np.ndarray       # normalised crack CAM, float32 HxW
    pseudo: np.ndarray    # the pseudo label of the CAM (pseudo_labels.method), uint8 {0,1} HxW


def source_config(cfg: Config, source: str) -> Config:
    """A composite run's settings for the rows of one source (the manifest's ``dataset``): that
    source's scoring protocol and pseudo labels, the run's model and inference settings."""
    if source == cfg.dataset:
        return cfg
    return dataclasses.replace(cfg, dataset=source, pseudo_labels=cfg.pseudo_labels.of_source(source))


def inference_size(cfg: Config) -> int | None:
    """Square size the dataset's training rows were rescaled to (None: not rescaled, or patch-gated)."""
    return {"deepcrack": cfg.prepare.deepcrack.image_size, "crack500": cfg.prepare.crack500.image_size}.get(cfg.dataset)


def score_size(cfg: Config) -> int | None:
    """Square size the dataset is scored at (DeepCrack, design.md 1), or None for native resolution."""
    return cfg.prepare.deepcrack.eval_size if cfg.dataset == "deepcrack" else None


def _refine(rgb: np.ndarray, cam: np.ndarray, cfg: Config) -> np.ndarray:
    """The pseudo label training would make of this CAM (``pseudo_labels.method``), {0, 1}."""
    from wpcrack.method.pseudo_labels import make_label

    if not cam.any():
        return np.zeros(cam.shape, dtype=np.uint8)
    return (make_label(rgb, cam, cfg.pseudo_labels) == 1).astype(np.uint8)


def _views(
    model: torch.nn.Module, rgbs: list[np.ndarray], cfg: Config, labels: list[int] | None = None
) -> dict[str, list[np.ndarray]]:
    """Detector probabilities, CAMs and CRF pseudo labels (as floats) of images at the model's scale."""
    cams = list(crack_cams(model, rgbs, labels))
    return {
        "prob": predict_images(model, rgbs, cfg),
        "cam": cams,
        "pseudo": [_refine(rgb, cam, cfg).astype(np.float32) for rgb, cam in zip(rgbs, cams, strict=True)],
    }


def at_model_scale(rgb: np.ndarray, cfg: Config, fn: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(image, map) at the scoring resolution, ``fn`` (uint8 image -> float map of its size) having
    seen the test image at the scale of the dataset's training rows: every CFD grid cell resized to
    the patch size (no gating), other datasets rescaled like ``eval_views`` does."""
    if cfg.dataset == "cfd":
        out = np.zeros(rgb.shape[:2], dtype=np.float32)
        for y0, y1, x0, x1 in grid_cells(*rgb.shape[:2], cfg.prepare.cfd.grid):
            values = fn(resize_square(rgb[y0:y1, x0:x1], cfg.prepare.cfd.patch_size))
            out[y0:y1, x0:x1] = resize_map(values, (y1 - y0, x1 - x0))
        return rgb, out
    size = inference_size(cfg)
    values = fn(resize_square(rgb, size) if size else rgb)
    if score_size(cfg):
        rgb = resize_square(rgb, score_size(cfg))
    return rgb, resize_map(values, rgb.shape[:2])


def eval_views(model: torch.nn.Module, rgb: np.ndarray, cfg: Config, label: int = 1) -> EvalViews:
    """Detector output, crack CAM and its CRF pseudo label of one test image, per the dataset rules.

    ``label`` is the image-level label the CAM is multiplied by, as in training (evaluating CAMs
    conventionally uses the true image label). On CFD the classifier's gate plays that role for
    each patch, as in the paper's patch-gated inference, and the CRF runs per kept patch at the
    training patch size, the scale its pseudo labels were made at. Maps made at the model's scale
    are resized bilinearly to the scoring resolution; the pseudo label is re-thresholded at 0.5.
    """
    if cfg.dataset == "cfd":
        merged = patch_gated(model, rgb, cfg, lambda ps: _views(model, ps, cfg))
        empty = np.zeros(rgb.shape[:2], dtype=np.float32)
        maps = {k: merged.get(k, empty) for k in ("prob", "cam", "pseudo")}
    else:
        size = inference_size(cfg)
        seen = resize_square(rgb, size) if size else rgb
        maps = {k: v[0] for k, v in _views(model, [seen], cfg, [label]).items()}
        out = score_size(cfg)
        if out:
            rgb = resize_square(rgb, out)
        maps = {k: resize_map(v, rgb.shape[:2]) for k, v in maps.items()}
    return EvalViews(rgb, maps["prob"], maps["cam"], (maps["pseudo"] > 0.5).astype(np.uint8))
