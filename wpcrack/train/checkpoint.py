"""Checkpoints that survive a kill at any moment and load with ``weights_only=True``.

``checkpoint.pt`` (the last epoch, for ``--resume``) holds the model, all optimisers and poly
schedules, the epoch and step counters, every random generator (python, numpy, torch, CUDA, the
DataLoader's) and the run's history, so a resumed run continues bit for bit. ``best.pt`` (chosen
on validation) holds only what inference needs: the model, the resolved config and the score.
Everything is tensors and plain Python types, so no pickled object is ever executed on load.

``fingerprints`` say what a checkpoint was trained from: the training sections of the config, the
prepared data (``wpcrack.data.manifest.fingerprint``) and the source of the modules that decide the
weights (the train stage's code deps). ``wpcrack train`` resumes a checkpoint by itself only when all
three match, so a run killed under ``dvc repro`` continues and a run of changed code starts over.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wpcrack.errors import TrainingError
from wpcrack.io import atomic_path

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
# The config sections that decide the weights (evaluate, benchmark, paths ... do not).
TRAINING_SECTIONS = ("dataset", "prepare", "model", "ceccm", "loss", "pseudo_labels", "train")
# The package parts whose source decides the weights: dvc.yaml's train deps.
TRAINING_CODE = ("models", "train", "data", "method", "geometry.py", "config.py")


def training_config(config: dict[str, Any]) -> dict[str, Any]:
    """The sections of a resolved config (``Config.to_dict()``) that decide the weights."""
    return {k: config.get(k) for k in TRAINING_SECTIONS}


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the weight-deciding sections of a resolved config dict, old or new (missing keys take
    their defaults): equal for a model and the params that would train it again."""
    from wpcrack.config import config_from_dict

    return _sha256(training_config(config_from_dict(config).to_dict()))


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint() -> str:
    """sha256 of the source files of ``TRAINING_CODE``, relative path and bytes, in sorted order."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in TRAINING_CODE:
        root = package / part
        files = sorted(root.rglob("*.py")) + sorted(root.rglob("*.txt")) if root.is_dir() else [root]
        for path in files:
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprints(config: dict[str, Any], manifest: Path) -> dict[str, str]:
    """{"config", "data", "code"} hashes of a run about to train (see the module docstring)."""
    from wpcrack.data.manifest import fingerprint

    return {"config": _sha256(training_config(config)), "data": fingerprint(manifest), "code": code_fingerprint()}


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``save`` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise TrainingError(f"{path}: cannot be loaded as a checkpoint ({exc.__class__.__name__}: {exc})") from exc


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random generator training draws from, as tensors and ints."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
