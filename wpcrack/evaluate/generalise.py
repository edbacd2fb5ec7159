"""``wpcrack generalise``: the full models on every test split through predict's default path.

``evaluate`` follows the paper's protocol: each test photo is squashed to the training rows'
square size first, which only someone who knows the training data can do. A road team runs
``wpcrack predict`` instead, which sees the photo as it is and chooses the scale itself
(``wpcrack.deploy.scale``). This scores exactly that path: every available full model on the test
split of every dataset (a model on another dataset's photos is the cross-source case), and the
DeepCrack model on DeepCrack's test photos enlarged 2x, 4x and 8x (made here, never stored), the
case of a phone or survey camera with more megapixels. Scoring follows each dataset's protocol
(DeepCrack at 256x256, the others at their own size; counts summed over the split).

``wpcrack generalise MODEL`` writes ``results/<model>/full/generalise.json`` (one DVC stage per
model, so a retrained model re-scores only itself); ``wpcrack generalise --table`` gathers them
with the classical rows and the evaluate-protocol numbers into ``docs/results/generalisation.md``
and ``.json`` and logs the figures to MLflow.
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


def photos(split_cfg: Config, split: str = "test", limit: int | None = None) -> list[tuple[Path, Path]]:
    """(image, mask) files of a dataset's photos at their own size: the prepared test split, or the
    photos whose rows make its val split (from ``data/raw``; the val rows themselves are squashed),
    on which predict's scale settings may be chosen."""
    from wpcrack.evaluate.run import load_test_rows

    if split == "test":
        root, rows = load_test_rows(split_cfg)
        found = [(root / r.image, root / r.mask) for r in rows]
    elif split == "val":
        from wpcrack.deploy.calibrate import val_photos

        found = val_photos(split_cfg)
    else:
        raise DataError(split, "split must be test or val")
    if not found:
        raise DataError(split_cfg.dataset, f"no {split} photos")
    return found[:limit] if limit else found


def score_files(detector, cfg: Config, files: list[tuple[Path, Path]], score_at: int | None = None,
                enlarge: int = 1) -> dict:
    """Crack IoU (and P/R/F1, percent) of ``detector`` on (photo, mask) files through
    ``probability_map`` with no scale given, each photo enlarged ``enlarge`` times first, scored at
    its own size (or squashed to ``score_at``, DeepCrack's protocol), counts summed over the files;
    also the scales it chose, per photo (with the evidence's choice and the photo's crack width). ``cfg`` holds the inference settings (evaluate, predict)."""
    import cv2

    from wpcrack.deploy.detection import probability_map
    from wpcrack.evaluate.metrics import ConfusionAccumulator, align
    from wpcrack.geometry import resize_map

    acc = ConfusionAccumulator(cfg.evaluate.threshold, 2)
    chosen, per_image, start = [], [], time.perf_counter()
    for image, mask in files:
        rgb = read_image(image)
        gt = read_mask(mask, rgb.shape[:2])
        if enlarge > 1:
            rgb = cv2.resize(rgb, None, fx=enlarge, fy=enlarge, interpolation=cv2.INTER_CUBIC)
        result = probability_map(detector, rgb, cfg)
        choice = result.choice
        chosen.append(choice.scale)
        per_image.append({"image": image.name, "height": rgb.shape[0], "width": rgb.shape[1], "scale": choice.scale,
                          "evidence_scale": choice.evidence_scale, "crack_width_px": choice.crack_width})
        prob = resize_map(result.prob, gt.shape) if enlarge > 1 else result.prob
        acc.add(*align(prob, gt, score_at))
    summary = acc.summary()
    return {
        **{k: summary[k] for k in ("precision", "recall", "f1", "iou")},
        "images": len(files), "enlarge": enlarge, "seconds_per_image": (time.perf_counter() - start) / len(files),
        "scale_median": float(np.median(chosen)), "scale_min": float(np.min(chosen)),
        "scale_max": float(np.max(chosen)), "per_image": per_image,
    }


def score_split(detector, cfg: Config, split_cfg: Config, enlarge: int = 1, limit: int | None = None,
                split: str = "test") -> dict:
    """``score_files`` on ``split_cfg``'s photos (``photos``), scored by that dataset's protocol.
    ``cfg`` is the model's (inference settings of the parameters), ``split_cfg`` the scored dataset's."""
    from wpcrack.evaluate.protocol import score_size

    return score_files(detector, cfg, photos(split_cfg, split, limit), score_size(split_cfg), enlarge)


def classical_iou(cfg: Config, dataset: str) -> float | None:
    """The classical baseline's test IoU (``wpcrack classical``, the evaluate protocol), if it was run."""
    from wpcrack.evaluate.classical import MODE

    path = Path(cfg.paths.results) / dataset / "classical" / "metrics.json"
    return float(json.loads(path.read_text())[MODE]["iou"]) if path.is_file() else None


def evaluate_iou(cfg: Config, model: str) -> dict[str, float] | None:
    """The evaluate protocol's test IoU of a full model: its own split, or each source's (roads)."""
    path = Path(cfg.paths.results) / model / "full" / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if "by_source" in metrics:
        return {s: float(v["iou"]) for s, v in metrics["by_source"].items()}
    return {model: float(metrics["detector"]["iou"])}


def train_minutes(cfg: Config, model: str) -> float | None:
    path = model_dir(cfg, model) / "train_metrics.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["train_seconds"]) / 60.0


def scores_path(cfg: Config, model: str, split: str = "test") -> Path:
    """Where ``wpcrack generalise MODEL`` writes its figures: the test scores beside the run's evaluate
    outputs (the results pages read them), val tries among the reports (no stage reads them)."""
    if split == "test":
        return Path(cfg.paths.results) / model / "full" / "generalise.json"
    return Path(cfg.paths.reports) / "generalisation" / f"{model}_{split}.json"


def score_model(params: str | Path, model: str, limit: int | None = None, split: str = "test",
                overrides: tuple[str, ...] = ()) -> dict:
    """Score one full model on every dataset's test photos (and DeepCrack's enlarged, for the DeepCrack
    model) through predict's default path; write and return ``results/<model>/full/generalise.json``.
    ``split`` val scores the val photos instead (``reports/generalisation/<model>_val.json``), where ``overrides`` of
    the ``predict`` section (``predict.max_scale=2``) may be tried: the place to choose them."""
    import dataclasses

    from wpcrack.deploy.predict import load_detector

    if model not in MODELS:
        raise DataError(model, f"not a generalisation model; valid: {', '.join(MODELS)}")
    base = load_config(params, overrides=overrides)
    folder = model_dir(base, model)
    if not (folder / "best.pt").is_file():
        raise DataError(folder / "best.pt", f"no trained model; run `dvc repro train@{model}` first")
    splits = {s: load_config(params, dataset=s) for s in SPLITS}
    detector, cfg, _ = load_detector(str(folder), model, params)
    cfg = dataclasses.replace(cfg, predict=base.predict)
    start = time.perf_counter()
    scores: dict = {s: score_split(detector, cfg, splits[s], limit=limit, split=split) for s in SPLITS}
    if model == "deepcrack" and split == "test":
        scores["enlarged"] = {"1": scores["deepcrack"], **{
            str(f): score_split(detector, cfg, splits["deepcrack"], f, limit) for f in ENLARGEMENTS[1:]}}
    out = {"model": model, "split": split, "limit": limit, "predict": vars(cfg.predict),
           "minutes": (time.perf_counter() - start) / 60, "scores": scores}
    write_json(scores_path(base, model, split), out)
    print(f"wpcrack generalise {model}: " + ", ".join(f"{s} {scores[s]['iou']:.1f}" for s in SPLITS)
          + (", enlarged " + ", ".join(f"{f}x {v['iou']:.1f}" for f, v in scores["enlarged"].items())
             if "enlarged" in scores else "") + f" ({out['minutes']:.1f} min) -> {scores_path(base, model, split)}")
    return out


def table(params: str | Path, out: Path = Path("docs/results/generalisation")) -> dict:
    """Gather the models' ``generalise.json`` into ``<out>.json`` (exactly the figures the issue
    names) and ``<out>.md``; log them to MLflow. Models not yet scored stay empty (null)."""
    base = load_config(params)
    runs = {m: json.loads(scores_path(base, m).read_text()) for m in MODELS if scores_path(base, m).is_file()}
    if not runs:
        raise DataError(scores_path(base, "deepcrack"), "no model was scored; run `dvc repro generalise@deepcrack` first")
    scores = {m: r["scores"] for m, r in runs.items()}
    figures = {
        "matrix": {m: {s: scores[m][s]["iou"] if m in scores else None for s in SPLITS} for m in MODELS},
        "scale": {str(f): scores["deepcrack"]["enlarged"][str(f)]["iou"] if "deepcrack" in scores else None
                  for f in ENLARGEMENTS},
        "train_minutes": {"roads": train_minutes(base, "roads")},
    }
    classical = {s: classical_iou(base, s) for s in SPLITS}
    protocol = {m: evaluate_iou(base, m) for m in MODELS}
    write_json(out.with_suffix(".json"), figures)
    out.with_suffix(".md").write_text(page(figures, scores, classical, protocol, runs))
    _track(base, figures, classical, out)
    print(f"wpcrack generalise --table: {', '.join(runs)} -> {out.with_suffix('.md')}")
    return figures


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def page(figures: dict, scores: dict, classical: dict, protocol: dict, runs: dict) -> str:
    """The Markdown page: every figure on it comes from the files ``table`` read."""
    lines = [
        "# Generalisation: the models as `wpcrack predict` runs them",
        "",
        "Generated by `dvc repro generalisation` (`wpcrack generalise MODEL`, then `--table`); do not edit.",
        "Crack IoU in percent on each test split, through predict's default path: the photo as it is, the",
        "scale chosen per photo by the model's own evidence (docs/operations.md, Scale). The evaluate",
        "protocol (photos squashed to the training rows' square size first: the paper's) is in brackets",
        "where it exists. DeepCrack is scored at 256x256, the others at their own size, counts summed over",
        "the split. A model on another dataset's photos is the case of a road team's own camera.",
        "",
        "| model \\ test split | " + " | ".join(SPLITS) + " |",
        "| --- | " + " | ".join("---:" for _ in SPLITS) + " |",
    ]
    for m in MODELS:
        cells = []
        for s in SPLITS:
            cell = _cell(figures["matrix"][m][s])
            own = (protocol.get(m) or {}).get(s)
            cells.append(cell + (f" ({own:.1f})" if own is not None and cell != "–" else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| classical threshold (evaluate protocol) | " + " | ".join(_cell(classical[s]) for s in SPLITS) + " |")
    lines += ["", "## DeepCrack's test photos enlarged (the DeepCrack model, predict's defaults)", "",
              "| enlargement | " + " | ".join(f"{f}x" for f in figures["scale"]) + " |",
              "| --- | " + " | ".join("---:" for _ in figures["scale"]) + " |",
              "| IoU | " + " | ".join(_cell(v) for v in figures["scale"].values()) + " |"]
    if "deepcrack" in scores:
        enlarged = scores["deepcrack"]["enlarged"]
        lines.append("| median scale chosen | " + " | ".join(f"{v['scale_median']:.3g}" for v in enlarged.values()) + " |")
    lines += ["", "## How each model chose its scales, and what scoring cost", "",
              "| model | split | images | precision | recall | IoU | scale median (min-max) | s/photo |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for m, per in scores.items():
        for s in SPLITS:
            v = per[s]
            lines.append(f"| {m} | {s} | {v['images']} | {v['precision']:.1f} | {v['recall']:.1f} | {v['iou']:.1f} | "
                         f"{v['scale_median']:.3g} ({v['scale_min']:.3g}-{v['scale_max']:.3g}) | "
                         f"{v['seconds_per_image']:.2f} |")
    minutes = figures["train_minutes"]["roads"]
    lines += ["", f"The `roads` model (DeepCrack + CFD + CRACK500 training splits, image labels only) trained in "
              f"{_cell(minutes)} min." if minutes is not None else "The `roads` model is not trained yet.",
              "", "Scored with: " + ", ".join(f"{m} {r['minutes']:.1f} min" + (f" (first {r['limit']} photos per split)"
                                                                                  if r["limit"] else "")
                                            for m, r in runs.items()) + ".", ""]
    return "\n".join(lines)


def _track(cfg: Config, figures: dict, classical: dict, out: Path) -> None:
    try:
        from wpcrack.tracking.runs import start_run
    except ImportError:
        return
    flat = {f"matrix/{m}/{s}": v for m, row in figures["matrix"].items() for s, v in row.items() if v is not None}
    flat.update({f"scale/{f}x": v for f, v in figures["scale"].items() if v is not None})
    flat.update({f"classical/{s}": v for s, v in classical.items() if v is not None})
    if figures["train_minutes"]["roads"] is not None:
        flat["train_minutes/roads"] = figures["train_minutes"]["roads"]
    with start_run(cfg, stage="generalisation") as tracker:
        tracker.log_params({"predict": vars(cfg.predict)})
        tracker.log_metrics(flat)
        for suffix in (".json", ".md"):
            tracker.log_artifact(out.with_suffix(suffix), artifact_path="generalisation")
