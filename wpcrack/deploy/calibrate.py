"""``wpcrack calibrate``: the crack width a model learned at, stored beside it for scale choice.

The detector sees cracks best at the pixel width they had in its training rows. This measures that
width the way ``wpcrack.deploy.scale.photo_crack_width`` measures a photo's: the model's own
detector on its crack-labelled training rows (as stored: the training scale), and the scale-space
ridge width of the photo along the skeleton of what it finds. No pixel mask is read: the weak
model stays weak. A composite run (``roads``) weighs its sources as training drew them
(``train.source_weights``). The median goes to ``models/<run>/scale.json`` with the weights' digest,
so a retrained model is never paired with another model's width. It also fits the model's own
``predict.width_weight`` (``fit_width_weight``): the weight at which predict's choice brings the model's
val photos closest to the scale its training rows showed them at. Training measures both the same way
before it logs the detector to MLflow (``Tracker.log_detector``), so a served model carries them.
"""

from __future__ import annotations

import dataclasses
import json
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
    trained_width = weighted_median(values, weights)
    return {
        "crack_width_px": trained_width,
        "by_source": {s: {"median_px": float(np.median(ws)), "rows": len(ws)} for s, ws in widths.items()},
        **fit_width_weight(cfg, detector, trained_width, {s: share.get(s, 0.0) for s in widths}),
        "weights_md5": weights_digest(detector),
    }


# --- the width weight, fitted to the training geometry ---------------------------------------------

WIDTH_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the candidates of ``fit_width_weight``
VAL_PHOTOS_PER_SOURCE = 40


def val_photos(cfg: Config) -> list[tuple[Path, Path]]:
    """(image, mask) files of the photos whose rows make ``cfg.dataset``'s val split, at their own size
    (from ``data/raw``; the val rows themselves are squashed): where predict's scale settings are fitted
    and chosen (``wpcrack generalise --split val``)."""
    from wpcrack.data.prepare import raw_items

    data = Path(cfg.paths.data)
    listing = data / "prepared" / cfg.dataset / "split.json"
    if not listing.is_file():
        raise DataError(listing, f"not found; run `dvc repro prepare@{cfg.dataset}` first")
    val = set(json.loads(listing.read_text())["val"])
    return [(it.image, it.mask) for it in raw_items(data / "raw" / cfg.dataset, cfg.dataset) if it.source_id in val]


def training_factor(p, dataset: str, height: int, width: int) -> float | None:
    """The geometric mean of the x and y factors by which ``dataset``'s prepare stage rescales a photo
    of this size into training rows (``p``: the ``prepare`` settings); None where it is not known."""
    if dataset == "cfd":
        fy, fx = p.cfd.patch_size * p.cfd.grid / height, p.cfd.patch_size * p.cfd.grid / width
    elif dataset in ("deepcrack", "crack500"):
        side = getattr(p, dataset).image_size
        fy, fx = side / height, side / width
    else:
        return None
    return float(np.sqrt(fy * fx))


def replay(record: dict, trained_width: float, weight: float, cfg: Config) -> float:
    """The scale ``match_width`` gives a photo's recorded evidence choice and crack width at ``weight``."""
    from wpcrack.deploy.scale import ScaleChoice, ladder, match_width

    if record["evidence_scale"] is None or not record["crack_width_px"]:
        return record["scale"]
    candidates = ladder((record["height"], record["width"]), cfg)
    evidence = ScaleChoice((record["evidence_scale"],), "auto")
    return match_width(evidence, record["crack_width_px"], trained_width, weight, (candidates[-1], candidates[0])).scale


def octaves_off(records: dict[str, list[dict]], trained_width: float, weight: float, cfg: Config) -> dict[str, float]:
    """Per source: the mean |octaves| between the scale at ``weight`` and the source's training factor."""
    return {source: float(np.mean([abs(np.log2(replay(r, trained_width, weight, cfg) / r["training_factor"]))
                                   for r in rs])) for source, rs in records.items()}


def fit_width_weight(cfg: Config, detector, trained_width: float, share: dict[str, float],
                     per_source: int = VAL_PHOTOS_PER_SOURCE) -> dict:
    """The ``predict.width_weight`` that brings the model's own val photos closest to the scale its
    training rows showed them at (``training_factor``), sources weighed as training drew them.

    The evidence and the width disagree by how many crack widths a model learned: the classifier of a
    model of one source is sure of a crack only near its training scale, one of several sources at every
    coarser scale, so one global weight cannot serve both (docs/operations.md). Each photo's evidence
    choice and crack width are found once (as ``decide_scale`` finds them); the weights are replayed.
    No pixel mask is read: the target is the prepare stage's geometry. Sources without val photos at
    their own size (synthetic rows, incoming images) are left out; without any, nothing is fitted."""
    from wpcrack.deploy.detection import CRACK_WIDTH_ATTR, decide_scale

    probe = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, width_weight=1.0, width_from="setting",
                                                                spread=0.0))
    records: dict[str, list[dict]] = {}
    recorded = getattr(detector, CRACK_WIDTH_ATTR, None)
    setattr(detector, CRACK_WIDTH_ATTR, trained_width)  # the width being measured, not one on record
    try:
        for source in share:
            if training_factor(cfg.prepare, source, 1, 1) is None:
                continue
            try:
                files = val_photos(dataclasses.replace(cfg, dataset=source))
            except DataError:
                continue
            picks = np.linspace(0, len(files) - 1, min(per_source, len(files))).round().astype(int)
            for image, _ in (files[i] for i in sorted(set(picks))):
                rgb = read_image(image)
                choice, _ = decide_scale(detector, rgb, probe)
                records.setdefault(source, []).append({
                    "height": rgb.shape[0], "width": rgb.shape[1], "scale": choice.scale,
                    "training_factor": training_factor(cfg.prepare, source, *rgb.shape[:2]),
                    "evidence_scale": choice.evidence_scale, "crack_width_px": choice.crack_width})
    finally:
        setattr(detector, CRACK_WIDTH_ATTR, recorded)
    if not records:
        return {}
    total = sum(share[s] for s in records) or 1.0
    table = {w: octaves_off(records, trained_width, w, cfg) for w in WIDTH_WEIGHTS}
    cost = {w: sum(share[s] * off for s, off in per.items()) / total for w, per in table.items()}
    best = min(WIDTH_WEIGHTS, key=lambda w: (round(cost[w], 6), w))
    return {"width_weight": best,
            "width_fit": {"val_photos": {s: len(rs) for s, rs in records.items()},
                          "mean_octaves_off": {str(w): {**per, "weighted": cost[w]} for w, per in table.items()}}}


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
