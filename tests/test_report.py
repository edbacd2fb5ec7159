"""Results pages from metrics files: per-dataset pages with the diagnosis chain, and the index of their rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from wpcrack.config import load_config
from wpcrack.evaluate import report
from wpcrack.evaluate.tables import Results
from wpcrack.train.checkpoint import config_fingerprint

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _metrics(root: Path, variant: str, config_sha256: str | None = None, **modes: float) -> None:
    """A metrics file as evaluate writes it; the model's config fingerprint is the current params.yaml's
    for the run unless ``config_sha256`` says otherwise."""
    path = root / "results" / "deepcrack" / variant / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {mode: {"precision": 1.0, "recall": 2.0, "accuracy": 3.0, "f1": 4.0, "iou": iou}
               for mode, iou in modes.items()}
    if variant != "classical":
        current = config_fingerprint(load_config(PARAMS, dataset="deepcrack", variant=variant).to_dict())
        metrics["model"] = {"config_sha256": config_sha256 or current}
    path.write_text(json.dumps(metrics))


def _project(root: Path) -> Path:
    _metrics(root, "full", detector=45.0, detector_ungated=45.0, detector_gated=44.0, cam=9.0, cam_crf=11.0)
    _metrics(root, "classical", classical=38.0)
    _metrics(root, "supervised", detector=50.0)
    model = root / "models" / "deepcrack" / "full"
    model.mkdir(parents=True)
    (model / "config.yaml").write_text(yaml.safe_dump({"profile": "cpu", "model": {"backbone": "mobilenet_v2"}}))
    (model / "train_metrics.json").write_text(json.dumps({
        "train_seconds": 1200.0, "hardware": "CPU, 2 cores", "pseudo_label_iou": 0.2,
        "final": {"pseudo_label_kept": 0.75}, "best": {"epoch": 6, "val_diag_pseudo_iou": 0.25}}))
    tuning = root / "reports" / "deepcrack" / "crf_tuning.csv"
    tuning.parent.mkdir(parents=True)
    pd.DataFrame({"setting": ["CAM > 0.5 (no CRF)", "bg_power 1", "current params.yaml"],
                  "IoU": [0.4, 0.3, 0.1]}).to_csv(tuning, index=False)
    params = yaml.safe_load(PARAMS.read_text())
    params["paths"] = {k: str(root / k) for k in ("data", "models", "results", "reports")}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def test_diagnosis_rows_follow_the_chain(tmp_path):
    _project(tmp_path)
    rows = report.diagnosis_rows(Results(tmp_path / "results", "deepcrack"), tmp_path / "models", tmp_path / "reports")
    iou = [r["iou"] for r in rows]
    assert iou == [9.0, 20.0, 25.0, 11.0, 30.0, 38.0, 45.0, 45.0, 44.0, 50.0]  # fractions become percent
    assert rows[1]["note"] == "75 % kept" and rows[2]["note"] == "epoch 6"
    # the best CRF row skips the plain CAM threshold and names the current setting's IoU
    assert rows[4]["note"].startswith("bg_power 1 (current setting: 10.0; label IoU only")


def test_diagnosis_reading_is_computed():
    rows = [{"step": "detector trained on the pseudo labels (WP-CrackNet)", "iou": 45.0},
            {"step": "the same detector trained on pixel masks (upper bound)", "iou": 50.0}]
    text = report.diagnosis_reading(rows, 60.0)
    assert text.startswith("The target (60) is missed by 15.0 points.")
    assert "(50.0 < 60)" in text and "reaches 90 % of the IoU" in text and "is met" not in text
    assert report.diagnosis_reading(rows, 40.0).startswith("The target (40) is met.")
    labels = {"step": "pseudo labels", "iou": 30.0}
    assert "above the pseudo labels made of its CAMs (45.0 vs 30.0)" in report.diagnosis_reading([*rows, labels], 60.0)
    classical = {"step": report.CLASSICAL_STEP, "iou": 42.0}
    assert "+3.0 points from the classical baseline (the bar is +5)" in report.diagnosis_reading([*rows, classical], 60.0)
    assert "detector is the lever" in report.diagnosis_reading([*rows, {**labels, "iou": 50.0}], 60.0)
    assert report.diagnosis_reading([], None) == ""


def test_dataset_page_and_index(tmp_path):
    params = _project(tmp_path)
    generalise = tmp_path / "results" / "deepcrack" / "full" / "generalise.json"
    generalise.write_text(json.dumps({"scores": {"deepcrack": {"iou": 41.5}, "cfd": {"iou": 9.0}}}))
    pages = tmp_path / "docs" / "results"
    page = report.write_dataset_report(params, "deepcrack", pages).read_text()
    # beside the paper protocol's IoU, the same photos through predict's default path
    row = ("| deepcrack | 1.000 | 2.000 | 3.000 | 4.000 | 45.000 | 41.500 | 69.148 | 38.000 | 70.000 | no | cpu | "
           "mobilenet_v2 | 20.000 |")
    assert row in page
    assert "## Where the IoU is lost" in page and "| pseudo labels, selected epoch | val | 25.000 | epoch 6 |" in page
    assert "_missing: `" in page  # no ablation/comparison/benchmark files here: said, not invented
    assert json.loads((pages / "deepcrack.json").read_text())["iou"] == 45.0

    (pages / "archive").mkdir()
    (pages / "archive" / "2026-12-01.md").write_text("# Results\n")
    index = report.write_index(pages, tmp_path / "docs" / "results.md").read_text()
    summary = index.split("## Per-dataset pages")[0]
    assert row in summary  # the page's row, read back from its JSON
    assert "| cfd | – | – | – | – | – | – | 38.184 | – | – | no page yet |" in summary  # missing, with the paper's IoU
    assert "No generalisation page yet (`dvc repro generalisation`" in index
    (pages / "generalisation.md").write_text("# Generalisation\n")
    index = report.write_index(pages, tmp_path / "docs" / "results.md").read_text()
    assert "[generalisation](results/generalisation.md)" in index
    assert "No adaptation page yet" in index
    (pages / "adaptation.md").write_text("# Adaptation\n")
    (pages / "adaptation-scratch.md").write_text("# Adaptation\n")
    index = report.write_index(pages, tmp_path / "docs" / "results.md").read_text()
    assert "[adaptation](results/adaptation.md); scratch: [adaptation-scratch](results/adaptation-scratch.md)." in index
    assert "- [deepcrack](results/deepcrack.md)" in index and "dvc repro report@crack500" in index
    assert "- [2026-12-01](results/archive/2026-12-01.md)" in index
    assert "No survey benchmark yet" in index
    survey = tmp_path / "reports" / "benchmark" / "survey.json"
    survey.parent.mkdir(parents=True)
    survey.write_text(json.dumps({"photos": 1000, "predict_photos_per_s": 1.2, "flow_photos_per_s": {"1": 1.1, "2": 1.8},
                                  "resume": {"processed_twice": 0, "missing": 0}, "peak_worker_mb": 1700.4}))
    index = report.write_index(pages, tmp_path / "docs" / "results.md", survey).read_text()
    assert ("1.10 at 1 worker, 1.80 at 2 workers photos/s (1.50x predict at 2); a run killed halfway and restarted "
            "did 0 photos twice and missed 0; peak 1700 MB per worker: [survey benchmark](../reports/benchmark/survey.md)"
            ) in index


def test_report_cli_writes_only_the_pages_asked_for(tmp_path, capsys):
    from wpcrack.cli import main

    params = _project(tmp_path)
    pages, index = tmp_path / "pages", tmp_path / "results.md"
    assert main(["report", "deepcrack", "--params", str(params), "--pages", str(pages), "--out", str(index)]) == 0
    assert sorted(p.name for p in pages.iterdir()) == ["deepcrack.json", "deepcrack.md"] and not index.exists()
    assert main(["report", "--index", "--params", str(params), "--pages", str(pages), "--out", str(index)]) == 0
    assert index.is_file() and not (pages / "cfd.md").exists()
    assert main(["report", "synthetic", "--params", str(params), "--pages", str(pages)]) == 2
    assert "no results page for dataset 'synthetic'" in capsys.readouterr().err


def test_a_model_trained_with_another_configuration_is_left_out_and_named(tmp_path):
    """Pages regenerated across sittings: metrics of a model whose config is not params.yaml's now
    read as not evaluated, and the page says which runs wait for a retrain."""
    params = _project(tmp_path)
    _metrics(tmp_path, "supervised", config_sha256="0" * 64, detector=50.0)
    results = Results(tmp_path / "results", "deepcrack", params)
    assert results.get("full")["detector"]["iou"] == 45.0
    assert results.get("supervised") is None and results.get("classical")["classical"]["iou"] == 38.0
    assert results.stale == ["supervised"]
    page = report.write_dataset_report(params, "deepcrack", tmp_path / "pages").read_text()
    assert "not yet retrained with the current params.yaml" in page and "`deepcrack-supervised`" in page
    upper = next(r for r in report.diagnosis_rows(results, tmp_path / "models", tmp_path / "reports")
                 if r["step"] == report.UPPER_BOUND_STEP)
    assert upper["iou"] is None


def test_results_resolve_params_once_per_variant(tmp_path, monkeypatch):
    """A page asks for `full` several times (both tables, the diagnosis): params.yaml is resolved once."""
    from wpcrack.evaluate import tables

    params = _project(tmp_path)
    calls = []
    real = tables.load_config
    monkeypatch.setattr(tables, "load_config", lambda *a, **k: calls.append(k["variant"]) or real(*a, **k))
    results = Results(tmp_path / "results", "deepcrack", params)
    first = results.get("full")
    assert results.get("full") == first and first["detector"]["iou"] == 45.0
    results.get("supervised")
    assert calls == ["full", "supervised"]
