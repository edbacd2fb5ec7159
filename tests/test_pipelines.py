"""Prefect flows end to end on synthetic batches, with DVC stages faked at the task boundary, and
once for real (the last test: ``dvc repro`` of the project's own stages, smoke profile).

One temporary Prefect server (``prefect_test_harness``) serves the whole module; MLflow writes to a
temporary sqlite store. Real DVC versions the incoming data; ``dvc repro`` is replaced by fakes
(or by a fake ``dvc`` executable on PATH, to see a failing stage fail the flow).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATASET = "synthetic"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """Prefect settings for tests (set before Prefect is imported), one temporary server, and the
    flow modules imported under those settings."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        mp.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=None):
            yield {name: importlib.import_module(f"pipelines.{name}")
                   for name in ("tasks", "retrain", "reproduce", "deploy")}


# --- a project and batches ------------------------------------------------------------------------


def _git_env() -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.fixture
def project(tmp_path, prefect_server) -> Path:
    """A git + DVC repository with params.yaml (its own registered-model prefix, so every test has its
    own champion in the shared store) and one raw image of the dataset."""
    root = tmp_path / "repo"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["model_name_prefix"] = f"t{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    params["retrain"]["incoming_scale"] = "square"  # FakeStages' best.pt is no model to choose a scale with
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=_git_env())
    (root / ".gitignore").write_text("/data/\n")
    raw = root / "data" / "raw" / DATASET
    raw.mkdir(parents=True)
    cv2.imwrite(str(raw / "known.png"), _photo(1000))
    return root


def _photo(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 170, size=(*size, 3), dtype=np.uint8)
    cv2.line(img, (0, int(rng.integers(0, size[0]))), (size[1] - 1, int(rng.integers(0, size[0]))), (30, 30, 30), 2)
    return img


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _encode(img: np.ndarray, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, img)[1].tobytes()


def _good_batch(folder: Path, seed: int, n: int = 2) -> Path:
    for i in range(n):
        _write(folder / "crack" / f"c{seed}_{i}.jpg", _encode(_photo(seed * 10 + i), ".jpg"))
        _write(folder / "no_crack" / f"n{seed}_{i}.png", _encode(_photo(seed * 10 + i + 5)))
    return folder


def _contents(*folders: Path) -> list[str]:
    """Sorted SHA-256 of every image file under the folders (reason files and reports excluded)."""
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in f.rglob("*")
                  if p.is_file() and not p.name.endswith((".reason.txt", ".csv")))


def _tree(root: Path, *names: str) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under (or at) ``names``."""
    out = {}
    for name in names:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def _model(root: Path) -> str:
    return f"{yaml.safe_load((root / 'params.yaml').read_text())['tracking']['model_name_prefix']}-{DATASET}"


class FakeStages:
    """Stands in for ``dvc repro``: prepare writes a fixed test split, train registers a model
    version, evaluate writes metrics.json with the next IoU of ``ious``."""

    def __init__(self, root: Path, ious: list[float]):
        self.root, self.ious, self.calls = root, list(ious), []
        self.name = _model(root)
        self.change_test_split = False
        self.evaluate_stale_model = False  # evaluate scores the previous version's weights
        self.field: list[float] = []  # field@: IoU on the field set "town" of each challenger, in order
        self.trained = None

    def __call__(self, targets, cwd=".", gpu=False):
        from wpcrack.tracking.runs import WEIGHTS_TAG, client

        (target,) = targets
        self.calls.append((target, gpu))
        stage, key = target.split("@")
        if stage == "prepare":
            prepared = self.root / "data" / "prepared" / key
            if self.change_test_split:
                cv2.imwrite(str(prepared / "images" / "t0.png"), _photo(8))
            if not (prepared / "manifest.csv").is_file():
                cv2.imwrite(str(_mkdir(prepared / "images") / "t0.png"), _photo(7))
                cv2.imwrite(str(_mkdir(prepared / "masks") / "t0.png"), np.zeros((96, 128), np.uint8))
                pd.DataFrame([{"image": "images/t0.png", "mask": "masks/t0.png", "label": 0, "split": "test",
                               "dataset": key, "source_id": "t0", "height": 96, "width": 128}]
                             ).to_csv(prepared / "manifest.csv", index=False)
        elif stage == "train":
            mlflow_client = client()
            if not mlflow_client.search_registered_models(f"name = '{self.name}'"):
                mlflow_client.create_registered_model(self.name)
            version = mlflow_client.create_model_version(self.name, str(self.root),
                                                         tags={"dataset": DATASET, "variant": "full"})
            mlflow_client.set_model_version_tag(self.name, version.version, WEIGHTS_TAG, f"digest v{version.version}")
            self.trained = version.version
            (_mkdir(self.root / "models" / DATASET / "full") / "best.pt").write_text(f"weights v{version.version}")
            (self.root / "dvc.lock").write_text(f"lock of v{version.version}\n")
        elif stage == "evaluate":
            out = _mkdir(self.root / "results" / DATASET / "full")
            evaluated = self.trained if not self.evaluate_stale_model else int(self.trained) - 1
            (out / "metrics.json").write_text(json.dumps({"detector": {"iou": self.ious.pop(0)},
                                                          "model": {"weights_md5": f"digest v{evaluated}"}}))
            if self.field:  # what `wpcrack field` writes beside the metrics, on the same weights
                from wpcrack.data.field import field_digest, field_photos

                digest = field_digest(field_photos(self.root / "data", "town"))
                (out / "field.json").write_text(json.dumps({"weights_md5": f"digest v{evaluated}", "sets": {
                    "town": {"iou": self.field.pop(0), "digest": digest}}}))
        return ""


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def fake_stages(project, prefect_server, monkeypatch):
    from prefect import task

    stages = FakeStages(project, [60.0, 55.0, 70.0])
    monkeypatch.setattr(prefect_server["retrain"], "dvc_repro", task(name="fake-dvc-repro")(stages))
    return stages


def _champion(root: Path) -> int | None:
    from wpcrack.tracking.runs import champion_version

    mv = champion_version(_model(root))
    return None if mv is None else int(mv.version)


def _decision_runs() -> pd.DataFrame:
    from wpcrack.tracking.runs import search_runs

    return search_runs(dataset=DATASET, stage=f"retrain@{DATASET}")


# --- retraining ---------------------------------------------------------------------------------


def test_good_batch_makes_a_data_version_a_model_and_an_mlflow_run(project, fake_stages, prefect_server, tmp_path):
    batch = _good_batch(tmp_path / "batch", seed=1)
    before = _contents(batch)
    result = prefect_server["retrain"].retrain(str(batch), dataset=DATASET, root=str(project))

    assert result["decision"] == "promoted" and result["good"] == 4 and result["quarantined"] == 0
    assert [c[0] for c in fake_stages.calls] == [f"prepare@{DATASET}", f"train@{DATASET}", f"evaluate@{DATASET}"]
    assert [c[1] for c in fake_stages.calls] == [False, True, True]
    assert _contents(batch) == before  # sources untouched: good files are copied

    incoming = project / "data" / "incoming" / DATASET
    manifest = pd.read_csv(incoming / "manifest.csv")
    assert len(manifest) == 4 and set(manifest["label"]) == {0, 1} and set(manifest["split"]) == {"train"}
    assert sorted(_contents(incoming / "images")) == before
    versions = pd.read_csv(project / "data_versions" / f"{DATASET}.csv")
    assert list(versions["version"]) == [1] and versions["md5"][0].endswith(".dir") and versions["nfiles"][0] == 5
    dvc_out = yaml.safe_load((project / "data_versions" / f"{DATASET}.dvc").read_text())["outs"][0]
    assert dvc_out["md5"] == versions["md5"][0]

    assert _champion(project) == result["challenger_version"]
    run = _decision_runs().iloc[0]
    assert run["tags.decision"] == "promoted" and run["tags.data_version"] == "1"
    assert run["metrics.challenger_iou"] == 60.0


def test_worse_challenger_is_not_promoted_and_old_data_versions_restore(project, fake_stages, prefect_server, tmp_path):
    retrain = prefect_server["retrain"]
    first = retrain.retrain(str(_good_batch(tmp_path / "b1", seed=2)), dataset=DATASET, root=str(project))
    champion = _champion(project)
    assert first["decision"] == "promoted"
    served = _tree(project, "models", "results", "dvc.lock", "data/prepared")
    second = retrain.retrain(str(_good_batch(tmp_path / "b2", seed=3)), dataset=DATASET, root=str(project))
    assert second["decision"] == "kept_champion" and not second["promoted"]
    # the rejected challenger's weights, metrics and lock are gone: the champion's files, byte for byte
    assert _tree(project, "models", "results", "dvc.lock", "data/prepared") == served
    assert "weights v1" in (project / "models" / DATASET / "full" / "best.pt").read_text()
    assert not list((project / ".wpcrack" / "champion").iterdir())
    assert (second["champion_iou"], second["challenger_iou"]) == (60.0, 55.0)
    assert _champion(project) == champion
    run = _decision_runs().iloc[0]
    assert run["tags.decision"] == "kept_champion" and run["metrics.champion_iou"] == 60.0

    manifest = project / "data" / "incoming" / DATASET / "manifest.csv"
    assert len(pd.read_csv(manifest)) == 8
    retrain.restore(project, DATASET, 1)
    assert len(pd.read_csv(manifest)) == 4


def test_metrics_of_other_weights_never_promote(project, fake_stages, prefect_server, tmp_path):
    """evaluate scored another model than the newest version (e.g. a stale results/ folder): the
    comparison would be meaningless, so nothing is promoted and the champion's files come back."""
    retrain = prefect_server["retrain"]
    assert retrain.retrain(str(_good_batch(tmp_path / "b1", seed=4)), dataset=DATASET, root=str(project))["promoted"]
    champion = _champion(project)
    served = _tree(project, "models", "results", "dvc.lock", "data/prepared")
    fake_stages.evaluate_stale_model = True
    second = retrain.retrain(str(_good_batch(tmp_path / "b2", seed=5)), dataset=DATASET, root=str(project))
    assert second["decision"] == "metrics_not_of_challenger" and not second["promoted"]
    assert _champion(project) == champion
    assert _tree(project, "models", "results", "dvc.lock", "data/prepared") == served


def test_the_gate_weighs_the_teams_field_set_against_the_benchmark(project, fake_stages, prefect_server, tmp_path):
    """A challenger that gains on the team's roads may lose a little on the benchmark (promotion
    tolerances); one that loses on the roads is kept out however well it does on the benchmark."""
    from test_field import _set

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["field"]["sets"] = ["town"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _set(project / "data", n=2, name="town")
    fake_stages.ious, fake_stages.field = [60.0, 59.5, 70.0], [20.0, 30.0, 25.0]
    retrain = prefect_server["retrain"]
    first = retrain.retrain(str(_good_batch(tmp_path / "b1", seed=11)), dataset=DATASET, root=str(project))
    assert first["decision"] == "promoted" and first["challenger_field"] == {"town": 20.0}
    second = retrain.retrain(str(_good_batch(tmp_path / "b2", seed=12)), dataset=DATASET, root=str(project))
    assert second["decision"] == "promoted"  # -0.5 on the benchmark (tolerance 1), +10 on the town
    assert second["reasons"] == ["field town 30.00 vs 20.00 (+10.00)", "benchmark 59.50 vs 60.00 (-0.50)"]
    third = retrain.retrain(str(_good_batch(tmp_path / "b3", seed=13)), dataset=DATASET, root=str(project))
    assert third["decision"] == "kept_champion" and _champion(project) == second["challenger_version"]
    assert third["reasons"][0] == "field town 25.00 vs 30.00 (-5.00): loses more than 1"
    run = _decision_runs().iloc[0]
    assert run["tags.decision"] == "kept_champion" and run["metrics.challenger_field/town"] == 25.0
    assert run["metrics.champion_field/town"] == 30.0 and run["tags.data_version"] == "3"


def test_intake_command_versions_good_files_and_names_bad_ones(project, prefect_server, tmp_path, capsys):
    from wpcrack.cli import main

    batch = _good_batch(tmp_path / "batch", seed=21)
    _write(batch / "crack" / "broken.jpg", os.urandom(200))
    assert main(["intake", DATASET, str(batch), "--root", str(project), "--check"]) == 0
    out = capsys.readouterr().out
    assert "broken.jpg: cannot be decoded as an image (corrupt)" in out and "checked only: nothing moved" in out
    assert (batch / "crack" / "broken.jpg").is_file() and not (project / "data_versions").exists()
    assert main(["intake", DATASET, str(batch), "--root", str(project)]) == 0
    assert f"data/incoming/{DATASET} is now version 1 (+4" in capsys.readouterr().out
    assert not (batch / "crack" / "broken.jpg").exists()  # quarantined with its reason
    assert len(pd.read_csv(project / "data" / "incoming" / DATASET / "manifest.csv")) == 4
    empty = tmp_path / "junk"
    _write(empty / "no_crack" / "x.png", b"nothing")
    assert main(["intake", DATASET, str(empty), "--root", str(project)]) == 2
    assert "no usable image" in capsys.readouterr().err


def test_bad_files_are_quarantined_exactly_and_no_source_is_lost(project, prefect_server, tmp_path):
    retrain = prefect_server["retrain"]
    batch = _good_batch(tmp_path / "batch", seed=4)
    good = _photo(141)
    _write(batch / "crack" / "corrupt.jpg", os.urandom(300))
    _write(batch / "crack" / "png_named.jpg", _encode(_photo(142)))  # content PNG, extension JPEG
    _write(batch / "crack" / "truncated.jpg", _encode(_photo(143), ".jpg")[:-400])
    _write(batch / "crack" / "first.png", _encode(good))
    _write(batch / "no_crack" / "copy_of_first.png", _encode(good))  # duplicate within the batch
    shutil.copy(project / "data" / "raw" / DATASET / "known.png", batch / "no_crack" / "known_again.png")
    _write(batch / "no_crack" / "tiny.png", _encode(_photo(144, (20, 20))))
    _write(batch / "no_crack" / "deep.png", _encode((_photo(145).astype(np.uint16) * 256)))  # 16-bit
    _write(batch / "no_crack" / ".hidden.png", _encode(_photo(146)))
    before = _contents(batch)

    report = retrain.validate_batch.fn(str(batch), str(project), DATASET)
    rejected = set(report.loc[~report["ok"], "name"])
    assert rejected == {
        "crack/corrupt.jpg", "crack/png_named.jpg", "crack/truncated.jpg", "no_crack/copy_of_first.png",
        "no_crack/known_again.png", "no_crack/tiny.png", "no_crack/deep.png", "no_crack/.hidden.png",
    }
    reasons = dict(zip(report["name"], report["reason"], strict=True))
    assert "PNG" in reasons["crack/png_named.jpg"]
    assert "duplicate of crack/first.png" in reasons["no_crack/copy_of_first.png"]
    assert "data/raw/synthetic/known.png" in reasons["no_crack/known_again.png"]

    quarantine = tmp_path / "quarantine"
    moved = retrain.quarantine.fn(report, str(batch), str(quarantine))
    assert len(moved) == 8
    assert sorted(_contents(batch) + _contents(quarantine)) == before  # moved, never deleted or rewritten
    assert "corrupt" in (quarantine / "crack" / "corrupt.jpg.reason.txt").read_text()
    left = {p.relative_to(batch).as_posix() for p in batch.rglob("*") if p.is_file()}
    assert left == set(report.loc[report["ok"], "name"])
    assert (quarantine / "report.csv").is_file()


def test_csv_batch_never_touches_files_outside_it(project, prefect_server, tmp_path):
    retrain = prefect_server["retrain"]
    outside = _write(tmp_path / "secret.png", _encode(_photo(51)))
    batch = tmp_path / "csvbatch"
    _write(batch / "a.png", _encode(_photo(52)))
    (batch / "list.csv").write_text("path,label\na.png,crack\n../secret.png,no_crack\nmissing.png,crack\na.png,maybe\n")
    report = retrain.validate_batch.fn(str(batch / "list.csv"), str(project), DATASET)
    assert list(report["ok"]) == [True, False, False, False]
    assert "outside" in report["reason"][1] and "not found" in report["reason"][2] and "label" in report["reason"][3]
    retrain.quarantine.fn(report.iloc[1:2], str(batch / "list.csv"), str(tmp_path / "q"))
    assert outside.is_file() and not (tmp_path / "q" / "outside" / "secret.png").exists()


def test_batch_without_a_good_file_stops_the_flow(project, fake_stages, prefect_server, tmp_path):
    retrain = prefect_server["retrain"]
    batch = tmp_path / "bad"
    _write(batch / "crack" / "x.jpg", b"not an image")
    with pytest.raises(retrain.BatchRejected, match="no usable image"):
        retrain.retrain(str(batch), dataset=DATASET, root=str(project))
    assert fake_stages.calls == [] and not (project / "data_versions").exists()


def test_rerun_on_the_same_drop_folder_takes_only_new_files(project, fake_stages, prefect_server, tmp_path):
    retrain = prefect_server["retrain"]
    batch = _good_batch(tmp_path / "inbox", seed=6)
    retrain.retrain(str(batch), dataset=DATASET, root=str(project))
    again = retrain.retrain(str(batch), dataset=DATASET, root=str(project))
    assert again["decision"] == "nothing_new" and again["quarantined"] == 0
    assert len(list(batch.rglob("*.*"))) == 4


def test_changed_test_split_stops_before_training(project, fake_stages, prefect_server, tmp_path):
    from wpcrack.errors import DataError

    retrain = prefect_server["retrain"]
    retrain.retrain(str(_good_batch(tmp_path / "b1", seed=7)), dataset=DATASET, root=str(project))
    fake_stages.change_test_split = True
    with pytest.raises(DataError, match="test split changed"):
        retrain.retrain(None, dataset=DATASET, root=str(project))
    assert [c for c, _ in fake_stages.calls].count(f"train@{DATASET}") == 1


# --- DVC failures -------------------------------------------------------------------------------


def _fake_dvc(folder: Path, script: str, monkeypatch) -> Path:
    """Put an executable ``dvc`` first on PATH; it counts its calls in ``calls``."""
    folder.mkdir()
    exe = folder / "dvc"
    exe.write_text(f"#!/bin/sh\necho x >> {folder / 'calls'}\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def test_failing_dvc_stage_fails_the_flow_without_retrying(project, prefect_server, tmp_path, monkeypatch):
    tasks = prefect_server["tasks"]
    script = "echo \"ERROR: failed to reproduce 'prepare@synthetic'\" >&2; exit 255"
    fake = _fake_dvc(tmp_path / "bin", script, monkeypatch)
    with pytest.raises(tasks.DvcFailed, match="failed to reproduce"):
        prefect_server["retrain"].retrain(None, dataset=DATASET, root=str(project))
    assert (fake / "calls").read_text().count("x") == 1


def test_lock_contention_is_retried(project, prefect_server, tmp_path, monkeypatch):
    from prefect import flow

    tasks = prefect_server["tasks"]
    script = ('[ -f "$(dirname $0)/locked" ] && exit 0; touch "$(dirname $0)/locked"; '
              'echo "ERROR: Unable to acquire lock. Most likely another DVC process is running" >&2; exit 1')
    fake = _fake_dvc(tmp_path / "bin", script, monkeypatch)
    quick = tasks.dvc_repro.with_options(retry_delay_seconds=0)

    @flow
    def one_stage():
        return quick(["prepare@synthetic"], cwd=str(project), gpu=True)

    one_stage()
    assert (fake / "calls").read_text().count("x") == 2


def test_gpu_stages_hold_a_slot_of_the_gpu_limit(project, prefect_server, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    tasks = prefect_server["tasks"]
    _fake_dvc(tmp_path / "bin", "exit 0", monkeypatch)
    held, run_dvc = [], tasks.run_dvc

    def spy(args, cwd="."):
        with get_client(sync_client=True) as client:
            held.append(client.read_global_concurrency_limit_by_name("gpu").active_slots)
        return run_dvc(args, cwd)

    monkeypatch.setattr(tasks, "run_dvc", spy)

    @flow
    def two_stages():
        tasks.dvc_repro(["train@synthetic"], cwd=str(project), gpu=True)
        tasks.dvc_repro(["compare@synthetic"], cwd=str(project))

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
    try:
        two_stages()
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name("gpu")
    assert held == [1, 0]


# --- reproduce and deployments ------------------------------------------------------------------


def test_reproduce_runs_stages_in_order_one_gpu_stage_at_a_time(prefect_server, monkeypatch):
    calls = []
    monkeypatch.setattr(prefect_server["reproduce"], "dvc_repro",
                        lambda targets, cwd, gpu=False, single=False: calls.append((targets[0], gpu)))
    prefect_server["reproduce"].reproduce.fn(["synthetic"], ["full", "cls_det"], root=str(REPO), promote=False)
    assert calls == [("prepare@synthetic", False), ("train@synthetic", True), ("evaluate@synthetic", True),
                     ("train@synthetic-cls_det", True), ("evaluate@synthetic-cls_det", True),
                     ("benchmark@synthetic", True)]
    calls.clear()
    prefect_server["reproduce"].reproduce.fn(["cfd"], root=str(REPO), benchmark=False, promote=False)
    assert [c for c, _ in calls] == ["prepare@cfd", "train@cfd", "evaluate@cfd", "train@cfd-cls_only",
                                     "evaluate@cfd-cls_only", "train@cfd-supervised", "evaluate@cfd-supervised",
                                     "compare@cfd", "tune_crf@cfd", "report@cfd", "report_index"]


def test_deploy_refuses_to_schedule_without_a_server(prefect_server, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert prefect_server["deploy"].main(["retrain", "--cron", "0 3 * * 1", "--batch", "inbox"]) == 2
    assert "prefect server start" in capsys.readouterr().err


def test_deploy_registers_a_scheduled_deployment_with_a_work_pool(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
    args = ["retrain", "--cron", "0 3 * * 1", "--batch", str(tmp_path / "inbox"), "--dataset", "deepcrack",
            "--root", str(REPO), "--work-pool", "gpu"]
    assert prefect_server["deploy"].main(args) == 0
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("wpcrack-retrain/retrain-deepcrack")
    assert deployment.work_pool_name == "gpu" and deployment.schedules[0].schedule.cron == "0 3 * * 1"
    assert deployment.parameters["batch"] == str(tmp_path / "inbox") and deployment.parameters["dataset"] == "deepcrack"
    args = ["survey", "--cron", "0 22 * * *", "--photos", str(tmp_path / "season"), "--out", str(tmp_path / "out"),
            "--root", str(REPO), "--work-pool", "gpu"]
    assert prefect_server["deploy"].main(args) == 0
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("wpcrack-survey/survey-season")
    assert deployment.entrypoint == "pipelines/survey.py:survey" and deployment.parameters["out"] == str(tmp_path / "out")


def test_prefect_yaml_entrypoints_are_the_flows(prefect_server):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    names = {d.name: load_flow_from_entrypoint(str(REPO / d.entrypoint)).name for d in config.deployments}
    assert names == {"retrain-deepcrack": "wpcrack-retrain", "reproduce-all": "wpcrack-reproduce",
                     "survey-inbox": "wpcrack-survey"}


# --- the retrain flow for real --------------------------------------------------------------------

SERVED = ("models/synthetic/full", "results/synthetic/full", "dvc.lock", "data/prepared/synthetic")


@pytest.fixture
def real_project(tmp_path, prefect_server) -> Path:
    """A git + DVC copy of the project (its stages, params and code) with its own model prefix."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "wpcrack", root / "wpcrack", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data_versions", root / "data_versions")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["model_name_prefix"] = "flowtest"
    # a shorter smoke training (the demo's learns in test_end_to_end): the gate needs a model, not a good one
    params["prepare"]["synthetic"].update(val_crack=8, val_nocrack=8, test=16)
    params["profiles"]["smoke"]["train"]["epochs"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/models/\n/results/\n/reports/\n/.wpcrack/\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=root, check=True, env=_git_env(), capture_output=True)
    return root


def _synthetic_batch(folder: Path, seed: int, corrupt: bool = False) -> Path:
    from wpcrack.data.synthetic import make_image

    for i in range(3):
        for label, crack in (("crack", True), ("no_crack", False)):
            rgb, _ = make_image(500 + seed, "train", i, 96, crack)
            _write(folder / label / f"{label}{seed}_{i}.png", _encode(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    if corrupt:
        _write(folder / "crack" / "torn.png", b"\x89PNG\r\n\x1a\n" + bytes(40))
    return folder


def test_promoted_then_rejected_challenger_with_real_dvc_mlflow_and_prefect(real_project, prefect_server, tmp_path):
    """A good batch with a corrupt file is promoted; a batch whose training is made useless (one step
    at a negligible learning rate) is rejected and leaves the champion's files byte for byte."""
    root, retrain = real_project, prefect_server["retrain"]
    quarantine = tmp_path / "quarantine"
    first = retrain.retrain(str(_synthetic_batch(tmp_path / "b1", seed=1, corrupt=True)), dataset=DATASET,
                            root=str(root), quarantine_dir=str(quarantine), min_side=32)
    assert first["decision"] == "promoted" and first["good"] == 6 and first["quarantined"] == 1
    assert _champion(root) == first["challenger_version"]
    assert (quarantine / "crack" / "torn.png").is_file() and not (tmp_path / "b1" / "crack" / "torn.png").exists()
    reason = (quarantine / "crack" / "torn.png.reason.txt").read_text()
    assert reason.startswith(str(tmp_path / "b1" / "crack" / "torn.png")), reason
    assert pd.read_csv(quarantine / "report.csv")["ok"].sum() == 6
    served = _tree(root, *SERVED)
    assert "models/synthetic/full/best.pt" in served and "results/synthetic/full/metrics.json" in served

    # the challenger cannot learn (one step at a negligible rate): its IoU is about the untrained model's
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profiles"]["smoke"]["train"].update(epochs=1, max_steps_per_epoch=1, detector_warmup_epochs=0,
                                                lr=1e-12, lr_detector=1e-12)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = retrain.retrain(str(_synthetic_batch(tmp_path / "b2", seed=2)), dataset=DATASET, root=str(root),
                             min_side=32)
    assert second["decision"] == "kept_champion", second
    assert second["challenger_iou"] < second["champion_iou"]
    assert _champion(root) == first["challenger_version"]
    assert _tree(root, *SERVED) == served  # weights, metrics, predictions, prepared data and dvc.lock as they were
    manifest = pd.read_csv(root / "data" / "incoming" / DATASET / "manifest.csv")
    assert len(manifest) == 12  # the second batch stays ingested (data version 2), for a later retraining
    assert list(pd.read_csv(root / "data_versions" / f"{DATASET}.csv")["version"]) == [1, 2]
