"""``wpcrack calibrate``: the crack width a model learned at, stored beside it for scale choice.

The detector sees cracks best at the pixel width they had in its training rows. This measures that
width the way ``wpcrack.deploy.scale.photo_crack_width`` measures a photo's: the model's own
detector on its crack-labelled training rows (as stored: the training scale), and the scale-space
ridge width of the photo along the skeleton of what it finds. No pixel mask is read: the weak
model stays weak. A composite run (``roads``) weighs its sources as training drew them
(``train.source_weights``). The median goes to ``models/<run>/scale.json`` with the weights' digest,
so a retrained model is never paired with another model's width. Training measures the same width the
same way before it logs the detector to MLflow (``Tracker.log_detector``), so a served model carries it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from wpcrack.config import Config
from wpcrack.errors import DataError
from wpcrack.io import read_image, write_json


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The value at which half of the total weight lies on each side (the lower one on a tie)."""
    order = np.argsort(values)
    v, w = np.asarray(values, float)[order], np.asarray(weights, float)[order]
    cumulative = np.cumsum(w)
    return float(v[np.searchsorted(cumulative, cumulative[-1] / 2)])


def measure(cfg: Config, detector, rows_per_source: int = 120, seed: int = 0) -> dict:
    """The crack width ``detector`` (a SlimDetector on ``cfg``) learned at, from ``cfg``'s prepared crack
    training rows: ``crack_width_px`` (the weighted median), ``by_source`` and ``weights_md5``."""
    from wpcrack.data.manifest import load_manifest
    from wpcrack.deploy.detection import GatedDetector, weights_digest
    from wpcrack.deploy.scale import photo_crack_width
    from wpcrack.inference.tiles import predict_image

    root = Path(cfg.paths.data) / "prepared" / cfg.dataset
    rows = load_manifest(root / "manifest.csv", split="train")
    rows = rows[rows["label"] == 1]
    if rows.empty:
        raise DataError(root / "manifest.csv", "no crack-labelled training rows to calibrate on")
    probe = GatedDetector(detector.eval())
    widths: dict[str, list[float]] = {}
    for source, group in rows.groupby("dataset", sort=True):
        picked = group.sample(min(rows_per_source, len(group)), random_state=seed)
        for image in picked["image"]:
            rgb = read_image(root / image)
            width = photo_crack_width(rgb, predict_image(probe, rgb, cfg), cfg.evaluate.threshold)
            if width is not None:
                widths.setdefault(str(source), []).append(width)
    if not widths:
        raise DataError(root / "manifest.csv", "the detector finds no crack on any crack-labelled training row: "
                        "nothing to calibrate on")
    share = cfg.train.source_weights or {s: 1.0 for s in widths}
    values = [w for s, ws in widths.items() for w in ws]
    weights = [share.get(s, 0.0) / len(ws) for s, ws in widths.items() for _ in ws]
    return {
        "crack_width_px": weighted_median(values, weights),
        "by_source": {s: {"median_px": float(np.median(ws)), "rows": len(ws)} for s, ws in widths.items()},
        "weights_md5": weights_digest(detector),
    }


def calibrate(cfg: Config, model_dir: Path, rows_per_source: int = 120, seed: int = 0) -> dict:
    """Measure the model of ``model_dir`` and write ``model_dir/scale.json``; returns its content."""
    from wpcrack.deploy.detection import SCALE_FILE, load_model_dir

    if not (model_dir / "best.pt").is_file():
        raise DataError(model_dir / "best.pt", f"no trained model; run `dvc repro train@{cfg.dataset}` first")
    detector, model_cfg = load_model_dir(model_dir)
    start = time.perf_counter()
    here = dataclasses.replace(model_cfg, paths=cfg.paths,  # the rows where params.yaml has them now
                               train=dataclasses.replace(model_cfg.train, source_weights=cfg.train.source_weights))
    result = measure(here, detector, rows_per_source, seed)
    write_json(model_dir / SCALE_FILE, result)  # no timing inside: a re-run writes the same bytes
    return {**result, "seconds": time.perf_counter() - start}
