"""The retraining flow for real: Prefect (a temporary server), DVC (``dvc repro`` of the project's own
stages), MLflow (a sqlite store) and the smoke profile on synthetic data. A good batch with a corrupt
file is promoted; a batch whose training is made useless (one step at a negligible learning rate) is rejected and leaves
the champion's files byte for byte."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
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
SERVED = ("models/synthetic/full", "results/synthetic/full", "dvc.lock", "data/prepared/synthetic")


def _git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=root, check=True, env=env, capture_output=True)


def _set_smoke(root: Path, **train) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profiles"]["smoke"]["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """A git + DVC copy of the project with a small synthetic dataset, its own MLflow store and a
    temporary Prefect server; yields (project root, the retrain flow module)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "wpcrack", root / "wpcrack", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data_versions", root / "data_versions")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["model_name_prefix"] = "flowtest"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/models/\n/results/\n/reports/\nmlflow.db\nmlartifacts/\n/.wpcrack/\n")
    _git(root, "init", "-q")
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=root, check=True)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "project")
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        mp.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=None):
            yield root, importlib.import_module("pipelines.retrain")


def _batch(folder: Path, seed: int, corrupt: bool = False) -> Path:
    from wpcrack.data.synthetic import make_image

    for i in range(3):
        for label, crack in (("crack", True), ("no_crack", False)):
            rgb, _ = make_image(500 + seed, "train", i, 96, crack)
            (folder / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / label / f"{label}{seed}_{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if corrupt:
        (folder / "crack" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return folder


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for name in SERVED:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def _champion() -> int | None:
    from wpcrack.tracking import champion_version

    version = champion_version(f"flowtest-{DATASET}")
    return None if version is None else int(version.version)


def test_promoted_then_rejected_challenger_with_real_dvc_mlflow_and_prefect(flows, tmp_path):
    root, retrain = flows
    quarantine = tmp_path / "quarantine"
    first = retrain.retrain(str(_batch(tmp_path / "b1", seed=1, corrupt=True)), dataset=DATASET, root=str(root),
                            quarantine_dir=str(quarantine), min_side=32)
    assert first["decision"] == "promoted" and first["good"] == 6 and first["quarantined"] == 1
    assert _champion() == first["challenger_version"]
    assert (quarantine / "crack" / "torn.png").is_file() and not (tmp_path / "b1" / "crack" / "torn.png").exists()
    reason = (quarantine / "crack" / "torn.png.reason.txt").read_text()
    assert reason.startswith(str(tmp_path / "b1" / "crack" / "torn.png")), reason
    assert pd.read_csv(quarantine / "report.csv")["ok"].sum() == 6
    served = _tree(root)
    assert "models/synthetic/full/best.pt" in served and "results/synthetic/full/metrics.json" in served

    # the challenger cannot learn (one step at a negligible rate): its IoU is about the untrained model's
    _set_smoke(root, epochs=1, max_steps_per_epoch=1, detector_warmup_epochs=0, lr=1e-12, lr_detector=1e-12)
    second = retrain.retrain(str(_batch(tmp_path / "b2", seed=2)), dataset=DATASET, root=str(root), min_side=32)
    assert second["decision"] == "kept_champion", second
    assert second["challenger_iou"] < second["champion_iou"]
    assert _champion() == first["challenger_version"]
    assert _tree(root) == served  # weights, metrics, predictions, prepared data and dvc.lock as they were
    manifest = pd.read_csv(root / "data" / "incoming" / DATASET / "manifest.csv")
    assert len(manifest) == 12  # the second batch stays ingested (data version 2), for a later retraining
    assert list(pd.read_csv(root / "data_versions" / f"{DATASET}.csv")["version"]) == [1, 2]
