"""Prefect tasks that shell out to DVC: a failed stage is a failed task, never a silent one.

``dvc_repro`` runs ``dvc repro <targets>`` with ``check=True`` semantics (non-zero exit raises
``DvcFailed`` with the tail of DVC's output). It retries only transient failures, such as another
``dvc`` process holding the repository lock; a broken stage fails at once.

Stages that use the GPU run inside the global concurrency limit ``gpu`` (one slot per GPU), so
flows on one machine never train two models on one GPU at once. Create the limit once per Prefect
server: ``prefect gcl create gpu --limit 1``. Without it (e.g. a temporary local server) Prefect
logs a warning and the task runs unthrottled; the limit name comes from ``$WPCRACK_GPU_LIMIT``
(empty: no limit).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:
    import pandas as pd

GPU_LIMIT_ENV = "WPCRACK_GPU_LIMIT"
TRANSIENT_ERRORS = (
    "Unable to acquire lock",  # another dvc process holds .dvc/tmp/lock
    "database is locked",      # sqlite state/index busy
    "Resource temporarily unavailable",
    "Connection reset by peer",
    "Temporary failure in name resolution",
)
_TAIL_LINES = 60


class DvcFailed(subprocess.CalledProcessError):
    """``dvc`` exited non-zero; ``str()`` shows the command and the end of its output."""

    def __str__(self) -> str:
        return f"`{' '.join(self.cmd)}` exited with {self.returncode}:\n{self.output}"


def dvc_executable() -> str:
    """``dvc`` from PATH, else the one beside this Python (a venv that is not activated)."""
    found = shutil.which("dvc")
    if found:
        return found
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def run_dvc(args: Sequence[str], cwd: str | Path = ".") -> str:
    """Run ``dvc <args>`` in ``cwd``, streaming its output; raise DvcFailed on a non-zero exit
    (``check=True`` semantics, keeping the output's tail for the error). Stage commands
    (``wpcrack ...``) resolve to this Python's environment even when it is not activated."""
    cmd = [dvc_executable(), *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    output = "".join(tail)
    if proc.returncode != 0:
        raise DvcFailed(proc.returncode, ["dvc", *args], output=output)
    return output


def is_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when DVC's output names a transient problem."""
    try:
        state.result()
    except DvcFailed as exc:
        return any(marker in (exc.output or "") for marker in TRANSIENT_ERRORS)
    except Exception:
        return False
    return False


@contextlib.contextmanager
def gpu_slot(needed: bool) -> Iterator[None]:
    """Hold one slot of the GPU concurrency limit while a GPU stage runs (no-op when not needed)."""
    name = os.environ.get(GPU_LIMIT_ENV, "gpu")
    if not needed or not name:
        yield
        return
    from prefect.concurrency.sync import concurrency

    # Trainings take hours: a failed lease renewal must not kill one.
    with concurrency(name, occupy=1, strict=False, raise_on_lease_renewal_failure=False):
        yield


@task(
    name="dvc-repro",
    retries=3,
    retry_delay_seconds=[30, 60, 120],
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
    task_run_name="dvc repro {targets}",
)
def dvc_repro(targets: Sequence[str], cwd: str = ".", gpu: bool = False, single: bool = False) -> str:
    """``dvc repro <targets>`` in the repository ``cwd``; DVC decides what is up to date.

    ``single`` runs only the named stages (``-s``), for stages whose deps are whole folders.
    """
    args = ["repro", *(["-s"] if single else []), *targets]
    print(f"dvc {' '.join(args)}" + (" (holding a GPU slot)" if gpu else ""))
    with gpu_slot(gpu):
        return run_dvc(args, cwd)


def run_key(root: str | Path, dataset: str, variant: str) -> str:
    """The DVC stage key of (dataset, variant) from ``runs:`` in params.yaml."""
    from wpcrack.config import ConfigError, list_runs

    for key, run in list_runs(Path(root) / "params.yaml").items():
        if run == {"dataset": dataset, "variant": variant}:
            return key
    raise ConfigError(f"params.yaml runs: has no entry for dataset {dataset!r}, variant {variant!r}")


def _metric(path: Path, mode: str = "detector", metric: str = "iou") -> float:
    from wpcrack.errors import DataError

    if not path.is_file():
        raise DataError(path, "no evaluation metrics (did evaluate run?)")
    return float(json.loads(path.read_text())[mode][metric])


def _evaluated(path: Path, weights_md5: str | None) -> bool:
    """Whether ``metrics.json`` scored the weights with this digest (evaluate writes it)."""
    if not path.is_file() or weights_md5 is None:
        return False
    return json.loads(path.read_text()).get("model", {}).get("weights_md5") == weights_md5


@task(name="promote-challenger", cache_policy=NO_CACHE)
def promote_challenger(
    root: str,
    dataset: str,
    variant: str = "full",
    since_ms: int | None = None,
    stage: str | None = None,
    promote: bool = True,
    tags: dict[str, Any] | None = None,
    report: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Compare the newest registered version (registered after ``since_ms``, if given) with the
    champion on test IoU (``results/<dataset>/<variant>/metrics.json``, which must have been measured
    on that version's weights); move ``champion`` only if it is not worse; record the decision, both
    scores and ``report`` in an MLflow run."""
    from wpcrack.tracking import runs as tracking
    from wpcrack.config import load_config

    cfg = load_config(Path(root) / "params.yaml", dataset=dataset, variant=variant)
    name = tracking.model_name(cfg.tracking.model_name_prefix, dataset)
    champion = tracking.champion_version(name)
    challenger = tracking.latest_version(name, variant)
    decision: dict[str, Any] = {
        "model": name, "champion_version": int(champion.version) if champion else None,
        "challenger_version": None, "champion_iou": None, "challenger_iou": None, "promoted": False,
    }
    if challenger is None or (since_ms is not None and challenger.creation_timestamp < since_ms):
        decision["decision"] = "no_new_model"
        print(f"{name}: no new model version (training up to date, or tracking.log_models is off)")
    elif not _evaluated(metrics_path := Path(root) / cfg.paths.results / dataset / variant / "metrics.json",
                        challenger.tags.get(tracking.WEIGHTS_TAG)):
        decision.update(challenger_version=int(challenger.version), decision="metrics_not_of_challenger")
        print(f"{name}: {metrics_path} was not measured on v{challenger.version} (weights digest differs): "
              "nothing promoted; run `dvc repro evaluate@<run>` for this model first")
    else:
        iou = _metric(metrics_path)
        if promote:
            result = tracking.set_champion_if_not_worse(name, challenger.version, iou)
        else:
            tracking.record_score(name, challenger.version, iou)
            current = tracking.version_score(name, champion.version) if champion else None
            result = tracking.Promotion(False, current, iou)
        same = champion is not None and int(champion.version) == int(challenger.version)
        decision.update(
            challenger_version=int(challenger.version), champion_iou=result.champion_iou,
            challenger_iou=result.challenger_iou, promoted=result.promoted and not same,
            decision="already_champion" if same else "promoted" if result.promoted else "kept_champion",
        )
        print(f"{name}: challenger v{challenger.version} IoU {iou:.3f} vs champion "
              f"{'none' if result.champion_iou is None else f'{result.champion_iou:.3f}'} -> {decision['decision']}")
    with tracking.start_run(cfg, stage or f"promote@{dataset}",
                            tags={k: str(v) for k, v in {**decision, **(tags or {})}.items()}) as run:
        run.log_metrics({k: decision[k] for k in ("challenger_iou", "champion_iou") if decision[k] is not None})
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                report.to_csv(Path(tmp) / "validation_report.csv", index=False)
                run.log_artifact(Path(tmp) / "validation_report.csv", artifact_path="batch")
        decision["mlflow_run_id"] = run.run_id
    return decision
