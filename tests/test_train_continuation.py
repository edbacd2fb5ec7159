"""retrain.mode finetune: a run continued from its trained model, resumable from the same start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_train_loop import IMAGE_LABELS, Killed, _cfg, _kill_in_epoch_two, _weights, tiny_data  # noqa: F401
from wpcrack.config import RetrainConfig
from wpcrack.errors import TrainingError
from wpcrack.train import continuation
from wpcrack.train.loop import train


def _continue(base: Path, out: Path, retrain: RetrainConfig, *overrides: str, monkeypatch=None) -> dict:
    cfg = continuation.finetune_config(_cfg(base, *IMAGE_LABELS, *overrides), retrain)
    return train(cfg, out, start=continuation.take_start(out), track=False)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("champion")
    train(_cfg(tiny_data, *IMAGE_LABELS), out, track=False)
    return out


def _copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_the_recipe_is_shortened_and_slowed():
    from wpcrack.config import load_config
    from test_train_loop import PARAMS

    cfg = load_config(PARAMS, dataset="deepcrack")
    short = continuation.finetune_config(cfg, RetrainConfig(mode="finetune", epochs=2, lr_scale=0.5))
    assert (short.train.epochs, short.train.detector_warmup_epochs) == (2, 0)
    assert short.train.lr == cfg.train.lr * 0.5 and short.train.lr_detector == cfg.train.lr_detector * 0.5
    assert short.model == cfg.model and short.pseudo_labels == cfg.pseudo_labels


def test_a_continued_run_starts_from_the_champion_and_records_it(tiny_data, trained, tmp_path):  # noqa: F811
    out = _copy(trained, tmp_path)
    champion = _weights(out / "best.pt")
    champion_md5 = continuation.md5(out / "best.pt")
    # a learning rate this small leaves the weights where they started: the start was the champion, not ImageNet
    metrics = _continue(tiny_data, out, RetrainConfig(mode="finetune", epochs=1, lr_scale=1e-9))
    assert metrics["epochs"] == 1 and metrics["start"]["init_md5"] == champion_md5
    assert json.loads((out / "train_metrics.json").read_text())["start"]["init_md5"] == champion_md5
    after = _weights(out / "best.pt")
    moved = max((after[k].float() - champion[k].float()).abs().max().item() for k in champion
                if champion[k].is_floating_point() and "running" not in k)
    assert moved < 1e-4
    scratch = _weights(trained / "checkpoint.pt")
    assert continuation.md5(out / "init.pt") == champion_md5 and scratch.keys() == after.keys()
    # the next continuation starts from this run's model, not the first champion
    assert continuation.md5(continuation.take_start(out)) == continuation.md5(out / "best.pt") != champion_md5


def test_a_killed_continuation_resumes_from_the_same_start(tiny_data, trained, tmp_path, monkeypatch):  # noqa: F811
    retrain = RetrainConfig(mode="finetune", epochs=3, lr_scale=0.5)
    straight = _copy(trained, tmp_path / "a")
    expected = _continue(tiny_data, straight, retrain)
    killed = _copy(trained, tmp_path / "b")
    cfg = continuation.finetune_config(_cfg(tiny_data, *IMAGE_LABELS), retrain)
    start = continuation.take_start(killed)
    monkeypatch.setattr("wpcrack.train.loop.train_step", _real_step_killed_at(4))
    with pytest.raises(Killed):
        train(cfg, killed, start=start, track=False)
    monkeypatch.undo()
    # best.pt is now the continuation's epoch 1, yet the restart continues from init.pt (the champion)
    metrics = _continue(tiny_data, killed, retrain)
    assert metrics["resumed_from_epoch"] == 1 and metrics["val_score"] == expected["val_score"]
    a, b = _weights(straight / "best.pt"), _weights(killed / "best.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _real_step_killed_at(n: int):
    from wpcrack.train import loop

    real, calls = loop.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        return real(*args, **kwargs)
    return step


def test_a_scratch_checkpoint_is_not_taken_for_a_continuation(tiny_data, trained, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    _kill_in_epoch_two(monkeypatch, _cfg(tiny_data, *IMAGE_LABELS), out)
    with pytest.raises(TrainingError, match="unfinished run that did not start from a trained model"):
        continuation.take_start(out)
    with pytest.raises(TrainingError, match="there is none"):
        continuation.take_start(tmp_path / "empty")


def test_another_architecture_is_refused_by_name(tiny_data, trained, tmp_path):  # noqa: F811
    out = _copy(trained, tmp_path)
    cfg = continuation.finetune_config(_cfg(tiny_data, *IMAGE_LABELS, "model.cam_channels=24"),
                                       RetrainConfig(mode="finetune", epochs=1))
    with pytest.raises(TrainingError, match="init.pt: not a model of this run's architecture"):
        train(cfg, out, start=continuation.take_start(out), track=False)
