"""``wpcrack field``: a model on every field check set of params.yaml, through predict's default path.

The benchmark's test split says how a model does on the paper's photos; a field set says how it
does on the team's own roads, as `wpcrack predict` runs it (the photo at its own size, the scale
chosen per photo). The figures carry the weights' and each set's digest, so the promotion gate
(``wpcrack.tracking.gate``) reuses them only for the very model and files they were measured on. Every set is checked before any model is loaded, so a bad mask stops the run
with its name and never becomes a lower score.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from wpcrack.config import load_config
from wpcrack.data.field import field_digest, field_photos
from wpcrack.errors import DataError
from wpcrack.evaluate.generalise import score_files
from wpcrack.io import write_json


def field_path(results: str | Path, dataset: str, variant: str) -> Path:
    """Where a run's field scores live: beside its evaluate metrics."""
    return Path(results) / dataset / variant / "field.json"


def score_field(params: str | Path, dataset: str, variant: str = "full", model: str | None = None,
                out: Path | None = None, track: bool = True) -> dict:
    """Score ``model`` (default: the run's folder ``models/<dataset>/<variant>``; any model predict
    takes) on every set of ``field.sets``; write and return the figures (``{"model", "sets"}``)."""
    from wpcrack.deploy.predict import load_detector

    cfg = load_config(params, dataset=dataset, variant=variant)
    sets = {name: field_photos(cfg.paths.data, name) for name in cfg.field.sets}
    model = model or str(Path(cfg.paths.models) / dataset / variant)
    out = out or field_path(cfg.paths.results, dataset, variant)
    scores: dict[str, dict] = {}
    source, weights = model, None
    if sets:
        from wpcrack.deploy.detection import weights_digest

        if not Path(model).exists() and not model.startswith(("models:/", "runs:/", "champion")):
            raise DataError(model, f"no trained model; run `dvc repro train@{dataset}` first")
        detector, model_cfg, source = load_detector(model, dataset, params)
        weights = weights_digest(detector)
        scores = {name: {**score_files(detector, model_cfg, pairs), "digest": field_digest(pairs)}
                  for name, pairs in sets.items()}
    figures = {"model": source, "weights_md5": weights, "sets": scores}
    write_json(out, figures)
    if not sets:
        print("wpcrack field: no field sets in params.yaml (field.sets); nothing to score")
    for name, s in scores.items():
        print(f"wpcrack field {name}: IoU {s['iou']:.1f} (precision {s['precision']:.1f}, recall {s['recall']:.1f}) "
              f"on {s['images']} photos, median scale {s['scale_median']:.3g}")
    if track and scores:
        _track(cfg, figures, out)
    return figures


def _track(cfg, figures: dict, out: Path) -> None:
    from wpcrack.evaluate.run import run_key
    from wpcrack.tracking.runs import start_run

    with start_run(cfg, stage=f"field@{run_key(cfg)}") as tracker:
        tracker.log_params({"field": dataclasses.asdict(cfg.field), "predict": dataclasses.asdict(cfg.predict),
                            "model": figures["model"]})
        tracker.log_metrics({f"field/{name}/{key}": float(s[key]) for name, s in figures["sets"].items()
                             for key in ("iou", "precision", "recall", "f1")})
        tracker.log_artifact(out, artifact_path="field")
