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

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from wpcrack.dvc import DvcFailed, run_dvc

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


@contextlib.contextmanager
def temporary_environment(**values: str) -> Iterator[None]:
    """``values`` in this process's environment (so in the commands and workers it starts) for the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def has_stage(root: str | Path, name: str) -> bool:
    """Whether dvc.yaml defines stage ``name`` (``<stage>@<item>`` of a literal ``foreach`` list or mapping)."""
    import yaml

    base, _, item = name.partition("@")
    path = Path(root) / "dvc.yaml"
    stage = ((yaml.safe_load(path.read_text()) or {}).get("stages") or {}).get(base) if path.is_file() else None
    if not stage:
        return False
    items = stage.get("foreach")
    return items is None and not item or isinstance(items, list | dict) and item in items


def run_key(root: str | Path, dataset: str, variant: str) -> str:
    """The DVC stage key of (dataset, variant) from ``runs:`` in params.yaml."""
    from wpcrack.config import ConfigError, list_runs

    for key, run in list_runs(Path(root) / "params.yaml").items():
        if run == {"dataset": dataset, "variant": variant}:
            return key
    raise ConfigError(f"params.yaml runs: has no entry for dataset {dataset!r}, variant {variant!r}")


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
    """The promotion gate (``wpcrack.tracking.gate``) as a flow step: the newest registered version
    against the champion on the benchmark and the field sets, recorded in MLflow."""
    from wpcrack.tracking import gate

    return gate.promote_challenger(root, dataset, variant, since_ms, stage, promote, tags, report)
