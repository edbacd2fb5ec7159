"""Scheduled retraining against a real Prefect server: the scheduler creates a run and it completes.

Unlike tests/test_pipelines.py (a temporary in-process server, which has no scheduler), this starts
``prefect server start`` on 127.0.0.1 (free port, temporary PREFECT_HOME, own process group) and
serves the retrain deployment exactly as a user would: ``python -m pipelines.deploy retrain --cron
...``. The drop folder is empty, so the real retrain flow ends at once with ``nothing_new``. With
SQLAlchemy 2.1 (prefect 3.8.8) the scheduler fails with "Can't evaluate bulk DML statement" and no run
is ever created; constraints.txt pins 2.0.x. The cron fires each minute, so the test waits up to a
minute for the run's time: about 1-2 minutes in all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.prefect_server

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "wpcrack-retrain/scheduled-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The environment without any inherited Prefect setting, plus a private home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def _process_group(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen]:
    """Start ``args`` in its own session (process group); stop the whole group on exit, whatever happened."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
            if _group_gone(proc.pid):
                break


def _group_gone(pgid: int) -> bool:
    """No live process left in the group (zombies waiting for a reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
    return True


def _wait_for(what: str, check: Callable[[], Any], timeout: float, logs: list[Path],
              procs: list[subprocess.Popen]) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the logs on timeout or a dead process."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # the server may not answer yet
            if result := check():
                return result
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited: {dead}" if dead else f"not within {timeout:.0f} s"
            pytest.fail(f"{what}: {why}\n" + "\n".join(f"--- {log.name}\n{_tail(log)}" for log in logs))
        time.sleep(1)


@pytest.fixture
def prefect_server(tmp_path, monkeypatch) -> Iterator[dict]:
    """``prefect server start`` (API + scheduler, no UI) on a free loopback port."""
    if shutil.which("prefect", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the prefect CLI is not installed beside this Python")
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    args = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
            "--port", str(port), "--analytics-off", "--no-ui"]
    with _process_group(args, log, _env(home), REPO) as proc:
        # this process talks to it through the Prefect client: same private home, its URL
        monkeypatch.setenv("PREFECT_HOME", str(home))
        monkeypatch.setenv("PREFECT_API_URL", api)
        from prefect.client.orchestration import SyncPrefectClient

        def healthy() -> bool:
            with SyncPrefectClient(api) as client:
                return client.api_healthcheck() is None

        _wait_for("prefect server start", healthy, 120, [log], [proc])
        yield {"api": api, "home": home, "log": log, "proc": proc}
    assert _group_gone(proc.pid)


def test_scheduler_creates_a_run_of_the_served_retrain_deployment_and_it_completes(prefect_server, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    api, server_log = prefect_server["api"], prefect_server["log"]
    root = tmp_path / "root"  # a wpcrack root: only params.yaml is read when nothing is new
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    inbox = tmp_path / "inbox"  # an empty drop folder
    (inbox / "crack").mkdir(parents=True)
    (inbox / "no_crack").mkdir()

    serve_log = tmp_path / "deploy.log"
    args = [sys.executable, "-m", "pipelines.deploy", "retrain", "--cron", "* * * * *", "--name", "scheduled-test",
            "--batch", str(inbox), "--dataset", "synthetic", "--root", str(root)]
    env = _env(prefect_server["home"], PREFECT_API_URL=api)
    logs, procs = [serve_log, server_log], [prefect_server["proc"]]
    with _process_group(args, serve_log, env, REPO) as serve, SyncPrefectClient(api) as client:
        procs.append(serve)
        deployment = _wait_for("the deployment is registered",
                               lambda: client.read_deployment_by_name(DEPLOYMENT), 90, logs, procs)
        assert [s.schedule.cron for s in deployment.schedules] == ["* * * * *"]
        assert deployment.parameters["batch"] == str(inbox) and deployment.parameters["dataset"] == "synthetic"

        def runs():
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=5)

        first = _wait_for("the scheduler creates a run", runs, 60, logs, procs)[0]
        assert first.auto_scheduled and first.expected_start_time is not None
        assert first.parameters["batch"] == str(inbox)

        def final():
            run = client.read_flow_run(first.id)
            return run if run.state is not None and run.state.is_final() else None

        # the run is due at the next minute; then the serving process picks it up and runs it
        done = _wait_for(f"run {first.name} ends", final, 150, logs, procs)
        assert done.state.is_completed(), f"{done.state}\n{_tail(serve_log)}"
    assert "nothing new in the batch" in serve_log.read_text()
    assert "bulk DML" not in server_log.read_text()
