"""``wpcrack tune-crf``: which denseCRF settings turn a trained model's CAMs into the best pseudo labels.

The CRF settings decide what the detector learns from, and the released ones erase 1-5 px cracks
(docs/method.md). This scores pseudo labels made from one trained model's crack CAMs against the
pixel masks of a training or validation split over a grid of ``pseudo_labels`` settings, so a
setting is chosen on measurements, not guesses. Masks are used for this diagnosis only: the chosen
setting goes into params.yaml and training still sees image labels only. The test split is refused:
tuning on it would leak the test set into the method.

Images are seen as training sees them: ``--crop`` N takes the training's random crops (scale and
flip augmentation included) of side N, which is the default (``train.crop_size``) for the train split.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from wpcrack.config import Config, PseudoLabelConfig
from wpcrack.errors import ConfigError, DataError
from wpcrack.evaluate.tables import to_markdown
from wpcrack.io import atomic_path
from wpcrack.evaluate.metrics import scores
from wpcrack.method.pseudo_labels import confusion, refine

TUNABLE = ("bg_power", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat",
           "iterations")
DEFAULT_GRID = {"bg_power": [0.5, 1.0, 2.0], "gaussian_sxy": [1.0, 3.0], "bilateral_compat": [3.0, 10.0],
                "bilateral_srgb": [5.0, 13.0]}
CAM_THRESHOLDS = (0.3, 0.5, 0.7)


def _labels(rgbs: list[np.ndarray], cams: list[np.ndarray], cfg: PseudoLabelConfig) -> list[np.ndarray]:
    return [refine(rgb, cam, cfg) for rgb, cam in zip(rgbs, cams, strict=True)]


def parse_grid(items: list[str] | None) -> dict[str, list[float]]:
    """``["bg_power=0.5,1", "gaussian_sxy=1,3"]`` -> {key: values}; none given: ``DEFAULT_GRID``.

    ``gaussian`` is a shorthand that sets ``gaussian_sxy`` and ``gaussian_compat`` together.
    """
    if not items:
        return dict(DEFAULT_GRID)
    grid: dict[str, list[float]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in (*TUNABLE, "gaussian"):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(TUNABLE)} or gaussian")
        try:
            grid[key] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--grid {item!r}: values must be numbers") from None
        if not grid[key]:
            raise ConfigError(f"--grid {item!r}: no values")
    return grid


def settings(base: PseudoLabelConfig, grid: dict[str, list[float]]) -> list[PseudoLabelConfig]:
    """Every combination of the grid on top of ``base`` (``base`` first if it is not in the grid)."""
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        change: dict[str, float] = {}
        for key, value in zip(keys, values, strict=True):
            if key == "gaussian":
                change |= {"gaussian_sxy": value, "gaussian_compat": value}
            else:
                change[key] = int(value) if key == "iterations" else value
        out.append(dataclasses.replace(base, **change))
    if base not in out:
        out.insert(0, base)
    return list(dict.fromkeys(out))


def _samples(cfg: Config, split: str, crop: int | None, limit: int, seed: int) -> tuple[list, list]:
    """(rgbs, masks) of up to ``limit`` crack images of ``split`` with a non-empty mask."""
    from wpcrack.data.datasets import WeakDataset

    manifest = Path(cfg.paths.data) / "prepared" / cfg.dataset / "manifest.csv"
    data = WeakDataset(manifest, split, crop_size=crop, augment=crop is not None, seed=seed)
    rgbs, masks = [], []
    for index in np.flatnonzero(data.labels == 1):
        item = data[int(index)]
        if item["has_mask"] and bool(item["mask"].any()):
            rgbs.append(item["rgb"].numpy())
            masks.append(item["mask"][0].numpy() > 0)
        if len(rgbs) == limit:
            break
    if not rgbs:
        raise DataError(manifest, f"split {split!r} has no crack image with a non-empty mask to tune on")
    return rgbs, masks


def _scores(labels: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    counts = scores(np.append(confusion(labels, masks), 0))
    return {
        "IoU": float(counts["iou"]),
        "precision": float(counts["precision"]),
        "recall": float(counts["recall"]),
        "non-empty": float(np.mean([label.any() for label in labels])),
    }


def tune(cfg: Config, model_dir: Path, grid: dict[str, list[float]], split: str = "train",
         crop: int | None = None, limit: int = 64, workers: int = 1, seed: int = 0) -> pd.DataFrame:
    """One row per CRF setting (and per plain CAM threshold, for reference), best IoU first."""
    from wpcrack.inference.loading import load_trained
    from wpcrack.inference.tiles import crack_cams

    if split == "test":
        raise ConfigError("tune-crf refuses the test split: choosing settings on it would leak the test set")
    rgbs, masks = _samples(cfg, split, crop, limit, seed)
    model = load_trained(model_dir, cfg)
    cams = [cam for start in range(0, len(rgbs), 16) for cam in crack_cams(model, rgbs[start:start + 16])]
    rows = [{"setting": f"CAM > {t} (no CRF)", **_scores([c > t for c in cams], masks)} for t in CAM_THRESHOLDS]
    candidates = settings(cfg.pseudo_labels, grid)
    if workers > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(_labels, itertools.repeat(rgbs), itertools.repeat(cams), candidates))
    else:
        results = [_labels(rgbs, cams, p) for p in candidates]
    for p, labels in zip(candidates, results, strict=True):
        name = ", ".join(f"{k} {getattr(p, k):g}" for k in TUNABLE if getattr(p, k) != getattr(cfg.pseudo_labels, k))
        rows.append({"setting": name or "current params.yaml", **_scores(labels, masks),
                     **{k: getattr(p, k) for k in TUNABLE}})
    frame = pd.DataFrame(rows).sort_values("IoU", ascending=False, na_position="last", kind="stable")
    frame.attrs.update(images=len(rgbs), split=split, crop=crop)
    return frame.reset_index(drop=True)


def write(frame: pd.DataFrame, cfg: Config, model_dir: Path, out: Path) -> None:
    """``out`` (Markdown) and the same table as CSV beside it."""
    crop = frame.attrs.get("crop")
    seen = f"random {crop} px training crops" if crop else "whole images"
    head = (f"# denseCRF settings for {cfg.dataset}\n\n"
            f"Generated by `wpcrack tune-crf {cfg.dataset}` from the CAMs of `{model_dir}` on "
            f"{frame.attrs.get('images')} crack images of the {frame.attrs.get('split')} split ({seen}). "
            "Pseudo labels are scored against the pixel masks (diagnosis only: training never sees them); "
            "settings not named are those of the current params.yaml. Best IoU first.\n\n")
    shown = frame.drop(columns=[k for k in TUNABLE if k in frame])
    with atomic_path(out) as tmp:
        tmp.write_text(head + to_markdown(shown) + "\n")
    with atomic_path(out.with_suffix(".csv")) as tmp:
        frame.to_csv(tmp, index=False)
