"""Image and file I/O that fails with the file's name and never leaves half-written outputs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wpcrack.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",), "bmp": (b"BM",),
              "tiff": (b"II*\x00", b"MM\x00*")}


def image_format(head: bytes) -> str | None:
    """The image format the first bytes of a file announce (png, jpeg, bmp, tiff), or None."""
    return next((fmt for fmt, sigs in SIGNATURES.items() if head.startswith(sigs)), None)


def is_complete(data: bytes, fmt: str | None) -> bool:
    """JPEG ends with its EOI marker, PNG with its IEND chunk (interrupted uploads and copies do not;
    OpenCV decodes such files anyway, grey where the bytes are missing)."""
    if fmt == "jpeg":
        return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt == "png":
        return b"IEND" in data[-16:]
    return True


def _decode(path: Path, flags: int) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise DataError(path, "file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise DataError(path, "file is empty")
    img = cv2.imdecode(data, flags)
    if img is None:
        raise DataError(path, "cannot be decoded as an image (corrupt or not an image)")
    return img


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 array HxWx3 (grey images are expanded, alpha is dropped)."""
    import cv2

    img = _decode(Path(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, shape: tuple[int, int] | None = None, threshold: int = 127) -> np.ndarray:
    """Binary mask uint8 HxW in {0,1}; ``> threshold`` on 8-bit values (1-bit PNGs map 1 -> 255).

    ``shape`` (H, W), when given, must match, otherwise the mask belongs to another image.
    """
    import cv2

    path = Path(path)
    mask = _decode(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.dtype == bool or (mask.max() <= 1 and mask.dtype == np.uint8):
        mask = mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8:
        mask = (mask.astype(np.float64) / max(float(mask.max()), 1.0) * 255).astype(np.uint8)
    if shape is not None and tuple(mask.shape[:2]) != tuple(shape):
        raise DataError(path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return (mask > threshold).astype(np.uint8)


def read_probability(path: str | Path) -> np.ndarray:
    """An 8-bit prediction (0/255 or probabilities) as float32 in [0,1]."""
    import cv2

    img = _decode(Path(path), cv2.IMREAD_GRAYSCALE)
    return img.astype(np.float32) / 255.0


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted; an empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder")
    return files


def _umask() -> int:
    """The process umask (mkstemp creates 0600 files; outputs should get the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The file's data and the folder entry are flushed to disk (fsync) around the rename, so a power
    loss leaves either the old file or the complete new one, never a renamed empty one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; folders cannot be opened on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_image(path: str | Path, array: np.ndarray) -> None:
    """Write an image atomically (RGB arrays are converted to OpenCV's BGR)."""
    import cv2

    path = Path(path)
    img = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, buf = cv2.imencode(path.suffix or ".png", img)
    if not ok:
        raise DataError(path, "could not encode image")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
