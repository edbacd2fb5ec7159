"""Inference for evaluation: load a trained model, tiled and patch-gated prediction, CAMs.

Dataset rules (design.md 1-2) live in ``eval_views``. The model sees a test image at the scale
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

``predict_image`` tiles any image larger than ``evaluate.tile_size`` (large survey photos).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from wpcrack.config import Config
from wpcrack.errors import DataError, TrainingError
from wpcrack.geometry import grid_cells, resize_map, resize_square, tile_weights, tiles


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


def to_batch(rgbs: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 images of one size -> ImageNet-normalised float [B,3,H,W] on ``device``."""
    from wpcrack.data.datasets import normalize

    return normalize(torch.from_numpy(np.stack(rgbs))).to(device)


# --- tiled prediction ------------------------------------------------------------------------


FLIPS = ((), (3,), (2,), (2, 3))  # identity, horizontal, vertical, both


def _predict_batch(model: torch.nn.Module, rgbs: list[np.ndarray], flip: bool = False) -> list[np.ndarray]:
    """Crack probabilities of same-size images; ``flip`` averages them over the four flips of each
    image (a crack is a crack mirrored, the network's padding and strides are not symmetric)."""
    x = to_batch(rgbs, model_device(model))
    flips = FLIPS if flip else FLIPS[:1]
    with torch.inference_mode():  # the flips go through as one batch
        views = model.predict(torch.cat([torch.flip(x, dims) for dims in flips])).float().chunk(len(flips))
        prob = torch.stack([torch.flip(view, dims) for view, dims in zip(views, flips, strict=True)]).mean(0)
    return list(prob[:, 0].cpu().numpy())


def predict_images(model: torch.nn.Module, rgbs: list[np.ndarray], cfg: Config) -> list[np.ndarray]:
    """Crack probabilities (float32 HxW each) of same-size images: one batch when they fit a tile."""
    h, w = rgbs[0].shape[:2]
    if h <= cfg.evaluate.tile_size and w <= cfg.evaluate.tile_size:
        return _predict_batch(model, rgbs, cfg.evaluate.flip)
    return [_predict_tiled(model, rgb, cfg) for rgb in rgbs]


def predict_image(model: torch.nn.Module, rgb: np.ndarray, cfg: Config) -> np.ndarray:
    """Crack probabilities (float32 HxW) of a full image, tiled when it is larger than a tile.

    Tiles of ``tile_size`` overlap by ``tile_overlap``, are predicted in batches and blended with a
    window that ramps down towards the seams, so tile borders (zero-padded context) count less. An
    image that fits one tile is predicted in one pass, exactly as ``model.predict`` would.
    """
    return predict_images(model, [rgb], cfg)[0]


def _predict_tiled(model: torch.nn.Module, rgb: np.ndarray, cfg: Config, batch_size: int = 8) -> np.ndarray:
    h, w = rgb.shape[:2]
    overlap = cfg.evaluate.tile_overlap
    boxes = tiles(h, w, cfg.evaluate.tile_size, overlap)
    out = np.zeros((h, w), dtype=np.float32)
    weight = np.zeros((h, w), dtype=np.float32)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        probs = _predict_batch(model, [rgb[y0:y1, x0:x1] for y0, y1, x0, x1 in chunk], cfg.evaluate.flip)
        for (y0, y1, x0, x1), prob in zip(chunk, probs, strict=True):
            win = tile_weights((y0, y1, x0, x1), h, w, overlap)
            out[y0:y1, x0:x1] += prob * win
            weight[y0:y1, x0:x1] += win
    return out / weight


# --- CAMs --------------------------------------------------------------------------------------


def crack_cams(model: torch.nn.Module, rgbs: list[np.ndarray], labels: list[int] | None = None) -> np.ndarray:
    """Crack CAMs (float32 [B,H,W] in [0,1]) at input resolution, normalised as pseudo labels use them.

    ``labels`` multiply the CAMs like the image labels do in training (a 0 gives an empty CAM).
    """
    from wpcrack.method.cam import crack_cam

    h, w = rgbs[0].shape[:2]
    x = to_batch(rgbs, model_device(model))
    labels = torch.tensor(labels if labels is not None else [1] * len(rgbs))
    with torch.inference_mode():
        cam = crack_cam(model.classifier(x).cam, labels, size=(h, w))
    return cam[:, 0].float().cpu().numpy()


def cam_image(model: torch.nn.Module, rgb: np.ndarray, label: int = 1) -> np.ndarray:
    """Normalised crack CAM (float32 HxW in [0,1]) of one image at full resolution."""
    return crack_cams(model, [rgb], [label])[0]


# --- patch gating (CFD) ------------------------------------------------------------------------


def classify(model: torch.nn.Module, rgbs: list[np.ndarray]) -> np.ndarray:
    """Image-level crack probability of each image (float [B])."""
    with torch.inference_mode():
        return model.classify(to_batch(rgbs, model_device(model))).float().cpu().numpy().reshape(-1)


PatchHead = Callable[[list[np.ndarray]], dict[str, list[np.ndarray]]]


def patch_gated(model: torch.nn.Module, rgb: np.ndarray, cfg: Config, head: PatchHead) -> dict[str, np.ndarray]:
    """Run ``head`` on the crack patches of the CFD grid only; merge to full size, zeros elsewhere.

    ``head`` maps resized patches (uint8 ``patch_size`` squares) to named float maps of that size;
    each map is resized back bilinearly into its patch's cell. The result also holds ``"gate"``:
    each cell filled with the classifier's crack probability.
    """
    h, w = rgb.shape[:2]
    boxes = grid_cells(h, w, cfg.prepare.cfd.grid)
    patches = [resize_square(rgb[y0:y1, x0:x1], cfg.prepare.cfd.patch_size) for y0, y1, x0, x1 in boxes]
    p_crack = classify(model, patches)
    gate = np.zeros((h, w), dtype=np.float32)
    for (y0, y1, x0, x1), p in zip(boxes, p_crack, strict=True):
        gate[y0:y1, x0:x1] = p
    keep = [i for i, p in enumerate(p_crack) if p > 0.5]
    outputs = head([patches[i] for i in keep]) if keep else {}
    merged = {"gate": gate}
    for name, maps in outputs.items():
        merged[name] = np.zeros((h, w), dtype=np.float32)
        for i, values in zip(keep, maps, strict=True):
            y0, y1, x0, x1 = boxes[i]
            merged[name][y0:y1, x0:x1] = resize_map(values, (y1 - y0, x1 - x0))
    return merged


def predict_patch_gated(model: torch.nn.Module, rgb: np.ndarray, cfg: Config) -> np.ndarray:
    """CFD detector output (float32 HxW): detector on classifier-selected grid patches only."""
    merged = patch_gated(model, rgb, cfg, lambda ps: {"prob": predict_images(model, ps, cfg)})
    return merged.get("prob", np.zeros(rgb.shape[:2], dtype=np.float32))


# --- the evaluation views ----------------------------------------------------------------------


class EvalViews(NamedTuple):
    """One test image as the three evaluation modes see it (all at the scoring resolution)."""

    rgb: np.ndarray       # uint8 HxWx3, the test image at the scoring resolution
    prob: np.ndarray      # detector probabilities, float32 HxW
    cam: np.ndarray       # normalised crack CAM, float32 HxW
    pseudo: np.ndarray    # the pseudo label of the CAM (pseudo_labels.method), uint8 {0,1} HxW


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
