"""MLflow tracking in a temporary sqlite store: tags, params, metrics, the pyfunc model, the champion."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from wpcrack.tracking import runs as tracking
from wpcrack.config import load_config
from wpcrack.models.wpcracknet import build_model
from wpcrack.deploy.serving import decode_image, encode_png

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["model.backbone=mobilenet_v2", "model.pretrained=false", "model.cam_channels=16", "model.paam_channels=16",
        "model.paam_reduction=4", "model.detector_channels=8", "model.decoder_channels=8",
        "evaluate.tile_size=64", "evaluate.tile_overlap=8"]
NAME = "wpcrack-synthetic"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite tracking store for this module (the environment variable wins over the default)."""
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.TRACKING_URI_ENV, f"sqlite:///{folder / 'mlflow.db'}")
        mp.setenv("DVC_STAGE", "train@synthetic")
        yield folder


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """No prepared data under ``paths.data``: the crack width cannot be measured before logging."""
    return load_config(PARAMS, dataset="synthetic", overrides=[*TINY, f"paths.data={tmp_path_factory.mktemp('data')}"])


@pytest.fixture(scope="module")
def logged(store, cfg):
    """One training-like run that logs params, metrics, an artifact and the detector (without its crack
    width: ``cfg`` has no prepared data); also what it said on stderr."""
    torch.manual_seed(0)
    model = build_model(cfg)
    example = np.full((40, 48, 3), 128, np.uint8)
    (store / "history.csv").write_text("epoch,loss\n1,0.5\n")
    with tracking.start_run(cfg, stage="train@synthetic") as tracker:
        tracker.log_params(cfg.to_dict())
        for epoch in (1, 2):
            tracker.log_metrics({"loss/cls": 1.0 / epoch}, step=epoch)
        tracker.log_artifact(store / "history.csv", artifact_path="curves")
        with contextlib.redirect_stderr(io.StringIO()) as err:
            version = tracker.log_detector(model.slim(), example)
    return tracker.run_id, version, model.slim(), err.getvalue()


def test_run_has_tags_params_metrics_and_artifacts(logged, cfg, store):
    run_id, version, _, _ = logged
    run = tracking.client().get_run(run_id)
    tags = run.data.tags
    assert tags["dataset"] == "synthetic" and tags["variant"] == "full" and tags["profile"] == cfg.profile
    assert tags["stage"] == "train@synthetic" and tags["dvc_stage"] == "train@synthetic"
    assert tags["git_commit"] and tags["registered_model"] == NAME and tags["model_version"] == str(version)
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    assert run.data.params["model.backbone"] == "mobilenet_v2"
    history = tracking.client().get_metric_history(run_id, "loss/cls")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert [a.path for a in tracking.client().list_artifacts(run_id, "curves")] == ["curves/history.csv"]
    assert run.info.status == "FINISHED"
    assert (store / "mlartifacts").is_dir()  # artifacts beside the sqlite database


def test_failed_block_marks_the_run_failed(store, cfg):
    with pytest.raises(RuntimeError), tracking.start_run(cfg, stage="evaluate@synthetic") as tracker:
        raise RuntimeError("boom")
    assert tracking.client().get_run(tracker.run_id).info.status == "FAILED"


def test_detector_is_a_registered_pyfunc_that_returns_masks(logged):
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id, version, slim, _ = logged
    mv = tracking.client().get_model_version(NAME, str(version))
    assert mv.run_id == run_id and mv.tags["variant"] == "full" and mv.tags["stage"] == "train@synthetic"
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image"] and sig.outputs.input_names() == ["mask", "crack_share", "scale"]
    assert {p.name for p in sig.params} == {"threshold", "gate", "scale"}
    rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", rgb)
    frame = pd.DataFrame({"image": [encode_png(rgb), base64.b64encode(jpeg.tobytes()).decode()]})
    out = model.predict(frame, params={"threshold": 0.0, "gate": 0.0})
    mask = decode_image(out["mask"][0])
    assert mask.shape[:2] == (40, 56) and list(out["crack_share"]) == [1.0, 1.0]  # threshold 0: all crack
    assert list(model.predict(frame[:1], params={"threshold": 1.0})["crack_share"]) == [0.0]
    assert out["scale"].between(0.01, 2.0).all()  # no scale given: chosen per image, as predict does
    assert list(model.predict(frame[:1], params={"scale": 0.5})["scale"]) == [0.5]
    with pytest.raises(MlflowException, match="--scale"):
        model.predict(frame[:1], params={"scale": 50.0})


def test_pyfunc_rejects_what_is_not_an_image(logged):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{logged[1]}")
    with pytest.raises(MlflowException, match="row 0"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"hello").decode()]}))


def _new_version(logged, variant: str = "full") -> str:
    """Another registered version of the same logged model (cheap: no new artifacts)."""
    c = tracking.client()
    first = c.get_model_version(NAME, str(logged[1]))
    mv = c.create_model_version(NAME, first.source, run_id=first.run_id,
                                tags={"dataset": "synthetic", "variant": variant})
    return mv.version


def test_the_gate_moves_the_champion_only_to_a_not_worse_model(logged, cfg):
    from wpcrack.tracking.gate import judge

    first = str(logged[1])
    assert judge(cfg, NAME, first, 40.0)["decision"] == "promoted"
    worse = _new_version(logged)
    decision = judge(cfg, NAME, worse, 39.5)
    assert decision["decision"] == "kept_champion" and decision["champion_iou"] == 40.0
    assert int(tracking.champion_version(NAME).version) == int(first)
    mv = tracking.client().get_model_version(NAME, worse)  # still registered, loadable, and says why
    assert mv.tags["gate_decision"] == "kept_champion" and "39.50 vs 40.00 (-0.50): worse" in mv.tags["gate_reasons"]
    equal = _new_version(logged)
    assert judge(cfg, NAME, equal, 40.0)["promoted"]
    assert int(tracking.champion_version(NAME).version) == int(equal)
    assert tracking.version_score(NAME, worse) == 39.5  # recorded even when not promoted


def test_the_gate_weighs_field_sets_measured_once_per_version(logged, cfg, tmp_path, monkeypatch):
    import dataclasses
    import json

    from test_field import _set
    from wpcrack.data.field import field_digest, field_photos
    from wpcrack.evaluate import generalise
    from wpcrack.tracking import gate

    _set(tmp_path, n=2, name="town")
    with_field = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, data=str(tmp_path)),
                                     field=dataclasses.replace(cfg.field, sets=("town",)))
    digest = field_digest(field_photos(tmp_path, "town"))
    champion = str(_new_version(logged))
    tracking.record_score(NAME, champion, 80.0)
    tracking.client().set_registered_model_alias(NAME, tracking.CHAMPION, champion)
    challenger = str(_new_version(logged))
    measured = {"town": {"iou": 99.0, "digest": digest}}  # wpcrack field's figures on the challenger's weights
    decision = gate.judge(with_field, NAME, challenger, 79.5, promote=False, measured=measured)
    assert decision["decision"] == "passed_gate"  # -0.5 on the benchmark, a large gain on the town
    assert decision["challenger_field"] == {"town": 99.0}
    town = decision["champion_field"]["town"]  # the champion was scored on the set through predict's path
    assert 0.0 <= town < 99.0
    assert str(tracking.champion_version(NAME).version) == champion  # promote=False: the alias stays
    tags = tracking.client().get_model_version(NAME, champion).tags
    assert tags["field/town/md5"] == digest and float(tags["field/town/iou"]) == town
    monkeypatch.setattr(generalise, "score_files", lambda *a, **k: pytest.fail("scored twice"))
    assert gate.field_scores(with_field, NAME, champion) == {"town": town}  # read back from the tags
    lost = {"town": {"iou": town - 1.5, "digest": digest}}
    later = str(_new_version(logged))
    kept = gate.judge(with_field, NAME, later, 90.0, measured=lost)  # +10 on the benchmark, -1.5 on the town
    assert kept["decision"] == "kept_champion" and "loses more than 1" in kept["reasons"][0]
    run_id = gate.record(with_field, kept, "promote@synthetic", tags={"data_version": 3})
    run = tracking.client().get_run(run_id)
    assert run.data.tags["decision"] == "kept_champion" and run.data.tags["data_version"] == "3"
    assert run.data.metrics["challenger_field/town"] == pytest.approx(town - 1.5)
    assert tracking.client().get_model_version(NAME, later).tags["data_version"] == "3"
    assert json.loads(json.dumps(kept))  # what the flows return and print


def test_promote_champion_uses_the_evaluate_run_of_a_version(logged, cfg):
    from wpcrack.tracking.gate import promote_champion

    version = _new_version(logged)
    with tracking.start_run(cfg, stage="evaluate@synthetic") as tracker:
        tracker.log_metrics({"detector/iou": 97.5})
    decision = promote_champion(cfg, version)
    assert decision["promoted"] and decision["challenger_iou"] == 97.5
    assert int(tracking.champion_version(NAME).version) == int(version)
    assert promote_champion(cfg)["challenger_iou"] == 97.5  # best evaluated version


def test_promote_cli_keeps_a_better_champion_and_forces_a_rollback(logged, capsys):
    from wpcrack.cli import main

    champion = str(_new_version(logged))  # its own champion: the test does not lean on the tests before it
    tracking.record_score(NAME, champion, 97.5)
    tracking.client().set_registered_model_alias(NAME, tracking.CHAMPION, champion)
    weaker = str(_new_version(logged))
    tracking.record_score(NAME, weaker, 10.0)
    sets = [arg for o in TINY for arg in ("--set", o)]
    assert main(["promote", "synthetic", "--version", weaker, *sets]) == 0
    assert "benchmark 10.00 vs 97.50 (-87.50): worse (no field sets) -> kept_champion" in capsys.readouterr().out
    assert str(tracking.champion_version(NAME).version) == champion
    assert main(["promote", "synthetic", "--force", *sets]) == 2  # --force needs --version
    assert "--force needs --version" in capsys.readouterr().err
    assert main(["promote", "synthetic", "--version", weaker, "--force", *sets]) == 0
    assert str(tracking.champion_version(NAME).version) == weaker
    tracking.client().set_registered_model_alias(NAME, tracking.CHAMPION, champion)


def test_search_runs_filters_by_tags(logged):
    runs = tracking.search_runs(dataset="synthetic", stage="train@synthetic")
    assert logged[0] in set(runs["run_id"])
    assert tracking.search_runs(dataset="cfd").empty
    assert tracking.latest_metrics(dataset="synthetic", stage="train@synthetic")["loss/cls"] == 0.5


def test_predict_loads_the_champion_from_mlflow(logged, tmp_path):
    from wpcrack.deploy.predict import predict

    tracking.client().set_registered_model_alias(NAME, tracking.CHAMPION, str(logged[1]))
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((50, 60, 3), 90, np.uint8))
    table = predict([image], model="champion", out_dir=tmp_path / "out", dataset="synthetic", params=PARAMS)
    assert table["error"].isna().all() and (tmp_path / "out" / "img_mask.png").is_file()


def test_default_store_is_sqlite_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.git_commit(tmp_path) == "unknown"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    assert len(tracking.git_commit(tmp_path)) == 40


def test_runs_log_the_prepared_manifest_with_its_dvc_hash(store, tmp_path):
    """The MLflow UI's Dataset column: the manifest, with the md5 that dvc.lock records for it."""
    import dataclasses
    import hashlib

    from wpcrack.config import Config, PathsConfig, PrepareConfig, SyntheticPrepare
    from wpcrack.data.prepare import prepare

    syn = SyntheticPrepare(size=32, train_crack=2, train_nocrack=2, val_crack=1, val_nocrack=1, test=1, seed=1)
    manifest = prepare(Config(paths=PathsConfig(data=str(tmp_path)), prepare=PrepareConfig(synthetic=syn)), "synthetic")
    cfg = load_config(PARAMS, dataset="synthetic", overrides=TINY)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, data=str(tmp_path)))
    runs = {}
    for stage in ("train@synthetic", "evaluate@synthetic", "compare@synthetic"):
        with tracking.start_run(cfg, stage=stage) as tracker:
            runs[stage] = tracking.client().get_run(tracker.run_id)
    runs = {stage: tracking.client().get_run(r.info.run_id) for stage, r in runs.items()}
    md5 = hashlib.md5(manifest.read_bytes()).hexdigest()
    for stage, context in (("train@synthetic", "training"), ("evaluate@synthetic", "evaluation")):
        (logged_input,) = runs[stage].inputs.dataset_inputs
        assert logged_input.dataset.name == "synthetic-prepared" and logged_input.dataset.digest == md5
        assert {t.key: t.value for t in logged_input.tags}["mlflow.data.context"] == context
    assert not runs["compare@synthetic"].inputs.dataset_inputs  # tables read metrics, not data


def test_the_served_model_carries_the_crack_width_measured_before_logging(logged, store, cfg, monkeypatch):
    import mlflow

    from wpcrack.deploy import calibrate
    from wpcrack.deploy.detection import CRACK_WIDTH_ATTR, training_crack_width, weights_digest

    assert "logged without its training crack width" in logged[3]  # paths.data holds no manifest
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/{logged[1]}").unwrap_python_model()
    assert training_crack_width(served.detector) is None

    torch.manual_seed(1)
    slim = build_model(cfg).slim()
    measured = {"crack_width_px": 6.5, "by_source": {"synthetic": {"median_px": 6.5, "rows": 3}},
                "width_weight": 0.75, "weights_md5": weights_digest(slim)}
    seen = []
    monkeypatch.setattr(calibrate, "measure", lambda c, d: seen.append((c, weights_digest(d))) or measured)
    with tracking.start_run(cfg, stage="train@synthetic") as tracker:
        version = tracker.log_detector(slim)
    assert seen == [(cfg, weights_digest(slim))]  # the run's own config and the weights being logged
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}").unwrap_python_model()
    assert training_crack_width(served.detector) == 6.5 and served.detector.training_width_weight == 0.75
    tags = tracking.client().get_model_version(NAME, str(version)).tags
    assert tags[CRACK_WIDTH_ATTR] == "6.5" and tags["training_width_weight"] == "0.75"


def test_a_calibrated_width_reaches_the_registered_model(logged, cfg):
    from wpcrack.tracking.runs import tag_crack_width
    from wpcrack.deploy.detection import training_crack_width, weights_digest
    from wpcrack.deploy.predict import load_registered

    _, version, slim, _ = logged
    assert tag_crack_width(cfg, {"crack_width_px": 4.5, "weights_md5": "not these weights"}) == []
    assert str(version) in tag_crack_width(cfg, {"crack_width_px": 4.5, "width_weight": 1.0,
                                                 "weights_md5": weights_digest(slim)})
    detector, _ = load_registered(f"models:/{NAME}/{version}")
    assert training_crack_width(detector) == 4.5 and detector.training_width_weight == 1.0
