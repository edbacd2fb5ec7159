"""The DVC remote a team shares: one clone trains and pushes, a fresh clone pulls and has nothing to
run. Real DVC and git on the project's own dvc.yaml and .dvc/config, a local-path remote."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare@synthetic", "train@synthetic")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{Path(os.sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def _run(cwd: Path, *cmd: str, tracking: Path | None = None) -> str:
    env = _env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(tracking or cwd) / 'mlflow.db'}"
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_the_committed_config_names_a_default_remote():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    remote = config["core"]["remote"]
    assert config[f"'remote \"{remote}\"'"]["url"]  # DVC writes the section name quoted


def test_push_in_one_clone_pull_in_another_and_nothing_is_left_to_run(tmp_path):
    team = tmp_path / "alice"
    team.mkdir()
    for name in ("wpcrack", "data_versions"):
        shutil.copytree(REPO / name, team / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", team / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["synthetic"].update(train_crack=8, train_nocrack=8, val_crack=4, val_nocrack=4, test=4)
    params["profiles"]["smoke"]["train"].update(epochs=1, detector_warmup_epochs=0)
    (team / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (team / ".gitignore").write_text((REPO / ".gitignore").read_text())
    _run(team, "git", "init", "-q")
    _run(team, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", team / ".dvc" / "config")  # the project's remote, as committed
    remote = tmp_path / "remote"
    _run(team, "dvc", "remote", "modify", "--local", "team", "url", str(remote))

    _run(team, "dvc", "repro", *STAGES)
    _run(team, "git", "add", "-A")
    _run(team, "git", "commit", "-qm", "trained")
    _run(team, "dvc", "push", *STAGES)
    assert any(remote.rglob("*")), "dvc push stored nothing"

    fresh = tmp_path / "bob"
    _run(tmp_path, "git", "clone", "-q", str(team), str(fresh))
    assert not (fresh / "models").exists()
    _run(fresh, "dvc", "remote", "modify", "--local", "team", "url", str(remote))
    _run(fresh, "dvc", "pull", *STAGES)

    for rel in ("models/synthetic/full/best.pt", "models/synthetic/full/train_metrics.json",
                "models/synthetic/full/history.csv", "data/prepared/synthetic/manifest.csv"):
        assert (fresh / rel).read_bytes() == (team / rel).read_bytes(), rel
    status = _run(fresh, "dvc", "status", *STAGES)
    assert "up to date" in status, status
    dry = _run(fresh, "dvc", "repro", "--dry", *STAGES)
    assert "Running stage" not in dry, dry
