"""The champion's files, kept aside while a challenger trains and put back if it is not promoted.

A challenger's ``dvc repro`` rewrites the prepared data, the run's model and results folders and
``dvc.lock``; ``predict --model models/...``, ``benchmark`` and ``report`` read them. They are copied
before the retraining and restored byte for byte when the challenger is rejected or a stage fails.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path


def champion_paths(root: Path, dataset: str, variant: str) -> list[Path]:
    """What a challenger's ``dvc repro`` rewrites and the served model is made of: the prepared
    data, the model and results folders of the run, and ``dvc.lock`` that records their hashes."""
    return [root / "dvc.lock", root / "data" / "prepared" / dataset,
            root / "models" / dataset / variant, root / "results" / dataset / variant]


class Snapshot:
    """A byte-exact copy of ``paths`` (files or folders; missing ones are remembered as missing),
    kept beside the repository until the challenger is decided on. ``restore`` puts every path
    back as it was (and removes what did not exist); ``discard`` drops the copy."""

    def __init__(self, root: Path, paths: list[Path]):
        self.root, self.paths = root, paths
        self.folder = root / ".wpcrack" / "champion" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        self.folder.mkdir(parents=True)
        for path in paths:
            copy = self._copy_of(path)
            if path.is_dir():
                shutil.copytree(path, copy, symlinks=True)
            elif path.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)

    def _copy_of(self, path: Path) -> Path:
        return self.folder / path.relative_to(self.root)

    def restore(self) -> None:
        for path in self.paths:
            copy = self._copy_of(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            if copy.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(copy, path)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
