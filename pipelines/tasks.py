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
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

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
    """Run ``dvc <args>`` in ``cwd``, streaming its output; raise DvcFailed on a non-zero exit."""
    cmd = [dvc_executable(), *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
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
def dvc_repro(targets: Sequence[str], cwd: str = ".", gpu: bool = False, force: bool = False) -> str:
    """``dvc repro <targets>`` (``--force`` re-runs them even when up to date)."""
    args = ["repro", *(["--force"] if force else []), *targets]
    print(f"dvc {' '.join(args)}" + (" (holding a GPU slot)" if gpu else ""))
    with gpu_slot(gpu):
        return run_dvc(args, cwd)


@task(name="dvc-commit", cache_policy=NO_CACHE, task_run_name="dvc commit {dvc_file}")
def dvc_commit(dvc_file: str, cwd: str = ".") -> str:
    """Hash the outputs of a ``.dvc`` file into the DVC cache and record the new hash in it."""
    return run_dvc(["commit", "--force", dvc_file], cwd)
