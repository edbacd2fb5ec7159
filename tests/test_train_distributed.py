"""Data-parallel training (torchrun / WORLD_SIZE > 1), on the CPU with gloo: two processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_loop import PARAMS, TINY_DATA, TINY_RUN, _cfg, tiny_data  # noqa: F401 (fixture)

from wpcrack import cli
from wpcrack.errors import TrainingError
from wpcrack.train import checkpoint
from wpcrack.train.loop import train

WORLD = 2
RUN = ["train.epochs=2", "train.batch_size=2"]  # 12 train rows: 6 per rank, 2 steps per epoch (max_steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_average_gradients(rank: int) -> None:
    """Weighted mean over ranks; zeros for a gradient missing on one rank; None where missing on all;
    weight 0 (nothing to learn here) still joins; a non-finite loss anywhere drops every gradient."""
    from wpcrack.train.distributed import World, average_gradients

    world = World(rank=rank, local_rank=rank, size=WORLD)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    grads = {0: [torch.full((3,), 1.0), None, None], 1: [torch.full((3,), 5.0), torch.full((3,), 2.0), None]}[rank]
    for p, g in zip(params, grads):
        p.grad = g
    total, bad = average_gradients(params, world, weight=1.0 if rank == 0 else 3.0)
    assert (total, bad) == (4.0, 0)
    assert torch.equal(params[0].grad, torch.full((3,), 4.0))  # (1 * 1 + 3 * 5) / 4
    assert torch.equal(params[1].grad, torch.full((3,), 1.5))  # (1 * 0 + 3 * 2) / 4
    assert params[2].grad is None

    for p in params:
        p.grad = torch.ones(3) if rank == 1 else None
    assert average_gradients(params, world, weight=0.0 if rank == 0 else 2.0) == (2.0, 0)
    assert all(torch.equal(p.grad, torch.ones(3)) for p in params)

    assert average_gradients(params, world, weight=1.0, finite=rank == 0) == (1.0, 1)
    assert all(p.grad is None for p in params)

    # Through a phase's step: rank 0 has no image for the detector, rank 1 has two.
    from wpcrack.train.phases import optimizer_step

    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    start = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    total = None if rank == 0 else net(torch.ones(2, 2)).mean()
    optimizer_step([opt], "detector", total, {}, world, weight=0.0 if rank == 0 else 2.0)
    assert all(torch.allclose(p, s - 1.0) for p, s in zip(net.parameters(), start))  # rank 1's gradient
    total = net(torch.ones(1, 2)).sum() * (float("nan") if rank == 1 else 1.0)
    with pytest.raises(TrainingError, match="detector loss is not finite on 1 of 2 processes"):
        optimizer_step([opt], "detector", total, {}, world)
    assert all(torch.allclose(p, s - 1.0) and p.grad is None for p, s in zip(net.parameters(), start))


class Killed(Exception):
    pass


def _rank(rank: int, ports: tuple[int, int], data: Path, out: Path, overrides: list[str], resume: bool,
          kill_at: int | None = None) -> None:
    """One training process, as torchrun would start it; saves what the test compares.
    ``kill_at``: every rank stops with an exception at that step (as a killed job)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import wpcrack.models.wpcracknet as wpcracknet
    from wpcrack.data import datasets
    from wpcrack.train import loop

    models, seen, saved = [], [], []
    build, getitem, save = wpcracknet.build_model, datasets.WeakDataset.__getitem__, checkpoint.save
    wpcracknet.build_model = lambda cfg: models.append(build(cfg)) or models[-1]

    def recording_getitem(self, index):
        if self.split == "train":
            seen.append((self.epoch, index))
        return getitem(self, index)

    datasets.WeakDataset.__getitem__ = recording_getitem
    loop.checkpoint.save = lambda path, state: saved.append(Path(path).name) or save(path, state)
    if kill_at is not None:
        step, calls = loop.train_step, []

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) == kill_at:
                raise Killed
            return step(*args, **kwargs)

        loop.train_step = killed
        with pytest.raises(Killed):
            train(_cfg(data, *overrides), out / "model", resume=resume, track=False)
        return

    metrics = train(_cfg(data, *overrides), out / "model", resume=resume, track=False)
    assert not dist.is_initialized()  # train() set the group up and tore it down
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=WORLD)
    try:
        _check_average_gradients(rank)
    finally:
        dist.destroy_process_group()
    torch.save({"model": models[0].state_dict(), "seen": seen, "saved": saved, "metrics": metrics},
               out / f"rank{rank}.pt")


def _launch(data: Path, out: Path, overrides: list[str], resume: bool = False,
            kill_at: int | None = None) -> list[dict]:
    ports = (_free_port(), _free_port())
    mp.spawn(_rank, args=(ports, data, out, overrides, resume, kill_at), nprocs=WORLD, join=True)
    if kill_at is not None:
        return []
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_one_model_on_disjoint_shards(tiny_data, tmp_path):  # noqa: F811
    ranks = _launch(tiny_data, tmp_path, RUN)

    # Same weights and BatchNorm statistics on both ranks, and they are what rank 0 wrote.
    assert _equal(ranks[0]["model"], ranks[1]["model"])
    state = checkpoint.load(tmp_path / "model" / "checkpoint.pt")
    assert _equal(state["model"], ranks[0]["model"])
    assert state["run"]["world_size"] == WORLD and state["run"]["epoch"] == 2
    assert (tmp_path / "model" / "best.pt").is_file() and (tmp_path / "model" / "config.yaml").is_file()
    # Only rank 0 writes checkpoints.
    assert "checkpoint.pt" in ranks[0]["saved"] and ranks[1]["saved"] == []

    # Disjoint shards each epoch, a new order each epoch; 2 steps x 2 images per rank and epoch.
    for epoch in (0, 1):
        shards = [[i for e, i in r["seen"] if e == epoch] for r in ranks]
        assert all(len(s) >= 4 for s in shards) and not set(shards[0]) & set(shards[1])
    assert [i for e, i in ranks[0]["seen"] if e == 0] != [i for e, i in ranks[0]["seen"] if e == 1]

    # Both ranks computed the same (sharded, summed) validation and so chose the same best epoch.
    m0, m1 = (r["metrics"] for r in ranks)
    assert m0["best"] == m1["best"] and m0["val_score"] == m1["val_score"]
    assert m0["processes"] == WORLD and m0["steps"] == 4 and m0["final"]["det_images"] > 0

    # A single process does not resume a two-process run (shards and schedule would change).
    with pytest.raises(TrainingError, match="trained with 2 process"):
        train(_cfg(tiny_data, *RUN), tmp_path / "model", resume=True, track=False)


def test_wpcrack_nproc_relaunches_train_under_torchrun(monkeypatch):
    calls = []

    def execv(path, argv):
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execv", execv)
    monkeypatch.setattr(cli, "cmd_train", lambda args: calls.append("in-process"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "synthetic", "--variant", "full", "--set", "train.epochs=1"]

    monkeypatch.setenv(cli.NPROC_ENV, "2")
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "wpcrack", *argv]]

    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a torchrun worker: train here
    assert cli.main(argv) == 0 and calls == ["in-process"]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(cli.NPROC_ENV, "1")
    calls.clear()
    assert cli.main(argv) == 0 and calls == ["in-process"]
    monkeypatch.setenv(cli.NPROC_ENV, "two")
    assert cli.main(argv) == 2


@pytest.mark.slow
def test_two_process_resume_after_a_kill_ends_with_the_same_weights(tiny_data, tmp_path):  # noqa: F811
    straight = _launch(tiny_data, tmp_path / "straight", RUN)
    _launch(tiny_data, tmp_path / "resumed", RUN, kill_at=4)  # second step of epoch 2
    assert checkpoint.load(tmp_path / "resumed" / "model" / "checkpoint.pt")["run"]["epoch"] == 1
    resumed = _launch(tiny_data, tmp_path / "resumed", RUN, resume=True)
    for name in ("checkpoint.pt", "best.pt"):
        a, b = (checkpoint.load(tmp_path / d / "model" / name)["model"] for d in ("straight", "resumed"))
        assert _equal(a, b), name
    assert _equal(straight[1]["model"], resumed[1]["model"])
    assert straight[0]["metrics"]["best"] == resumed[0]["metrics"]["best"]


@pytest.mark.slow
def test_torchrun_cli_end_to_end(tiny_data, tmp_path):  # noqa: F811
    """``WPCRACK_NPROC=2 python -m wpcrack train``: relaunch, torchrun, MLflow from rank 0 only."""
    sets = [a for s in [f"paths.data={tiny_data}", *TINY_DATA, *TINY_RUN, *RUN] for a in ("--set", s)]
    env = os.environ | {cli.NPROC_ENV: "2", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
                        "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "wpcrack", "train", "synthetic", "--params", str(PARAMS),
                           "--out", str(tmp_path / "model"), *sets],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "torch.distributed.run" in done.stderr
    assert done.stdout.count("epoch 2/2") == 1  # one summary line: rank 0 prints
    assert checkpoint.load(tmp_path / "model" / "checkpoint.pt")["run"]["world_size"] == 2
