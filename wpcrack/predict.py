"""``wpcrack predict``: crack masks and crack statistics for your own images and survey photos.

The model is the MLflow ``champion`` of a dataset, any ``models:/`` (or ``runs:/``) URI, or a
trained model folder (``best.pt`` + ``config.yaml``). Architecture comes from the model's own
resolved configuration; inference settings (``evaluate.threshold``, ``tile_size``,
``tile_overlap``) from ``params.yaml`` when there is one, so they can be tuned without retraining.

Images larger than a tile go through ``wpcrack.evaluate.inference.predict_image`` (overlapping
tiles, blended). With ``--gate P`` (opt-in) ``GatedDetector`` makes the classifier skip tiles whose
crack probability is below P, so a large survey photo costs detector time only where there are
cracks. It is off by default: on imagery unlike the training data the classifier's probabilities
are not calibrated, and a gate once skipped all 252 tiles of a clearly cracked 12 MP photo. When
the gate skips most tiles of an image, predict says so on stderr.

``--scale S`` states the photo's scale: the image is resized by S (e.g. 0.25 for a 12 MP photo of
cracks four times wider in pixels than the training images') before inference and the probabilities
are resized back; several scales average their probabilities (multi-scale inference).

Statistics are measured on the binary mask (probability > threshold):

- ``crack_share``: crack pixels / all pixels;
- ``length``: the skeleton (Zhang-Suen thinning, then removal of redundant staircase pixels) read
  as polylines: half the perimeter of its contours after Douglas-Peucker simplification at 1 px
  (counting pixel steps instead overestimates straight cracks at 10-70 degrees by up to 8 %), plus
  what thinning cut off at each free end (the distance from the end to the crack's edge);
- ``width`` at each skeleton pixel: ``d(p) + d(q)``, with ``d`` the Euclidean distance transform
  and ``q`` the neighbour across the crack (largest ``d`` among non-skeleton neighbours). That is
  the usual "2 x distance transform" with the skeleton's half-pixel offset on even widths
  corrected: exact for axis-aligned cracks of any width. Max and mean are over the skeleton.

Lengths and widths are in pixels of the input image, and in millimetres with ``mm_per_pixel``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wpcrack.errors import DataError
from wpcrack.io import IMAGE_SUFFIXES, atomic_path, list_images, read_image, write_image, write_json

if TYPE_CHECKING:
    import pandas as pd

    from wpcrack.config import Config

CSV_COLUMNS = (
    "image", "mask", "overlay", "height", "width", "tiles", "tiles_skipped",
    "crack_pixels", "crack_share", "length_px", "max_width_px", "mean_width_px",
    "length_mm", "max_width_mm", "mean_width_mm", "error",
)
DEFAULT_GATE = 0.0  # classifier crack probability below which a tile is skipped (0: every tile kept)
GATE_WARN_SHARE = 0.5  # warn when the gate skips more than this share of an image's tiles
_OVERLAY_RGB = np.array([255, 0, 0], dtype=np.float32)
_OVERLAY_ALPHA = 0.6


# --- crack statistics --------------------------------------------------------------------------


def _ring(img: np.ndarray) -> list[np.ndarray]:
    """The 8 neighbours of every interior pixel of a padded array: E, NE, N, NW, W, SW, S, SE."""
    return [img[1:-1, 2:], img[:-2, 2:], img[:-2, 1:-1], img[:-2, :-2],
            img[1:-1, :-2], img[2:, :-2], img[2:, 1:-1], img[2:, 2:]]


def _zhang_suen(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning (1984), vectorised: one-pixel-wide, connected, endpoints kept."""
    img = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for step in (0, 1):
            centre = img[1:-1, 1:-1]
            e, ne, n, nw, w, sw, s, se = _ring(img)
            seq = [n, ne, e, se, s, sw, w, nw, n]  # P2..P9, P2 of the paper
            count = sum(v.astype(np.uint8) for v in seq[:-1])
            transitions = sum((~seq[i] & seq[i + 1]).astype(np.uint8) for i in range(8))
            keep = (n & e & s) | (e & s & w) if step == 0 else (n & e & w) | (n & s & w)
            delete = centre & (count >= 2) & (count <= 6) & (transitions == 1) & ~keep
            if delete.any():
                img[1:-1, 1:-1] = centre & ~delete
                changed = True
        if not changed:
            return img[1:-1, 1:-1]


def _remove_staircases(skeleton: np.ndarray) -> np.ndarray:
    """Delete 8-simple non-endpoint pixels (Yokoi connectivity number 1) that Zhang-Suen leaves on
    diagonal runs; the four pixel-parity subfields are never 8-adjacent, so each is deleted in
    parallel without breaking connectivity."""
    img = np.pad(skeleton, 1)
    rows, cols = np.indices(skeleton.shape)
    while True:
        changed = False
        for parity in ((0, 0), (0, 1), (1, 0), (1, 1)):
            ring = _ring(img)
            off = [~v for v in ring] + [~ring[0], ~ring[1]]
            yokoi = sum((off[k] & ~(off[k] & off[k + 1] & off[k + 2])).astype(np.uint8) for k in (0, 2, 4, 6))
            count = sum(v.astype(np.uint8) for v in ring)
            subfield = (rows % 2 == parity[0]) & (cols % 2 == parity[1])
            delete = img[1:-1, 1:-1] & (yokoi == 1) & (count >= 2) & subfield
            if delete.any():
                img[1:-1, 1:-1] &= ~delete
                changed = True
        if not changed:
            return img[1:-1, 1:-1]


def skeletonize(mask: np.ndarray) -> np.ndarray:
    """Boolean one-pixel-wide skeleton of a binary mask (computed on its bounding box only)."""
    mask = np.asarray(mask).astype(bool)
    out = np.zeros(mask.shape, dtype=bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    out[box] = _remove_staircases(_zhang_suen(mask[box]))
    return out


def skeleton_length(skeleton: np.ndarray) -> float:
    """Total length of a one-pixel-wide skeleton: each branch is traced twice by the contours (and
    each loop once by its outer and once by its inner contour), so the length is half their sum."""
    import cv2

    contours, _ = cv2.findContours(skeleton.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return float(sum(cv2.arcLength(cv2.approxPolyDP(c, 1.0, True), True) for c in contours) / 2.0)


def _distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance from each crack pixel's centre to the nearest background pixel's centre;
    outside the image counts as background (a crack is measured up to where the photo cuts it)."""
    import cv2

    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def _neighbours(skeleton: np.ndarray) -> np.ndarray:
    """Number of 8-neighbours of each pixel on the skeleton."""
    return sum(v.astype(np.uint8) for v in _ring(np.pad(skeleton, 1)))


def end_caps(skeleton: np.ndarray, dist: np.ndarray) -> float:
    """What thinning cut off the crack's ends: from each skeleton end to the crack's edge
    (``d - 0.5``; an isolated skeleton pixel has two ends)."""
    count = _neighbours(skeleton)
    ends = skeleton & (count <= 1)
    return float(((dist[ends] - 0.5) * np.where(count[ends] == 0, 2, 1)).sum())


def local_widths(skeleton: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Crack width (pixels) along the skeleton: ``d(p) + max d(q)`` over non-skeleton neighbours q.
    Free ends are left out (there the pixel beyond the end looks like one across the crack), unless
    the skeleton is nothing but ends."""
    across = np.zeros_like(dist)
    for d, on in zip(_ring(np.pad(dist, 1)), _ring(np.pad(skeleton, 1)), strict=True):
        np.maximum(across, np.where(on, 0.0, d), out=across)
    inner = skeleton & (_neighbours(skeleton) >= 2)
    return (dist + across)[inner if inner.any() else skeleton]


def crack_stats(mask: np.ndarray, mm_per_pixel: float | None = None) -> dict[str, float | int | None]:
    """Share, length and max/mean width of a binary mask; ``*_mm`` are None without a scale."""
    mask = np.asarray(mask).astype(bool)
    skeleton = skeletonize(mask)
    dist = _distance(mask)
    widths = local_widths(skeleton, dist)
    px = {
        "length": skeleton_length(skeleton) + end_caps(skeleton, dist),
        "max_width": float(widths.max()) if widths.size else 0.0,
        "mean_width": float(widths.mean()) if widths.size else 0.0,
    }
    stats: dict[str, float | int | None] = {
        "crack_pixels": int(mask.sum()),
        "crack_share": float(mask.mean()) if mask.size else 0.0,
    }
    stats.update({f"{k}_px": v for k, v in px.items()})
    stats.update({f"{k}_mm": (v * mm_per_pixel if mm_per_pixel else None) for k, v in px.items()})
    return stats


# --- model loading and inference ---------------------------------------------------------------


def load_resolved_config(path: str | Path) -> Config:
    """A ``config.yaml`` written by ``dump_config`` (a resolved run) back into a typed Config."""
    import yaml

    from wpcrack.config import resolve

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "resolved configuration not found (a trained model folder has config.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    meta = {k: raw.pop(k, None) for k in ("profile", "dataset", "variant")}
    profile, variant = meta["profile"] or "cpu", meta["variant"] or "full"
    raw.update(profiles={profile: {}}, variants={variant: {}})
    return resolve(raw, meta["dataset"], variant, profile=profile)


def inference_copy(cfg: Config) -> Config:
    """``cfg`` without anything that would fetch backbone weights: the checkpoint replaces them all."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, weights_path=None))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_dir(path: str | Path) -> tuple[torch.nn.Module, Config]:
    """(SlimDetector, resolved config) of a trained model folder, or of the ``best.pt`` in one."""
    from wpcrack.evaluate.inference import load_trained

    path = Path(path)
    if path.is_file() and path.name != "best.pt":
        raise DataError(path, "pass a trained model folder or the best.pt inside one")
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise DataError(path, "model folder not found")
    cfg = load_resolved_config(folder / "config.yaml")
    return load_trained(folder, inference_copy(cfg), device()).slim(), cfg


def model_uri(model: str, dataset: str, prefix: str) -> str | None:
    """The MLflow URI ``model`` names (``champion`` = the dataset's champion alias), or None for a path."""
    from wpcrack.tracking import CHAMPION, model_name

    if model == CHAMPION:
        return f"models:/{model_name(prefix, dataset)}@{CHAMPION}"
    if model.startswith(("models:/", "runs:/")):
        return model
    return None


def load_detector(model: str, dataset: str, params: str | Path | None = None) -> tuple[torch.nn.Module, Config, str]:
    """(SlimDetector, config, source) for ``model``; inference settings from ``params`` if it exists."""
    from wpcrack.config import load_config

    base = load_config(params, dataset=dataset) if params and Path(params).is_file() else None
    prefix = base.tracking.model_name_prefix if base else "wpcrack"
    uri = model_uri(model, dataset, prefix)
    if uri:
        from wpcrack.serving import load_pyfunc_detector

        detector, cfg = load_pyfunc_detector(uri)
        source = uri
    else:
        detector, cfg = load_model_dir(model)
        source = str(Path(model).resolve())
    if base is not None:
        cfg = dataclasses.replace(cfg, evaluate=base.evaluate)
    return detector.to(device()).eval(), cfg, source


class GatedDetector(torch.nn.Module):
    """A SlimDetector whose ``predict`` returns zeros for inputs the classifier calls crack-free.

    ``predict_image`` tiles large photos and calls ``predict`` per batch of tiles, so gating here
    skips crack-free tiles without a second tiling implementation. ``gate=0`` keeps every tile.
    """

    def __init__(self, detector: torch.nn.Module, gate: float = DEFAULT_GATE):
        super().__init__()
        self.detector = detector
        self.gate = gate
        self.tiles = 0
        self.skipped = 0

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
        keep = self.detector.classify(x) >= self.gate if self.gate > 0 else torch.ones(len(x), dtype=torch.bool)
        keep = keep.to(x.device)
        self.tiles += len(x)
        self.skipped += int((~keep).sum())
        if keep.any():
            out[keep] = self.detector(x[keep]).float()
        return out


def check_gate(gate: float) -> float:
    if not 0.0 <= gate < 1.0:
        raise DataError("--gate", f"must be a classifier probability in [0, 1), got {gate} (0 keeps every tile)")
    return gate


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    if not scales or any(not 0.05 <= s <= 8.0 for s in scales):
        raise DataError("--scale", f"each scale must be between 0.05 and 8, got {list(scales)}")
    return tuple(scales)


def probability_map(detector: torch.nn.Module, rgb: np.ndarray, cfg: Config, gate: float = DEFAULT_GATE,
                    scales: Sequence[float] = (1.0,)) -> tuple[np.ndarray, int, int]:
    """(crack probabilities float32 HxW, tiles, tiles skipped) of one RGB image of any size: the
    mean over ``scales`` of the prediction of the image resized by each, resized back."""
    import cv2

    from wpcrack.evaluate.inference import predict_image

    gated = GatedDetector(detector, check_gate(gate))
    h, w = rgb.shape[:2]
    total = np.zeros((h, w), dtype=np.float32)
    for scale in check_scales(scales):
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = rgb if size == (w, h) else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        prob = predict_image(gated, image, cfg)
        total += prob if prob.shape == (h, w) else cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    return total / len(scales), gated.tiles, gated.skipped


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo with crack pixels tinted red."""
    out = rgb.astype(np.float32)
    out[mask] = (1 - _OVERLAY_ALPHA) * out[mask] + _OVERLAY_ALPHA * _OVERLAY_RGB
    return out.round().astype(np.uint8)


# --- the predict command -----------------------------------------------------------------------


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files, problems): folders give their images (not recursive); files are taken as given."""
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                files.extend(list_images(item))
            except DataError as exc:
                problems.append((item, exc.problem))
        elif item.is_file():
            files.append(item)
        else:
            problems.append((item, "not found"))
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, problems


def _output_stem(path: Path, used: set[str]) -> str:
    """The image's stem, made unique when two inputs share one (a-1, a-2, ...)."""
    stem, n = path.stem, 1
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def _error_row(path: Path, problem: str) -> dict[str, Any]:
    from tqdm import tqdm

    tqdm.write(f"wpcrack predict: skipped {path}: {problem}", file=sys.stderr)
    return {**dict.fromkeys(CSV_COLUMNS), "image": str(path), "error": problem}


def predict_file(path: Path, detector: torch.nn.Module, cfg: Config, out_dir: Path, stem: str,
                 mm_per_pixel: float | None, gate: float = DEFAULT_GATE,
                 scales: Sequence[float] = (1.0,)) -> dict[str, Any]:
    """Mask, overlay and one statistics row for one image (raises DataError if it cannot be read)."""
    from tqdm import tqdm

    rgb = read_image(path)
    prob, tiles, skipped = probability_map(detector, rgb, cfg, gate, scales)
    if tiles and skipped > GATE_WARN_SHARE * tiles:
        tqdm.write(f"wpcrack predict: warning: {path}: the gate ({gate:g}) skipped {skipped} of {tiles} tiles; "
                   "on imagery unlike the training data run without --gate", file=sys.stderr)
    mask = prob > cfg.evaluate.threshold
    write_image(out_dir / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    write_image(out_dir / f"{stem}_overlay.jpg", overlay(rgb, mask))
    row = {
        "image": str(path), "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.jpg",
        "height": rgb.shape[0], "width": rgb.shape[1], "tiles": tiles, "tiles_skipped": skipped,
        **crack_stats(mask, mm_per_pixel), "error": None,
    }
    return {k: row[k] for k in CSV_COLUMNS}


def predict(
    inputs: Sequence[str | Path],
    model: str = "champion",
    out_dir: str | Path = "predictions",
    dataset: str = "deepcrack",
    mm_per_pixel: float | None = None,
    params: str | Path | None = "params.yaml",
    gate: float = DEFAULT_GATE,
    scales: Sequence[float] = (1.0,),
) -> pd.DataFrame:
    """Predict every input image; write masks, overlays, ``predictions.csv`` and ``predictions.json``.

    Unreadable files are listed with an ``error`` (and on stderr) and skipped; only having no
    readable image at all is an error.
    """
    import pandas as pd
    from tqdm import tqdm

    if mm_per_pixel is not None and mm_per_pixel <= 0:
        raise DataError("--mm-per-pixel", f"must be positive, got {mm_per_pixel}")
    check_gate(gate)
    scales = check_scales(scales)
    files, problems = collect_inputs(inputs)
    rows = [_error_row(path, problem) for path, problem in problems]
    if not files:
        raise DataError(", ".join(map(str, inputs)), f"no images to predict ({', '.join(IMAGE_SUFFIXES)})")
    detector, cfg, source = load_detector(model, dataset, params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path in tqdm(files, desc="predict", unit="image", disable=len(files) < 2):
        try:
            rows.append(predict_file(path, detector, cfg, out_dir, _output_stem(path, used), mm_per_pixel, gate,
                                     scales))
        except DataError as exc:
            rows.append(_error_row(path, exc.problem))
    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS)).astype(
        {k: "Int64" for k in ("height", "width", "tiles", "tiles_skipped", "crack_pixels")})
    with atomic_path(out_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(out_dir / "predictions.json", {
        "model": source, "threshold": cfg.evaluate.threshold, "gate": gate, "scales": list(scales),
        "mm_per_pixel": mm_per_pixel,
        "images": json.loads(table.to_json(orient="records")),
    })
    done = int(table["error"].isna().sum())
    skipped = f", {len(table) - done} skipped" if done < len(table) else ""
    print(f"wpcrack predict: {done} image(s) -> {out_dir}{skipped}")
    return table
