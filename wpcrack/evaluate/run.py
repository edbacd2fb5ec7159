"""The evaluate stage: a trained model on its dataset's test split, once, with design.md's protocol.

Five modes are scored from one pass over the test set:

- ``detector``: the WP-CrackNet detector (the primary result; on CFD patch-gated, paper 4.1);
- ``detector_ungated`` / ``detector_gated``: the detector with every tile (CFD: every grid cell) kept,
  and with tiles skipped whose classifier crack probability is below ``GATE``, what
  ``wpcrack predict`` gives without and with ``--gate``; one of them equals ``detector``;
- ``cam``: the classifier's crack CAM > threshold (a WS-SCS-like baseline);
- ``cam_crf``: that CAM refined by denseCRF, i.e. the pseudo labels training makes.

Detector probabilities are quantised to 8 bits and written to ``predictions/``; the detector
metrics are computed from those 8-bit values, so ``wpcrack score`` on the folder reproduces them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from wpcrack.config import COMPOSITE_DATASETS, Config
from wpcrack.errors import DataError
from wpcrack.evaluate.figures import FigureRow, pick_rows, write_curves, write_figure
from wpcrack.evaluate.metrics import ConfusionAccumulator, align, format_table, summary_row
from wpcrack.evaluate.protocol import at_model_scale, eval_views, inference_size, score_size, source_config
from wpcrack.inference.loading import model_from_checkpoint, read_checkpoint
from wpcrack.inference.tiles import predict_image
from wpcrack.io import atomic_dir, atomic_path, read_image, read_mask, write_image, write_json

MODES = ("detector", "detector_ungated", "detector_gated", "cam", "cam_crf")
GATE = 0.5  # wpcrack predict --gate's default


def run_key(cfg: Config) -> str:
    """The DVC stage key of a run (params.yaml ``runs``): the dataset, or ``<dataset>-<variant>``."""
    return cfg.dataset if cfg.variant == "full" else f"{cfg.dataset}-{cfg.variant}"


def load_test_rows(cfg: Config) -> tuple[Path, list]:
    """(manifest folder, test rows) of ``data/prepared/<dataset>/manifest.csv``."""
    from wpcrack.data.manifest import load_manifest

    path = Path(cfg.paths.data) / "prepared" / cfg.dataset / "manifest.csv"
    manifest = load_manifest(path)
    rows = list(manifest[manifest["split"] == "test"].itertuples(index=False))
    if not rows:
        raise DataError(path, "has no test rows")
    stems = [Path(r.image).stem for r in rows]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise DataError(path, f"test images share file names, predictions would overwrite: {', '.join(clashes)}")
    return path.parent, rows


def quantize(prob: np.ndarray) -> np.ndarray:
    """Probabilities as the 8-bit PNG values that are written and scored."""
    return np.round(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


def protocol(cfg: Config) -> dict:
    """How the numbers were made, written beside them."""
    if cfg.dataset in COMPOSITE_DATASETS:
        return {
            "dataset": cfg.dataset, "variant": cfg.variant, "profile": cfg.profile, "threshold": cfg.evaluate.threshold,
            "sources": {s: protocol(source_config(cfg, s)) for s in cfg.prepare.roads.sources},
            "reduction": "pooled: TP/FP/FN/TN summed over every source's test pixels, each source scored by its "
                         "own protocol; by_source: each source's own sums",
        }
    size, seen = score_size(cfg), inference_size(cfg)
    return {
        "dataset": cfg.dataset,
        "variant": cfg.variant,
        "profile": cfg.profile,
        "threshold": cfg.evaluate.threshold,
        "eval_size": f"{size}x{size} (ground truth nearest-neighbour)" if size else "native",
        "inference_size": f"{seen}x{seen} (the training rows' scale)" if seen else "native",
        "reduction": "dataset: TP/FP/FN/TN summed over all pixels of the test set",
        "inference": (
            f"patch-gated {cfg.prepare.cfd.grid}x{cfg.prepare.cfd.grid} grid" if cfg.dataset == "cfd"
            else f"tiled above {cfg.evaluate.tile_size} px, overlap {cfg.evaluate.tile_overlap}"
        ),
        "extras": "extra_* keys are not the paper's metrics: 2-class mIoU, ODS/OIS F1, per-image means",
    }


def trained_config_sha256(ckpt: dict) -> str | None:
    """The training-config fingerprint of a checkpoint (from its own config): the compare and report
    stages count the model's metrics only while params.yaml resolves to the same."""
    from wpcrack.train.checkpoint import config_fingerprint

    saved = ckpt.get("config")
    return config_fingerprint(saved) if saved else None


def evaluate(cfg: Config, model_dir: Path, out_dir: Path) -> dict:
    """Score the model in ``model_dir`` on the test split; write predictions, metrics, PR curve, figure."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint_path, ckpt = read_checkpoint(model_dir)
    model = model_from_checkpoint(checkpoint_path, ckpt, cfg, device)
    root, rows = load_test_rows(cfg)
    accs = {m: ConfusionAccumulator(cfg.evaluate.threshold, cfg.evaluate.pr_thresholds) for m in MODES}
    by_source: dict[str, ConfusionAccumulator] = {}
    shown = set(pick_rows(len(rows), cfg.evaluate.figure_images))
    figure_rows = []
    from wpcrack.deploy.detection import GatedDetector, weights_digest

    gated = GatedDetector(model.slim(), GATE)
    start = time.perf_counter()
    with atomic_dir(out_dir / "predictions") as pred_dir:
        for i, row in enumerate(rows):
            row_cfg = source_config(cfg, row.dataset)  # a composite run scores each source by its own protocol
            size = score_size(row_cfg)
            rgb = read_image(root / row.image)
            gt_full = read_mask(root / row.mask, shape=rgb.shape[:2])
            views = eval_views(model, rgb, row_cfg, label=int(row.label))
            prob8 = quantize(views.prob)
            write_image(pred_dir / f"{Path(row.image).stem}.png", prob8)
            prob, gt = align(prob8, gt_full, size)
            accs["detector"].add(prob, gt)
            by_source.setdefault(row.dataset, ConfusionAccumulator(cfg.evaluate.threshold, 2)).add(prob, gt)
            for mode, net in (("detector_ungated", model), ("detector_gated", gated)):
                _, alt = at_model_scale(rgb, row_cfg, lambda image, net=net: predict_image(net, image, row_cfg))
                accs[mode].add(*align(quantize(alt), gt_full, size))
            accs["cam"].add(views.cam, gt)
            accs["cam_crf"].add(views.pseudo.astype(np.float32), gt)
            if i in shown:
                figure_rows.append(FigureRow(Path(row.image).stem, views.rgb, gt, views.cam, views.pseudo, prob))
    seconds = time.perf_counter() - start

    metrics = {m: acc.summary() for m, acc in accs.items()}
    if len(by_source) > 1:  # pixels pooled over sources above; each source's own figures here
        metrics["by_source"] = {source: acc.summary() for source, acc in sorted(by_source.items())}
    metrics["protocol"] = protocol(cfg)
    metrics["model"] = {"weights_md5": weights_digest(model.slim()), "config_sha256": trained_config_sha256(ckpt)}
    metrics["gate"] = {"threshold": GATE, "tiles": gated.tiles, "skipped": gated.skipped}
    write_json(out_dir / "metrics.json", metrics)
    train = model_dir / "train_metrics.json"
    train_seconds = json.loads(train.read_text()).get("train_seconds") if train.is_file() else None
    write_json(out_dir / "summary.json", summary_row(metrics["detector"], train_seconds))
    _write_pr_curve(out_dir / "pr_curve.csv", accs["detector"])
    write_curves(out_dir / "curves.png", [{k: 100.0 * p[k] for k in ("recall", "precision")} for p in accs["detector"].pr_curve()],
                 model_dir / "history.csv", title=f"{cfg.dataset} / {cfg.variant} ({cfg.profile})")
    write_figure(out_dir / "figure.png", figure_rows, title=f"{cfg.dataset} / {cfg.variant} ({cfg.profile})")
    print(f"evaluate {run_key(cfg)}: {len(rows)} test images in {seconds:.1f} s; percent, counts summed over the set")
    print(format_table({m: metrics[m] for m in MODES}))
    _track(cfg, model_dir, out_dir, metrics, seconds / len(rows))
    return metrics


def _write_pr_curve(path: Path, acc: ConfusionAccumulator) -> None:
    """Dataset-reduced PR curve in percent (DVC plots: x recall, y precision)."""
    keys = ("threshold", "precision", "recall", "f1", "iou")
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for point in acc.pr_curve():
            writer.writerow([point["threshold"], *(100.0 * point[k] for k in keys[1:])])


def _track(cfg: Config, model_dir: Path, out_dir: Path, metrics: dict, seconds_per_image: float) -> None:
    """One MLflow run per evaluation (stage ``evaluate@<run key>``) when tracking is installed."""
    try:
        from wpcrack.tracking.runs import start_run
    except ImportError:
        return
    flat = {
        f"{mode}/{key}": float(value)
        for mode in MODES
        for key, value in metrics[mode].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    flat.update({f"{source}/{key}": float(value) for source, summary in metrics.get("by_source", {}).items()
                 for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
    flat["seconds_per_image"] = seconds_per_image
    with start_run(cfg, stage=f"evaluate@{run_key(cfg)}") as tracker:
        tracker.log_params({"evaluate": dataclasses.asdict(cfg.evaluate), "model_dir": str(model_dir)})
        tracker.log_metrics(flat)
        for name in ("metrics.json", "pr_curve.csv", "curves.png", "figure.png"):
            tracker.log_artifact(out_dir / name, artifact_path="evaluation")
