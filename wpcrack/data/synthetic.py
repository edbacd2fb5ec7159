"""Procedural road photos with thin cracks, the road marks that look like cracks, and exact masks.

The demo and the tests need crack data that is free, instant and shaped like the real task: cracks
1-3 px wide whose contrast fades in and out along them, on asphalt with aggregate at several scales,
uneven light, cast shadows, oil stains, wet patches, sealed joints, tar-sealed cracks, tyre marks and
lane paint. The marks appear alike in crack and crack-free images (docs/data.md), as on real roads,
where "dark" or "line-shaped" does not mean "crack". All sizes are in pixels of one ground scale, so a
training image and a survey photo of thousands of pixels a side are the same road through windows of
two sizes. Every image is a pure function of its seed and index, so the data set is identical on every
machine and in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_SURVEY_ID = 3  # the survey photo's own random stream, apart from the data set's splits
_STEP = 3.0  # px between the vertices of a crack's path


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


@dataclass(frozen=True)
class Marks:
    """How many of each non-crack road mark a scene holds (the same law for crack and crack-free images)."""

    shadows: int = 0
    pole_shadows: int = 0
    oil: int = 0
    wet: int = 0
    joints: int = 0
    sealed: int = 0
    tyre: int = 0
    paint: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Marks:
        """The marks of one training-sized image: most images get at least one line-like mark."""
        return cls(shadows=int(rng.random() < 0.3), pole_shadows=int(rng.random() < 0.2),
                   oil=int(rng.poisson(0.5)), wet=int(rng.random() < 0.2), joints=int(rng.random() < 0.3),
                   sealed=int(rng.random() < 0.2), tyre=int(rng.random() < 0.2), paint=int(rng.random() < 0.25))


def _smooth(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean noise whose blobs are about ``cell`` px across (a random grid, cubically upsampled)."""
    gh, gw = int(h / cell) + 4, int(w / cell) + 4
    grid = rng.normal(0.0, 1.0, (gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    oy, ox = (int(v) for v in rng.integers(0, max(int(cell), 1), 2))
    return big[oy:oy + h, ox:ox + w]


def _grain(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Unit-variance noise blurred with ``sigma`` px (0: white), for texture finer than ``_smooth``."""
    noise = rng.standard_normal((h, w), dtype=np.float32)
    if sigma <= 0:
        return noise
    return cv2.GaussianBlur(noise, (0, 0), sigma) * (2.0 * np.sqrt(np.pi) * sigma)


def asphalt(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey float32 HxW around 0.35-0.6: grain, aggregate stones of three sizes, worn patches."""
    grey = np.full((h, w), rng.uniform(0.35, 0.6), np.float32)
    for sigma, amp in ((0.0, 0.03), (1.0, 0.03), (3.0, 0.03)):
        grey += amp * _grain(rng, h, w, sigma)
    grey += 0.03 * _smooth(rng, h, w, rng.uniform(20, 40))  # worn and patched areas
    for radius, density in ((0.8, 0.02), (1.5, 0.008), (2.5, 0.002)):  # stones: mostly light, some dark pores
        points = np.zeros((h, w), np.float32)
        count = int(rng.poisson(density * h * w))
        ys, xs = rng.integers(0, h, count), rng.integers(0, w, count)
        points[ys, xs] = rng.choice([0.12, -0.1], count, p=[0.7, 0.3]) * (2 * np.pi * radius ** 2)
        grey += cv2.GaussianBlur(points, (0, 0), radius)
    return grey


def _line_band(h: int, w: int, rng: np.random.Generator, width: float, bend: float) -> np.ndarray:
    """float32 HxW in [0,1]: a straight or gently bent band of ``width`` px crossing the image."""
    band = np.zeros((h, w), np.float32)
    angle = rng.choice([0.0, np.pi / 2]) + rng.normal(0.0, 0.25)  # mostly along or across the road
    centre = rng.uniform(0.1, 0.9, 2) * (w, h)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    reach = 2 * (h + w)
    ts = np.linspace(-reach, reach, 33)
    points = centre + ts[:, None] * direction + (bend * (ts / reach) ** 2 * reach * 0.02)[:, None] * normal
    sub = 8  # sub-pixel positions: drawn at 1/8 px (shift 3)
    cv2.polylines(band, [np.round(points * sub).astype(np.int32)], False, 1.0,
                  max(int(round(width)), 1), cv2.LINE_AA, shift=3)
    return cv2.GaussianBlur(band, (0, 0), 0.6)


def _blob(rng: np.random.Generator, shape: tuple[int, int], size: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    """An irregular blob about ``size`` px across somewhere in an image of ``shape``: float32 values in
    [0,1] and the window of the image they cover."""
    h, w = shape
    r = int(size) + 2
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, h), max(cx - r, 0), min(cx + r, w)
    yy, xx = np.mgrid[y0 - cy:y1 - cy, x0 - cx:x1 - cx].astype(np.float32)
    a, b = size * rng.uniform(0.35, 0.6), size * rng.uniform(0.2, 0.5)
    t = rng.uniform(0, np.pi)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    edge = 0.35 * _smooth(rng, y1 - y0, x1 - x0, max(size / 4, 3.0))
    return np.clip((1.0 + edge - radius) * 4.0, 0.0, 1.0), (slice(y0, y1), slice(x0, x1))


def _region(rng: np.random.Generator, h: int, w: int, cell: float, cover: float) -> np.ndarray:
    """float32 HxW in [0,1]: about ``cover`` of the image inside a smooth irregular region."""
    field = _smooth(rng, h, w, cell) + rng.uniform(-0.5, 0.5) * np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    level = np.quantile(field, 1.0 - cover)
    return np.clip((field - level) * 6.0, 0.0, 1.0)


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float, wiggle: float) -> np.ndarray:
    """A meandering polyline: constant step, heading wandering around ``angle`` (an AR(1) walk)."""
    steps = rng.normal(0.0, wiggle, max(int(length / _STEP), 2))
    drift = np.zeros(len(steps))
    for i, step in enumerate(steps):
        drift[i] = (0.97 * drift[i - 1] if i else 0.0) + step
    angles = angle + drift
    moves = _STEP * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _profile(rng: np.random.Generator, n: int, reach: float) -> np.ndarray:
    """Smooth values in [0.2, 1] along ``n`` vertices, changing over about ``reach`` vertices."""
    knots = rng.normal(0.75, 0.4, int(n / reach) + 3).astype(np.float32)
    line = cv2.resize(knots[None, :], (int(n / reach + 3) * 8, 1), interpolation=cv2.INTER_CUBIC)[0]
    return np.clip(np.interp(np.linspace(0, len(knots) - 3, n) * 8, np.arange(len(line)), line), 0.2, 1.0)


def _draw_path(depth: np.ndarray, mask: np.ndarray, points: np.ndarray, width: int, darkness: np.ndarray) -> None:
    """Draw a path segment by segment: width tapers to 1 px at the ends, darkness varies along it."""
    n = len(points) - 1
    ends = max(n // 6, 1)
    for i in range(n):
        wi = width if ends <= i < n - ends else max(width - 1, 1)
        p0, p1 = (tuple(int(v) for v in np.round(p)) for p in (points[i], points[i + 1]))
        cv2.line(depth, p0, p1, float(darkness[i]), wi, cv2.LINE_8)
        cv2.line(mask, p0, p1, 1, wi, cv2.LINE_8)


def add_crack(rng: np.random.Generator, depth: np.ndarray, mask: np.ndarray, start: np.ndarray,
              length: float) -> None:
    """One crack of ``length`` px from ``start`` with up to three shorter branches, 1-3 px wide; its
    contrast fades in and out along it (``depth``: the darkening, ``mask``: every crack pixel)."""
    main = _walk(rng, start, rng.uniform(0, 2 * np.pi), length, rng.uniform(0.08, 0.2))
    base = rng.uniform(0.45, 0.75)
    paths = [(main, int(rng.integers(2, 4)))]
    for _ in range(rng.integers(0, 4)):
        origin = main[rng.integers(0, len(main))]
        paths.append((_walk(rng, origin, rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45) * length, 0.25),
                       int(rng.integers(1, 3))))
    for points, width in paths:
        _draw_path(depth, mask, points, width, base * _profile(rng, len(points) - 1, rng.uniform(5, 12)))


def _light(rng: np.random.Generator, h: int, w: int, marks: Marks, scale: float) -> np.ndarray:
    """Multiplicative light: a gradient, slow unevenness, cast shadows with soft edges, pole shadows."""
    gx, gy = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :], np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    light = 1.0 + rng.uniform(-0.3, 0.3) * gx + rng.uniform(-0.3, 0.3) * gy
    light *= 1.0 + 0.06 * _smooth(rng, h, w, 60.0 * scale)
    shade = np.zeros((h, w), np.float32)
    for _ in range(marks.shadows):  # trees, vehicles, buildings: large regions with a soft edge
        region = _region(rng, h, w, rng.uniform(25, 60) * scale, rng.uniform(0.2, 0.6))
        shade = np.maximum(shade, rng.uniform(0.25, 0.5) * cv2.GaussianBlur(region, (0, 0), rng.uniform(0.8, 3.0)))
    for _ in range(marks.pole_shadows):  # poles and signs: long straight bands
        band = _line_band(h, w, rng, rng.uniform(4, 14), rng.normal(0, 1))
        shade = np.maximum(shade, rng.uniform(0.2, 0.45) * cv2.GaussianBlur(band, (0, 0), rng.uniform(0.5, 2.0)))
    return light * (1.0 - shade)


def _surface_marks(rng: np.random.Generator, grey: np.ndarray, marks: Marks, scale: float) -> np.ndarray:
    """Paint, tar, stains and tyre marks laid on the asphalt (before the cracks that cross them)."""
    h, w = grey.shape
    for _ in range(marks.wet):  # wet patches: darker, and smoother as water fills the texture
        region = cv2.GaussianBlur(_region(rng, h, w, rng.uniform(15, 35) * scale, rng.uniform(0.15, 0.45)), (0, 0), 2.0)
        smooth = cv2.GaussianBlur(grey, (0, 0), 1.5)
        grey = grey * (1 - region) + smooth * region * rng.uniform(0.65, 0.85)
    for _ in range(marks.oil):  # oil stains: dark irregular blobs with fairly sharp edges
        blob, window = _blob(rng, (h, w), rng.uniform(10, 45))
        grey[window] *= 1.0 - rng.uniform(0.2, 0.5) * blob
    for _ in range(marks.tyre):  # tyre marks: wide, faint, soft bands
        band = cv2.GaussianBlur(_line_band(h, w, rng, rng.uniform(10, 25), rng.normal(0, 3)), (0, 0), 3.0)
        grey = grey * (1.0 - rng.uniform(0.06, 0.15) * band)
    tar = rng.uniform(0.1, 0.2) + 0.02 * _grain(rng, h, w, 1.0) if marks.joints or marks.sealed else 0.0
    for _ in range(marks.joints):  # sealed joints: straight tar bands 3-8 px wide
        band = _line_band(h, w, rng, rng.uniform(3, 8), rng.normal(0, 0.5))
        grey = grey * (1 - band) + tar * band
    for _ in range(marks.sealed):  # tar-sealed cracks: a crack's meander, but 6-12 px of smooth tar
        band = np.zeros((h, w), np.float32)
        path = _walk(rng, rng.uniform(0.2, 0.8, 2) * (w, h), rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 2.0) * 96, 0.15)
        cv2.polylines(band, [np.round(path).astype(np.int32)], False, 1.0, int(rng.integers(6, 13)), cv2.LINE_AA)
        band = cv2.GaussianBlur(band, (0, 0), 0.8)
        grey = grey * (1 - band) + tar * band
    for _ in range(marks.paint):  # lane paint: bright, worn, sharp-edged; often a dark seam along an edge
        band = _line_band(h, w, rng, rng.uniform(12, 40), rng.normal(0, 0.3))
        wear = np.clip(0.9 + 0.15 * _smooth(rng, h, w, 4.0) + 0.1 * _grain(rng, h, w, 0.0), 0.4, 1.0)
        grey = grey * (1 - band * wear) + rng.uniform(0.75, 0.92) * band * wear
        if rng.random() < 0.5:
            edge = np.clip(cv2.dilate(band, np.ones((3, 3), np.uint8)) - band, 0, 1)
            grey = grey * (1.0 - rng.uniform(0.2, 0.4) * edge)
    return grey


def render(rng: np.random.Generator, h: int, w: int, marks: Marks, cracks: list[tuple[np.ndarray, float]],
           scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 HxWx3 and mask uint8 HxW {0,1} of one road scene.

    ``cracks``: (start point, length in px) per crack. ``scale`` enlarges the things that span a
    training image (shadows, wet patches, the light's unevenness) for photos much larger than one;
    the rest keeps its pixel sizes.
    """
    grey = _surface_marks(rng, asphalt(rng, h, w), marks, scale)
    depth = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    for start, length in cracks:
        add_crack(rng, depth, mask, start, length)
    grey = grey * (1.0 - depth) * _light(rng, h, w, marks, scale)
    grey = cv2.GaussianBlur(grey, (0, 0), 0.5)  # the camera's optics: no edge is a perfect step
    tint = 1.0 + rng.uniform(-0.04, 0.04, 3).astype(np.float32)  # slightly warm or cold asphalt
    surface = grey[..., None] * tint + 0.012 * rng.standard_normal((h, w, 3), dtype=np.float32)
    rgb = np.clip(surface * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb, mask


def make_image(seed: int, split: str, index: int, size: int, crack: bool) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 HxWx3 and mask uint8 HxW {0,255} of one training-sized image (1-3 cracks if ``crack``)."""
    rng = _rng(seed, split, index)
    marks = Marks.draw(rng)
    cracks = [(rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0.6, 1.3) * 96)
              for _ in range(rng.integers(1, 4) if crack else 0)]
    rgb, mask = render(rng, size, size, marks, cracks)
    return rgb, mask * 255


def survey_photo(seed: int, height: int = 3000, width: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """A large road photo at the training images' pixel scale (cracks 1-3 px wide, as in training):
    a lane line, joints, a cast shadow, stains, tyre marks and a few dozen cracks, some long."""
    rng = np.random.default_rng([seed, _SURVEY_ID])
    area = height * width / 96 ** 2
    marks = Marks(shadows=2, pole_shadows=1, oil=int(rng.poisson(0.02 * area)), wet=1, joints=2, sealed=2,
                  tyre=2, paint=1)
    cracks = [(rng.uniform(0.05, 0.95, 2) * (width, height), rng.uniform(0.6, 6.0) * 96)
              for _ in range(max(int(0.03 * area), 3))]
    return render(rng, height, width, marks, cracks, scale=min(height, width) / 160)


def write_survey_photo(out: Path, seed: int = 0, height: int = 2400, width: int = 3200) -> Path:
    """Write ``survey_photo`` to ``out`` and its true mask ({0,255}) beside it as ``<stem>_truth.png``."""
    from wpcrack.errors import DataError
    from wpcrack.io import write_image

    if min(height, width) < 96:
        raise DataError(out, f"a survey photo needs at least 96 px a side, got {height}x{width}")
    rgb, mask = survey_photo(seed, height, width)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_image(out, rgb)
    truth = out.with_name(f"{out.stem}_truth.png")
    write_image(truth, mask * 255)
    print(f"wpcrack survey-photo: {width}x{height} px, {int(mask.sum())} crack pixels -> {out} (mask: {truth})")
    return out
