"""Image geometry that preparation, training, inference and prediction share.

Resizing (one rule per kind of map), the grid cut of CFD photos into patches and the overlapping
tiles of large photos with their blend weights live here once, so that evaluation and ``predict``
cut and rescale exactly as preparation did. Sizes are ``(height, width)``, numpy's order.
"""

from __future__ import annotations

import cv2
import numpy as np

AREA, LINEAR, CUBIC, NEAREST = cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST


def scaled_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(height, width) of an image of ``shape`` rescaled by ``scale``, at least 1 px each."""
    h, w = shape[:2]
    return max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)


def resize_image(rgb: np.ndarray, size: tuple[int, int], enlarge: int = LINEAR, shrink: int = AREA) -> np.ndarray:
    """An image to ``size``: ``shrink`` (area averaging: no aliasing) when neither side grows, else
    ``enlarge``; unchanged when it already has that size."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    interpolation = shrink if h <= rgb.shape[0] and w <= rgb.shape[1] else enlarge
    return cv2.resize(rgb, (w, h), interpolation=interpolation)


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """A photo to the stored square size: area averaging when shrinking, cubic when enlarging
    (preparation, and evaluation of test images at the training rows' scale)."""
    return resize_image(rgb, (size, size), enlarge=CUBIC)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map (HxW or HxWxK) to ``size`` by nearest neighbour: labels stay labels."""
    h, w = size
    if mask.shape[:2] == (h, w):
        return mask
    out = cv2.resize(np.ascontiguousarray(mask), (w, h), interpolation=NEAREST)
    return out.reshape(h, w, *mask.shape[2:])


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map (probabilities, CAMs) to ``size``, bilinear, as float32; unchanged when it fits."""
    h, w = size
    if values.shape == (h, w):
        return values
    return cv2.resize(values.astype(np.float32), (w, h), interpolation=LINEAR)


def grid_cells(height: int, width: int, grid: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of a grid x grid cut, row-major; evaluation must cut CFD test images the same way."""
    ys = np.linspace(0, height, grid + 1).round().astype(int)
    xs = np.linspace(0, width, grid + 1).round().astype(int)
    return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(grid) for c in range(grid)]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride ``tile - overlap``, the last tile flush with the end."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile size {tile})")
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the overlapping tiles that cover an image, row-major."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, y + th, x, x + tw) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def _ramp(n: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    """1 inside, linear ramps over ``overlap`` pixels on sides shared with a neighbour, never 0."""
    w = np.ones(n, dtype=np.float32)
    if overlap > 0:
        ramp = np.arange(1, min(overlap, n) + 1, dtype=np.float32) / (overlap + 1)
        if rise:
            w[: ramp.size] = np.minimum(w[: ramp.size], ramp)
        if fall:
            w[n - ramp.size:] = np.minimum(w[n - ramp.size:], ramp[::-1])
    return w


def tile_weights(box: tuple[int, int, int, int], height: int, width: int, overlap: int) -> np.ndarray:
    """Blend window of one tile: ramps down towards the seams it shares with neighbours, so tile
    borders (zero-padded context) count less where another tile covers the same pixels."""
    y0, y1, x0, x1 = box
    return np.outer(_ramp(y1 - y0, overlap, y0 > 0, y1 < height), _ramp(x1 - x0, overlap, x0 > 0, x1 < width))
