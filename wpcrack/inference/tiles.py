"""Crack probabilities and CAMs of images of any size: batched, tiled above ``evaluate.tile_size``
(overlapping tiles blended towards their centres), or patch-gated on a grid by the classifier."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wpcrack.config import Config
from wpcrack.geometry import grid_cells, resize_map, resize_square, tile_weights, tiles
from wpcrack.inference.loading import model_device


def to_batch(rgbs: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 images of one size -> ImageNet-normalised float [B,3,H,W] on ``device``."""
    from wpcrack.data.datasets import normalize

    return normalize(torch.from_numpy(np.stack(rgbs))).to(device)


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
