"""Atomic writes: all or nothing, with the usual file mode."""

import errno
import os

import pytest
import torch

from wpcrack.io import atomic_dir, atomic_path


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """``torch.save`` failing with ENOSPC half-way leaves the last good checkpoint untouched."""
    from wpcrack.train import checkpoint

    target = tmp_path / "checkpoint.pt"
    checkpoint.save(target, {"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(target, {"epoch": 2, "w": torch.zeros(3)})
    assert checkpoint.load(target)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_atomic_path_gives_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("ok")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_atomic_path_flushes_the_file_before_the_rename(tmp_path, monkeypatch):
    """A checkpoint renamed into place must already be on disk (fsync of the file, then its folder)."""
    import os

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "checkpoint.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"weights")
        written = str(tmp)
    assert synced == [written, str(tmp_path)] and target.read_bytes() == b"weights"
