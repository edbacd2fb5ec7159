"""Procedural road images with thin, branching, low-contrast cracks and their exact masks.

The demo and the tests need crack data that is free, instant and shaped like the real task: cracks
1-3 px wide on a textured, unevenly lit surface, with stains that look like defects but are not
(so an image-level classifier cannot just detect "something dark"). Every image is a pure function
of (seed, split, index), so the data set is identical on every machine and in any order.
"""

from __future__ import annotations

import cv2
import numpy as np

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def road_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Asphalt-like float32 RGB in [0,1]: multi-scale noise, aggregate speckle, stains, light gradient."""
    h = w = size
    base = rng.uniform(0.38, 0.62)
    grey = np.full((h, w), base, np.float32)
    for sigma, amp in ((0.0, 0.035), (1.0, 0.04), (4.0, 0.05)):  # fine grain to coarse patches
        noise = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
        if sigma:
            noise = cv2.GaussianBlur(noise, (0, 0), sigma)
            noise /= noise.std() + 1e-6
        grey += amp * noise
    speckle = rng.random((h, w)) < 0.02  # bright/dark aggregate stones
    grey[speckle] += rng.choice([-0.12, 0.12], int(speckle.sum())).astype(np.float32)
    stains = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(0, 4)):  # oil/water stains: soft dark blobs, never crack-shaped
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(size // 12 + 1, size // 4 + 2)), int(rng.integers(size // 12 + 1, size // 4 + 2)))
        cv2.ellipse(stains, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.05, 0.15)), -1)
    grey -= cv2.GaussianBlur(stains, (0, 0), max(size / 24, 1.0))
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32) / size
    grey *= 1.0 + rng.uniform(-0.25, 0.25) * (gx - 0.5) + rng.uniform(-0.25, 0.25) * (gy - 0.5)
    tint = 1.0 + rng.uniform(-0.04, 0.04, 3).astype(np.float32)  # slightly warm or cold asphalt
    return np.clip(grey[..., None] * tint, 0.0, 1.0)


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float, step: float) -> np.ndarray:
    """A meandering polyline: constant step, heading drifting by a random walk."""
    points = [start]
    for _ in range(max(int(length / step), 2)):
        angle += rng.normal(0.0, 0.2)
        points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(points)


def crack_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 {0,1} mask of 1-3 cracks, each a random walk with a few shorter branches, 1-3 px wide."""
    mask = np.zeros((size, size), np.uint8)
    step = max(size / 32, 1.5)
    for _ in range(rng.integers(1, 4)):
        start = rng.uniform(0.15, 0.85, 2) * size
        main = _walk(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.3) * size, step)
        paths = [(main, 2)]  # main crack 2-3 px, branches 1-2 px
        for _ in range(rng.integers(0, 4)):
            origin = main[rng.integers(0, len(main))]
            heading = rng.uniform(0, 2 * np.pi)
            paths.append((_walk(rng, origin, heading, rng.uniform(0.15, 0.45) * size, step), int(rng.integers(1, 3))))
        for points, width in paths:
            cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, int(width), cv2.LINE_8)
    return mask


def make_image(seed: int, split: str, index: int, size: int, crack: bool) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 HxWx3 and mask uint8 HxW {0,255}; crack pixels are darkened only inside the mask."""
    rng = _rng(seed, split, index)
    surface = road_texture(rng, size)
    mask = crack_mask(rng, size) if crack else np.zeros((size, size), np.uint8)
    if crack:
        depth = rng.uniform(0.45, 0.7) * (0.8 + 0.2 * rng.random((size, size))).astype(np.float32)
        surface *= 1.0 - (mask * depth)[..., None]  # 35-70 % darker: visible, as on a road photo
    surface += rng.normal(0.0, 0.015, surface.shape).astype(np.float32)  # sensor noise over all
    rgb = np.clip(surface * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb, mask * 255
