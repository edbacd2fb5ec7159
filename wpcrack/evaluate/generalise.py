"""``wpcrack generalise``: the full models on every test split through predict's default path.

``evaluate`` follows the paper's protocol: each test photo is squashed to the training rows'
square size first, which only someone who knows the training data can do. A road team runs
``wpcrack predict`` instead, which sees the photo as it is and chooses the scale itself
(``wpcrack.deploy.scale``). This scores exactly that path: every available full model on the test
split of every dataset (a model on another dataset's photos is the cross-source case), and the
DeepCrack model on DeepCrack's test photos enlarged 2x, 4x and 8x (made here, never stored), the
case of a phone or survey camera with more megapixels. Scoring follows each dataset's protocol
(DeepCrack at 256x256, the others at their own size; counts summed over the split).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from wpcrack.config import Config, load_config
from wpcrack.errors import DataError
from wpcrack.io import read_image, read_mask, write_json

SPLITS = ("deepcrack", "cfd", "crack500")
MODELS = ("deepcrack", "cfd", "crack500", "roads")
ENLARGEMENTS = (1, 2, 4, 8)


def model_dir(cfg: Config, model: str) -> Path:
    """The full model of a run: ``models/<name>/full``."""
    return Path(cfg.paths.models) / model / "full"


def score_split(detector, cfg: Config, split_cfg: Config, enlarge: int = 1, limit: int | None = None) -> dict:
    """Crack IoU (and P/R/F1, percent) of ``detector`` on ``split_cfg``'s test split through
    ``probability_map`` with no scale given, each photo enlarged ``enlarge`` times first; also the
    scales it chose. ``cfg`` is the model's (inference settings of the parameters), ``split_cfg`` the
    scored dataset's (where its test split is and how it is scored)."""
    import cv2

    from wpcrack.deploy.detection import probability_map
    from wpcrack.evaluate.inference import score_size
    from wpcrack.evaluate.metrics import ConfusionAccumulator, align
    from wpcrack.evaluate.run import load_test_rows
    from wpcrack.geometry import resize_map

    root, rows = load_test_rows(split_cfg)
    rows = rows[:limit] if limit else rows
    acc = ConfusionAccumulator(cfg.evaluate.threshold, 2)
    chosen, start = [], time.perf_counter()
    for row in rows:
        rgb = read_image(root / row.image)
        gt = read_mask(root / row.mask, rgb.shape[:2])
        if enlarge > 1:
            rgb = cv2.resize(rgb, None, fx=enlarge, fy=enlarge, interpolation=cv2.INTER_CUBIC)
        result = probability_map(detector, rgb, cfg)
        chosen.append(result.choice.scale)
        prob = resize_map(result.prob, gt.shape) if enlarge > 1 else result.prob
        acc.add(*align(prob, gt, score_size(split_cfg)))
    summary = acc.summary()
    return {
        **{k: summary[k] for k in ("precision", "recall", "f1", "iou")},
        "images": len(rows), "enlarge": enlarge, "seconds_per_image": (time.perf_counter() - start) / len(rows),
        "scale_median": float(np.median(chosen)), "scale_min": float(np.min(chosen)),
        "scale_max": float(np.max(chosen)),
    }


def classical_iou(cfg: Config, dataset: str) -> float | None:
    """The classical baseline's test IoU (``wpcrack classical``, the evaluate protocol), if it was run."""
    from wpcrack.evaluate.classical import MODE

    path = Path(cfg.paths.results) / dataset / "classical" / "metrics.json"
    return float(json.loads(path.read_text())[MODE]["iou"]) if path.is_file() else None


def train_minutes(cfg: Config, model: str) -> float | None:
    path = model_dir(cfg, model) / "train_metrics.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["train_seconds"]) / 60.0


def generalise(params: str | Path, models: tuple[str, ...] = MODELS, out: Path = Path("docs/results/generalisation"),
               limit: int | None = None) -> dict:
    """Score the models present, write ``<out>.json`` (the page's figures) and ``<out>.md``."""
    from wpcrack.deploy.predict import load_detector

    base = load_config(params)
    splits = {s: load_config(params, dataset=s) for s in SPLITS}
    runs: dict[str, dict] = {}
    for model in models:
        folder = model_dir(base, model)
        if not (folder / "best.pt").is_file():
            print(f"wpcrack generalise: {folder}: no trained model, its row stays empty")
            continue
        detector, cfg, _ = load_detector(str(folder), model, params)
        runs[model] = {split: score_split(detector, cfg, splits[split], limit=limit) for split in SPLITS}
        if model == "deepcrack":
            runs[model]["enlarged"] = {"1": runs[model]["deepcrack"], **{
                str(f): score_split(detector, cfg, splits["deepcrack"], f, limit) for f in ENLARGEMENTS[1:]}}
        print(f"wpcrack generalise: {model}: " + ", ".join(f"{s} {runs[model][s]['iou']:.1f}" for s in SPLITS))
    if not runs:
        raise DataError(base.paths.models, "no trained full model to score (dvc repro train@deepcrack first)")
    figures = {
        "matrix": {m: {s: runs[m][s]["iou"] if m in runs else None for s in SPLITS} for m in MODELS},
        "scale": {str(f): runs["deepcrack"]["enlarged"][str(f)]["iou"] if "deepcrack" in runs else None
                  for f in ENLARGEMENTS},
        "train_minutes": {"roads": train_minutes(base, "roads")},
    }
    write_json(out.with_suffix(".json"), figures)
    details = {"runs": runs, "classical": {s: classical_iou(base, s) for s in SPLITS}, "predict": vars(base.predict)}
    write_json(out.with_name(out.name + "_details.json"), details)
    return {"figures": figures, **details}
