"""The survey flow: photos of a folder or manifest through a tiny model on a real LocalCluster (prefect-dask),
resumed after a kill, bad files recorded, and the Parquet table, GeoJSON and summary it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from wpcrack.config import dump_config, load_config
from wpcrack.deploy import survey
from wpcrack.errors import DataError
from wpcrack.models.wpcracknet import build_model

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
TINY = ["model.backbone=tiny", "model.pretrained=false", "model.cam_channels=16", "model.paam_channels=16",
        "model.paam_reduction=4", "model.detector_channels=8", "model.decoder_channels=8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    cfg = load_config(PARAMS, dataset="synthetic", overrides=TINY)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "best.pt")
    dump_config(cfg, folder / "config.yaml")
    return folder


def _photo(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bgr = rng.integers(100, 170, size=(h, w, 3), dtype=np.uint8)
    cv2.line(bgr, (0, h // 3), (w - 1, h // 2), (25, 25, 25), 3)
    return bgr


def _gps_jpeg(path: Path, lat: float, lon: float) -> None:
    """A JPEG with EXIF capture time and GPS, as a survey camera writes it."""
    from PIL import Image

    def dms(value: float) -> tuple:
        value = abs(value)
        d, m = int(value), int(value * 60 % 60)
        return (float(d), float(m), round((value * 3600) % 60, 4))

    img = Image.fromarray(cv2.cvtColor(_photo(9), cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2026:05:14 09:31:02"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)})
    img.save(path, exif=exif)


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "season"
    (folder / "day2").mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(folder / f"p{i}.png"), _photo(i))
    cv2.imwrite(str(folder / "day2" / "p0.png"), _photo(10))  # the same name in another folder
    _gps_jpeg(folder / "day2" / "located.jpg", -33.8688, 151.2093)
    (folder / "day2" / "broken.jpg").write_bytes(b"not a photo, a text file renamed" * 10)
    whole = cv2.imencode(".jpg", _photo(11))[1].tobytes()
    (folder / "torn.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def test_photos_come_from_a_folder_or_a_manifest_and_bad_sources_are_named(photos, tmp_path):
    listed = survey.list_photos(photos)
    assert len(listed) == 9 and listed == sorted(listed)
    assert len({survey.photo_key(p) for p in listed}) == 9  # p0.png twice, two keys
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nseason/p1.png\nseason/missing.png\n")
    assert [p.name for p in survey.list_photos(manifest)] == ["p1.png", "missing.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no photos"):
        survey.list_photos(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere: survey folder or manifest not found"):
        survey.list_photos(tmp_path / "nowhere")
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(DataError, match="needs a column named path"):
        survey.list_photos(tmp_path / "bad.csv")


def test_exif_time_and_gps_are_read(photos):
    taken, lat, lon = survey.read_exif(photos / "day2" / "located.jpg")
    assert taken == "2026-05-14T09:31:02"
    assert lat == pytest.approx(-33.8688, abs=1e-4) and lon == pytest.approx(151.2093, abs=1e-4)
    assert survey.read_exif(photos / "p1.png") == (None, None, None)


def test_a_photo_is_predicted_once_per_model_and_settings(photos, model_dir, tmp_path):
    model = survey.load_survey_model(str(model_dir), "synthetic", str(PARAMS), None, 1)
    out = tmp_path / "out"
    row = survey.process_photo(photos / "p1.png", model, out)
    assert row["error"] is None and not row["skipped"] and row["engine"] == "torch"
    assert (out / row["mask"]).is_file() and (out / row["overlay"]).is_file() and row["scale"] > 0
    mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_GRAYSCALE)
    assert row["crack_share"] == pytest.approx((mask > 0).mean())
    again = survey.process_photo(photos / "p1.png", model, out)
    assert again["skipped"] and again["sha256"] == row["sha256"]
    other = survey.process_photo(photos / "p1.png", model, out, settings="other-settings")
    assert not other["skipped"]  # other settings: made again
    torn = survey.process_photo(photos / "torn.jpg", model, out)
    assert torn["error"] == "truncated file (incomplete copy or upload?)" and torn["sha256"] is None
    huge = survey.process_photo(photos / "p2.png", model, out, max_pixels=1000)
    assert "more than the 0.001 MP" in huge["error"]


def test_each_model_version_is_exported_once_and_placed_in_every_survey(model_dir, tmp_path, monkeypatch):
    from wpcrack.deploy import export
    from wpcrack.deploy.detection import classifier_path, load_onnx

    monkeypatch.setenv("WPCRACK_ONNX_CACHE", str(tmp_path / "cache"))
    model = survey.load_survey_model(str(model_dir), "synthetic", str(PARAMS), None, 1)
    first = survey.ensure_onnx(model.chooser, model.cfg, tmp_path / "a" / ".model", "digest")
    assert first == tmp_path / "a" / ".model" / "digest.onnx" and classifier_path(first).is_file()
    assert (tmp_path / "cache" / "digest.onnx").stat().st_ino == first.stat().st_ino  # a link, not a copy

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_onnx", no_export)
    second = survey.ensure_onnx(model.chooser, model.cfg, tmp_path / "b" / ".model", "digest")
    assert second.read_bytes() == first.read_bytes() and classifier_path(second).is_file()
    detector, _ = load_onnx(second)
    assert detector.cls_head is not None
    assert survey.ensure_onnx(model.chooser, model.cfg, tmp_path / "c", "other") is None  # cannot export: torch

    from wpcrack.deploy import predict

    monkeypatch.setattr(predict, "load_detector", lambda *a: (_ for _ in ()).throw(AssertionError("torch loaded")))
    worker = survey.load_survey_model(str(model_dir), "synthetic", str(PARAMS), second, 1, "md5:digest", model.cfg)
    assert worker.engine == "onnxruntime" and worker.chooser is worker.detector and worker.cfg == model.cfg


def test_shards_put_the_largest_photos_first_and_shrink_to_single_photos_at_the_end(tmp_path):
    from pipelines.survey import shards

    paths = []
    for i in range(40):
        paths.append(tmp_path / f"p{i:02d}.jpg")
        paths[-1].write_bytes(b"x" * (1000 if i % 10 == 3 else 10 + i))
    parts = shards(paths, 8, 2)
    assert sorted(p for part in parts for p in part) == sorted(map(str, paths))  # each photo once
    assert parts[0][:4] == [str(tmp_path / f"p{i:02d}.jpg") for i in (3, 13, 23, 33)]  # the large ones first
    sizes = [len(part) for part in parts]
    assert sizes[0] == 8 and sizes == sorted(sizes, reverse=True) and sizes[-4:] == [1, 1, 1, 1]


def _run_flow(photos: Path, out: Path, model_dir: Path, env: dict, workers: int = 1, extra: tuple = ()):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.survey", "run", str(photos), "--out", str(out), "--model", str(model_dir),
         "--dataset", "synthetic", "--workers", str(workers), "--shard-size", "2", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.prefect_server
def test_flow_on_a_local_cluster_writes_the_table_map_and_summary_and_resumes(photos, model_dir, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "WPCRACK_ONNX_CACHE": str(tmp_path / "onnx")}
    out = tmp_path / "out"
    first = _run_flow(photos, out, model_dir, env, workers=2)
    assert first.returncode == 0, first.stderr[-3000:]
    logs = first.stdout + first.stderr
    assert logs.count("Starting temporary server") == 1 and "Error logging to API" not in logs  # the workers use it too
    frame = pd.read_parquet(out / "survey.parquet")
    assert len(frame) == 9 and frame["path"].is_unique
    errors = dict(zip(frame["path"].map(lambda p: Path(p).name), frame["error"], strict=True))
    assert "truncated" in errors["torn.jpg"] and "cannot be decoded" in errors["broken.jpg"]
    ok = frame[frame["error"].isna()]
    assert len(ok) == 7 and ok["sha256"].str.len().eq(64).all() and set(ok["engine"]) == {"onnxruntime"}
    assert ok["crack_share"].between(0, 1).all() and (ok["scale"] > 0).all()
    located = json.loads((out / "survey.geojson").read_text())["features"]
    assert [f["geometry"]["coordinates"] for f in located] == [pytest.approx([151.2093, -33.8688], abs=1e-4)]
    assert located[0]["properties"]["path"].endswith("located.jpg")
    assert "# Survey: 9 photos" in (out / "summary.md").read_text() and (out / "summary.png").is_file()
    exported = {p.name: p.stat().st_mtime_ns for p in (out / ".model").glob("*.onnx")}
    assert len(exported) == 2 and len([n for n in exported if n.endswith(".classifier.onnx")]) == 1  # detector + classifier

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}
    (out / "rows" / f"{survey.photo_key(photos / 'p3.png')}.json").unlink()  # as if killed before p3 was done
    second = _run_flow(photos, out, model_dir, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "8 done by an earlier run, 1 to predict" in second.stdout + second.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}
    changed = [name for name in after if after[name] != stamps.get(name)]
    assert changed == [f"{survey.photo_key(photos / 'p3.png')}.json"]  # nothing done twice, nothing missing
    assert len(pd.read_parquet(out / "survey.parquet")) == 9
    assert {p.name: p.stat().st_mtime_ns for p in (out / ".model").glob("*.onnx")} == exported  # exported once

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["wpcrack"], filter_string="tags.stage = 'survey'")
    assert len(runs) == 2 and sorted(runs["metrics.processed"]) == [1.0, 9.0]
    first_run = runs[runs["metrics.processed"] == 9.0].iloc[0]
    assert 1 <= first_run["metrics.model_loads"] <= 2  # once per worker, not once per shard (5 shards)


def test_flow_refuses_bad_arguments(tmp_path):
    from pipelines.survey import main

    assert main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert main(["run", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
