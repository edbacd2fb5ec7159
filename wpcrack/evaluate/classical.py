"""``wpcrack classical``: the image-processing baseline the learned model must beat.

Locally dark pixels (``wpcrack.method.darkness``: bilateral filter, mean adaptive threshold, small blobs
removed), no training. Its three parameters (block, offset, minimum area) are chosen on the pixel
masks of ``classical.splits`` (train and val in params.yaml: DeepCrack's val split alone, 23 crack
photos, picked a setting 12 IoU worse on test than the train+val choice), the best crack IoU (counts
summed over the rows) over ``classical``'s grid: a baseline may look at masks, the
weakly-supervised model never does. The choice is then scored
once on test with the evaluate stage's protocol and scale rules (``at_model_scale``: the image is
seen at the training rows' scale, CFD cell by cell), and written like an evaluation:
``results/<dataset>/classical/{metrics.json, chosen.json, predictions/}``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import cv2
import numpy as np

from wpcrack.config import Config, DarknessConfig
from wpcrack.method.darkness import dark_pixels, remove_small
from wpcrack.errors import DataError
from wpcrack.evaluate.protocol import at_model_scale, score_size
from wpcrack.evaluate.metrics import ConfusionAccumulator, align, format_table, summary_row
from wpcrack.io import atomic_dir, read_image, read_mask, write_image, write_json
from wpcrack.method.pseudo_labels import confusion, iou_of

MODE = "classical"
VARIANT = "classical"


def grid(cfg: Config) -> list[DarknessConfig]:
    base = cfg.pseudo_labels.darkness
    c = cfg.classical
    return [dataclasses.replace(base, block=b, offset=o, min_area=a)
            for b, o, a in itertools.product(c.blocks, c.offsets, c.min_areas)]


def _sweep(rgb: np.ndarray, candidates: list[DarknessConfig]) -> list[np.ndarray]:
    """``dark_pixels`` for every candidate, filtering and thresholding each setting once."""
    base = candidates[0]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if base.bilateral_d > 0:
        grey = cv2.bilateralFilter(grey, base.bilateral_d, base.bilateral_sigma_color, base.bilateral_sigma_space)
    thresholded: dict[tuple, np.ndarray] = {}
    out = []
    for cand in candidates:
        key = (cand.block, cand.offset)
        if key not in thresholded:
            thresholded[key] = dark_pixels(grey, dataclasses.replace(cand, bilateral_d=0, min_area=0))
        out.append(remove_small(thresholded[key], cand.min_area))
    return out


def choose(cfg: Config, root: Path, rows: list) -> tuple[DarknessConfig, float, list[dict]]:
    """The grid point with the best crack IoU on ``rows``; (setting, its IoU, every point's IoU)."""
    candidates = grid(cfg)
    counts = np.zeros((len(candidates), 3), dtype=np.int64)
    for row in rows:
        rgb = read_image(root / row.image)
        mask = read_mask(root / row.mask, shape=rgb.shape[:2])
        for k, label in enumerate(_sweep(rgb, candidates)):
            counts[k] += confusion([label], [mask])
    ious = [iou_of(c) for c in counts]
    best = int(np.nanargmax(np.nan_to_num(ious, nan=-1.0)))
    table = [{"block": c.block, "offset": c.offset, "min_area": c.min_area, "choice_iou": 100 * iou}
             for c, iou in zip(candidates, ious, strict=True)]
    return candidates[best], ious[best], table


def run(cfg: Config, out_dir: Path) -> dict:
    """Choose on val, score on test; write metrics.json, chosen.json and the predicted masks."""
    from wpcrack.data.manifest import load_manifest
    from wpcrack.evaluate.run import load_test_rows, protocol

    out_dir = Path(out_dir)
    path = Path(cfg.paths.data) / "prepared" / cfg.dataset / "manifest.csv"
    manifest = load_manifest(path)
    splits = list(cfg.classical.splits)
    val = [r for r in manifest[manifest["split"].isin(splits)].itertuples(index=False) if r.mask]
    if not val:
        raise DataError(path, f"has no {'/'.join(splits)} rows with masks: the classical baseline chooses its "
                              "parameters on them")
    start = time.perf_counter()
    chosen, val_iou, table = choose(cfg, path.parent, val)
    root, rows = load_test_rows(cfg)
    acc = ConfusionAccumulator(cfg.evaluate.threshold, cfg.evaluate.pr_thresholds)
    size = score_size(cfg)
    with atomic_dir(out_dir / "predictions") as pred_dir:
        for row in rows:
            rgb = read_image(root / row.image)
            gt = read_mask(root / row.mask, shape=rgb.shape[:2])
            _, prob = at_model_scale(rgb, cfg, lambda image: dark_pixels(image, chosen).astype(np.float32))
            prob8 = np.round(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)
            write_image(pred_dir / f"{Path(row.image).stem}.png", prob8)
            acc.add(*align(prob8, gt, size))
    metrics = {
        MODE: acc.summary(),
        "protocol": {**protocol(cfg), "variant": VARIANT,
                     "inference": "bilateral filter + mean adaptive threshold + small blobs removed, "
                                  f"parameters chosen on the {'+'.join(splits)} masks (CFD: every grid cell, no gating)"},
        "chosen": {"block": chosen.block, "offset": chosen.offset, "min_area": chosen.min_area,
                   "chosen_on": "+".join(splits), "choice_iou": 100 * val_iou, "choice_images": len(val),
                   "grid_points": len(table)},
    }
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "chosen.json", {"chosen": metrics["chosen"], "grid": table})
    write_json(out_dir / "summary.json", summary_row(metrics[MODE]))
    print(f"classical {cfg.dataset}: block {chosen.block}, offset {chosen.offset:g}, min area {chosen.min_area} "
          f"(IoU {100 * val_iou:.2f} on {len(val)} {'+'.join(splits)} images); {len(rows)} test images in "
          f"{time.perf_counter() - start:.1f} s")
    print(format_table({MODE: metrics[MODE]}))
    return metrics
