"""``wpcrack predict``: crack masks and crack statistics for your own images and survey photos.

The model is the MLflow ``champion`` of a dataset, any ``models:/`` (or ``runs:/``) URI, or a
trained model folder (``best.pt`` + ``config.yaml``). Architecture comes from the model's own
resolved configuration; inference settings (``evaluate.threshold``, ``tile_size``,
``tile_overlap``) from ``params.yaml`` when there is one, so they can be tuned without retraining.

Images larger than a tile go through ``wpcrack.inference.tiles.predict_image`` (overlapping
tiles, blended). With ``--gate P`` (opt-in) ``GatedDetector`` makes the classifier skip tiles whose
crack probability is below P, so a large survey photo costs detector time only where there are
cracks. It is off by default: on imagery unlike the training data the classifier's probabilities
are not calibrated, and a gate once skipped all 252 tiles of a clearly cracked 12 MP photo. When
the gate skips most tiles of an image, predict says so on stderr.

``--scale S`` states the photo's scale: the image is resized by S (e.g. 0.25 for a 12 MP photo of
cracks four times wider in pixels than the training images') before inference and the probabilities
are resized back; several scales average their probabilities (multi-scale inference).

Statistics: ``wpcrack.deploy.measure``.
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

from wpcrack.deploy.detection import (
    DEFAULT_GATE,
    check_gate,
    check_scales,
    classifier_path,
    device,
    load_model_dir,
    probability_map,
    supports_gate,
)
from wpcrack.deploy.measure import crack_stats
from wpcrack.errors import DataError
from wpcrack.io import IMAGE_SUFFIXES, atomic_path, list_images, read_image, write_image, write_json

if TYPE_CHECKING:
    import pandas as pd

    from wpcrack.config import Config

CSV_COLUMNS = (
    "image", "mask", "overlay", "height", "width", "scale", "scale_source", "tiles", "tiles_skipped",
    "crack_pixels", "crack_share", "length_px", "max_width_px", "mean_width_px",
    "length_mm", "max_width_mm", "mean_width_mm", "error",
)
GATE_WARN_SHARE = 0.5  # warn when the gate skips more than this share of an image's tiles
_OVERLAY_RGB = np.array([255, 0, 0], dtype=np.float32)
_OVERLAY_ALPHA = 0.6


# --- model loading and inference ---------------------------------------------------------------


def model_uri(model: str, dataset: str, prefix: str) -> str | None:
    """The MLflow URI ``model`` names (``champion`` = the dataset's champion alias), or None for a path."""
    from wpcrack.tracking.runs import CHAMPION, model_name

    if model == CHAMPION:
        return f"models:/{model_name(prefix, dataset)}@{CHAMPION}"
    if model.startswith(("models:/", "runs:/")):
        return model
    return None


def load_registered(uri: str) -> tuple[torch.nn.Module, Config]:
    """(SlimDetector, resolved config) of a logged model, e.g. ``models:/wpcrack-deepcrack@champion``."""
    from mlflow.exceptions import MlflowException

    from wpcrack.errors import WpcrackError
    from wpcrack.tracking.runs import mlflow_module

    mlflow = mlflow_module()
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise WpcrackError(
            f"{uri}: cannot load from MLflow ({mlflow.get_tracking_uri()}): {exc.message.splitlines()[0]}. "
            "Train and promote a model first, or pass --model <trained model folder>"
        ) from None
    impl = model.unwrap_python_model()
    _registered_width(uri, impl.detector)
    return impl.detector, impl.cfg


def _registered_width(uri: str, detector: torch.nn.Module) -> None:
    """The training crack width and width weight `wpcrack calibrate` tagged the registered version with, if any."""
    from wpcrack.deploy.detection import RECORDED, weights_digest
    from wpcrack.tracking.runs import WEIGHTS_TAG, client

    if not uri.startswith("models:/"):
        return
    name, _, ref = uri.removeprefix("models:/").partition("@")
    name, _, number = name.partition("/")
    version = client().get_model_version_by_alias(name, ref) if ref else client().get_model_version(name, number)
    if version.tags.get(WEIGHTS_TAG) != weights_digest(detector):
        return
    for tag in RECORDED:
        if version.tags.get(tag):
            setattr(detector, tag, float(version.tags[tag]))


def load_detector(model: str, dataset: str, params: str | Path | None = None) -> tuple[torch.nn.Module, Config, str]:
    """(SlimDetector, config, source) for ``model``; inference settings from ``params`` if it exists."""
    from wpcrack.config import load_config

    base = load_config(params, dataset=dataset) if params and Path(params).is_file() else None
    prefix = base.tracking.model_name_prefix if base else "wpcrack"
    uri = model_uri(model, dataset, prefix)
    if uri:
        detector, cfg = load_registered(uri)
        source = uri
    else:
        detector, cfg = load_model_dir(model)
        source = str(Path(model).resolve())
    if base is not None:
        cfg = dataclasses.replace(cfg, evaluate=base.evaluate, predict=base.predict)
    return detector.to(device()).eval(), cfg, source


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
                 scales: Sequence[float] | None = None) -> dict[str, Any]:
    """Mask, overlay and one statistics row for one image (raises DataError if it cannot be read)."""
    from tqdm import tqdm

    rgb = read_image(path)
    prob, tiles, skipped, choice = probability_map(detector, rgb, cfg, gate, scales, mm_per_pixel)
    if choice.at_edge:
        tqdm.write(f"wpcrack predict: warning: {path}: its best scale ({choice.scale:.3g}) is at the end of the range "
                   f"searched ({min(choice.evidence):.3g}-{max(choice.evidence):.3g}); its cracks may be finer or "
                   "coarser than any scale the model sees them well at: check the overlay, or give --scale",
                   file=sys.stderr)
    if tiles and skipped > GATE_WARN_SHARE * tiles:
        tqdm.write(f"wpcrack predict: warning: {path}: the gate ({gate:g}) skipped {skipped} of {tiles} tiles; "
                   "on imagery unlike the training data run without --gate", file=sys.stderr)
    mask = prob > cfg.evaluate.threshold
    write_image(out_dir / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    write_image(out_dir / f"{stem}_overlay.jpg", overlay(rgb, mask))
    row = {
        "image": str(path), "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.jpg",
        "height": rgb.shape[0], "width": rgb.shape[1], "scale": round(choice.scale, 6), "scale_source": choice.source,
        "tiles": tiles, "tiles_skipped": skipped,
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
    scales: Sequence[float] | None = None,
    flip: bool | None = None,
) -> pd.DataFrame:
    """Predict every input image; write masks, overlays, ``predictions.csv`` and ``predictions.json``.

    ``scales`` None chooses each image's scale (``wpcrack.deploy.scale``, settings ``predict`` of the
    parameters); the scale used is in the ``scale`` column either way.

    ``flip`` None keeps ``evaluate.flip`` of the parameters (averaging the four flips costs four
    passes; False is the fast path for large surveys).

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
    if flip is not None:
        cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, flip=flip))
    if gate > 0 and not supports_gate(detector):
        missing = (f"an ONNX export needs its classifier graph {classifier_path(source).name} beside it"
                   if str(source).endswith(".onnx") else "the model was sliced without it")
        raise DataError(source, f"this model has no classifier head for --gate ({missing}); run without --gate")
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
        {k: "Int64" for k in ("height", "width", "tiles", "tiles_skipped", "crack_pixels")} | {"scale": "Float64"})
    with atomic_path(out_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(out_dir / "predictions.json", {
        "model": source, "threshold": cfg.evaluate.threshold, "gate": gate,
        "scales": list(scales) if scales else "auto", "scale_search": dataclasses.asdict(cfg.predict),
        "flip": cfg.evaluate.flip,
        "mm_per_pixel": mm_per_pixel,
        "images": json.loads(table.to_json(orient="records")),
    })
    done = int(table["error"].isna().sum())
    skipped = f", {len(table) - done} skipped" if done < len(table) else ""
    print(f"wpcrack predict: {done} image(s) -> {out_dir}{skipped}")
    return table
