"""Continuing a trained run on old + new data (``retrain.mode: finetune``).

A weekly retraining from ImageNet costs a whole run; continuing the champion for a few epochs on the
grown training split costs a fraction of it. The start is the run's own ``best.pt`` (the champion's
file: ``dvc`` keeps it across runs, ``persist: true``, and the retraining flow keeps a copy aside),
copied to ``init.pt`` when a fine-tuning starts so that an interrupted one resumes from the same
start even though it rewrites ``best.pt``. The start's md5 joins the run's fingerprints: a checkpoint
of another start is never resumed.

The continued run is the recipe with ``retrain.epochs`` epochs, no detector warm-up (the detector is
trained already: pseudo labels are remade by the start model at once) and the learning rates times
``retrain.lr_scale``; best.pt records that configuration, and train_metrics.json the start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any

from wpcrack.config import Config, RetrainConfig
from wpcrack.errors import TrainingError
from wpcrack.io import atomic_path
from wpcrack.train import checkpoint

INIT = "init.pt"


def finetune_config(cfg: Config, retrain: RetrainConfig) -> Config:
    """The recipe of ``cfg`` shortened to a continuation (see the module docstring)."""
    t = cfg.train
    train = dataclasses.replace(t, epochs=retrain.epochs, detector_warmup_epochs=0,
                                lr=t.lr * retrain.lr_scale, lr_detector=t.lr_detector * retrain.lr_scale)
    return dataclasses.replace(cfg, train=train)


def _finished(state: dict[str, Any]) -> bool:
    train = (state.get("config") or {}).get("train") or {}
    total = int(train.get("epochs", 0)) + int(train.get("finetune_epochs", 0))
    return int((state.get("run") or {}).get("epoch", 0)) >= total


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def take_start(out_dir: Path) -> Path:
    """The start weights of a fine-tuning in ``out_dir``: ``init.pt`` while an unfinished run may be
    resumed, else the finished model ``best.pt`` copied to ``init.pt``."""
    best, init, last = out_dir / checkpoint.BEST, out_dir / INIT, out_dir / checkpoint.CHECKPOINT
    unfinished = last.is_file() and not _finished(checkpoint.load(last))
    if unfinished and init.is_file():
        return init
    if unfinished:
        raise TrainingError(f"{last}: an unfinished run that did not start from a trained model; its {best.name} "
                            "is not a model to continue: finish it (retrain.mode: scratch) or remove the folder")
    if not best.is_file():
        raise TrainingError(f"{best}: retrain.mode finetune continues the run's trained model, and there is none; "
                            "train it first (retrain.mode: scratch) or `dvc pull` it")
    with atomic_path(init) as tmp:
        shutil.copyfile(best, tmp)
    return init


def load_start(model, path: Path) -> dict[str, Any]:
    """Load the start weights into ``model``; {"init_md5", "init_epoch", "init_val_score"} for the run's metrics."""
    state = checkpoint.load(path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise TrainingError(f"{path}: not a model of this run's architecture ({str(exc).splitlines()[0]}); "
                            "train it anew with retrain.mode: scratch") from None
    return {"init_md5": md5(path), "init_epoch": int(state.get("epoch", 0)),
            "init_val_score": float(state.get("val_score", float("nan")))}
