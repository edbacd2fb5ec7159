"""The scale at which the model sees a photo, chosen per image when the user gives none.

A detector learns cracks at the pixel width they had in its training rows; the same crack in a
photo taken closer, or with more megapixels, is wider in pixels, and the model then finds almost
nothing (a DeepCrack photo enlarged 8x: 0.1 IoU at its own size, 75 at 1/8). Users cannot be
expected to know the training data's pixel scale, so ``choose_scale`` searches for it:

- the candidates are a ladder of scales an octave apart (``predict.scale_step``), from the largest
  that the photo may be enlarged by (``predict.max_scale``) down to where its long side is half a
  training row (``predict.min_side_rows`` x the row side that ``train_row_side`` reads from the
  model's own configuration);
- each candidate is scored by the model's own evidence (``predict.evidence``): by default the
  classifier's mean crack probability over the photo's tiles at that scale. Measured on the val
  photos of the three datasets, the classifier is sure of a crack only once the crack is about as
  thin as its training cracks, and stays sure at every smaller scale, so the end of the run of
  scales, coarsest first, at which it is nearly as sure as at its surest (``predict.evidence_share``,
  ``pick``) is where the detector sees the cracks at the width it learned, with the most detail
  left. A model without a classifier head (an ONNX export) scores by the detector's crack
  probability mass instead. Known limits: the mean over tiles leans to coarse scales on a large photo
  whose cracks are sparse (a coarse tile covers more road, so it more often holds a crack), and a
  weak model can take shrunk joints and tar for cracks: the demo's smoke model put its survey photo
  at 1/4 instead of 1 (38.5 IoU at 1, 6.3 at 1/4), by the classifier and by its detector's mass
  alike. Where the pixel size is known, it decides (below). Large levels are scored on
  ``predict.sample_tiles`` tiles spread evenly over the photo, so a 12 MP photo costs a few dozen
  tiles, not a pyramid of full passes;
- the best octave is refined by its half-octave neighbours;
- where the model records the crack width it learned at (``scale.json``, ``wpcrack calibrate``),
  that choice is then checked against the photo itself: the detector's cracks at the chosen scale
  locate them, their width is read from the photo's grey levels (scale-space ridges, ``ridge_width``),
  and the scale moves to the geometric mean (``predict.width_weight``) of the evidence's choice and
  the scale at which the photo's cracks would be as wide as the training rows'. On the val photos
  of the three datasets (``wpcrack generalise MODEL --split val --set predict.width_weight=W``) the
  classifier alone leans coarse for a model that learned several crack widths (``roads``: it is sure
  of a crack at every coarser scale), the width alone is noisy photo by photo, and their mean did
  better than either on the ``roads`` and the DeepCrack model;
- the photo is predicted whole at the winner and ``predict.spread`` octaves above and below it, and
  the three maps are averaged (``spread``): the winner is an estimate, and the mean did better than the
  winner alone on the val photos of the three datasets for the DeepCrack and the CFD model.

The chosen scale is reported per image; a choice at either end of the ladder means the photo's
cracks may lie outside the range the model can be fitted to (``ScaleChoice.at_edge``). Where the
training data records its ground sampling distance (``training_mm_per_pixel``) and the user gives
the photo's (``--mm-per-pixel``), their ratio is the scale and no search is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from wpcrack.deploy.measure import skeleton_length, skeletonize
from wpcrack.geometry import resize_image, resize_map, scaled_size, tile_starts

if TYPE_CHECKING:
    from wpcrack.config import Config

Measure = Callable[[list[np.ndarray], float], float]  # tiles of one scale (uint8 RGB), the scale -> evidence


def train_row_side(cfg: Config) -> int:
    """Side of the square rows the model was trained on: what one view of a photo looked like."""
    from wpcrack.data.prepare import train_size

    return train_size(cfg.prepare, cfg.dataset) if cfg.dataset else cfg.evaluate.tile_size


def training_mm_per_pixel(cfg: Config) -> float | None:
    """Ground size of a training row's pixel, where the training data records one (the synthetic roads;
    the public datasets do not publish theirs)."""
    return cfg.prepare.synthetic.mm_per_pixel if cfg.dataset == "synthetic" else None


def ladder(shape: tuple[int, ...], cfg: Config) -> list[float]:
    """Candidate scales, largest first: powers of ``scale_step`` from ``max_scale`` (or less, so that
    the long side stays within ``max_side`` px) down while the photo's long side stays at least
    ``min_side_rows`` training rows. Powers, not steps from the photo's size: a photo and its
    enlargement by a power of the step are offered the same views."""
    p = cfg.predict
    long_side = max(shape[:2])
    smallest = min(p.min_side_rows * train_row_side(cfg) / long_side, 1.0)  # a small photo is never forced larger
    top = max(min(p.max_scale, p.max_side / long_side), smallest)
    k = math.floor(math.log(top, p.scale_step) + 1e-9)
    scales = [p.scale_step ** k]
    while scales[-1] / p.scale_step >= smallest * (1 - 1e-9):
        scales.append(scales[-1] / p.scale_step)
    return scales


def sample_boxes(height: int, width: int, tile: int, count: int) -> list[tuple[int, int, int, int]]:
    """At most ``count`` tiles spread evenly over an image (all of them when the image has no more)."""
    ys, xs = tile_starts(height, tile, 0), tile_starts(width, tile, 0)
    boxes = [(y, min(y + tile, height), x, min(x + tile, width)) for y in ys for x in xs]
    if len(boxes) <= count:
        return boxes
    picks = np.linspace(0, len(boxes) - 1, count).round().astype(int)
    return [boxes[i] for i in picks]


def view_of(rgb: np.ndarray, box: tuple[int, int, int, int], scale: float) -> np.ndarray:
    """The pixels ``box`` (of the photo resized by ``scale``) would hold, made from the photo's
    region under it alone: a 12 MP photo is never resized whole to be sampled."""
    y0, y1, x0, x1 = box
    h, w = rgb.shape[:2]
    region = rgb[int(y0 / scale):min(h, max(int(y0 / scale) + 1, round(y1 / scale))),
                 int(x0 / scale):min(w, max(int(x0 / scale) + 1, round(x1 / scale)))]
    return resize_image(region, (y1 - y0, x1 - x0))


def evidence(probs: list[np.ndarray], scale: float, threshold: float, kind: str) -> float:
    """How much crack the detector finds at ``scale``, per pixel of the original photo (the
    detector-only evidence kinds).

    ``length``: skeleton length of the thresholded maps x scale / their area, i.e. crack length per
    original pixel (a faithful detector finds the same length at every scale; it finds most where
    the cracks look like its training cracks). ``mass``: probability above the threshold per
    original pixel."""
    area = sum(p.size for p in probs)
    if kind == "mass":
        return float(sum(np.where(p > threshold, p, 0.0).sum() for p in probs) / area)
    return float(sum(skeleton_length(skeletonize(p > threshold)) for p in probs) * scale / area)


@dataclass(frozen=True)
class ScaleChoice:
    """The scale(s) a photo is predicted at (several are averaged) and how they were chosen."""

    scales: tuple[float, ...]
    source: str                                   # "given" (--scale) | "auto" (choose_scale)
    evidence: dict[float, float] = field(default_factory=dict)  # auto: candidate -> its evidence
    at_edge: bool = False                         # auto: the choice is the ladder's first or last scale
    kind: str = ""                                # auto: what the evidence was (predict.evidence)
    crack_width: float | None = None              # auto with width matching: the photo's crack width, px
    evidence_scale: float | None = None           # ... and the scale the evidence alone chose

    @property
    def scale(self) -> float:
        """The one scale, or the geometric mean of several."""
        return float(np.exp(np.mean(np.log(self.scales))))


def pick(scores: dict[float, float], share: float, floor: float = 0.0) -> float:
    """The end of the run of scales, coarsest first, whose evidence is at least ``share`` of the best.

    Going finer, the evidence stays high while the cracks still look like training cracks, then
    falls; the last scale before it falls keeps the most detail. A photo enlarged far beyond its
    detail (a blurred, smooth view) can fool the classifier again, so the run ends at the first
    fall and never jumps to such a scale. Without evidence above ``floor`` anywhere (a crack-free
    photo) the photo stays at scale 1, or the ladder's nearest."""
    top = max(scores.values())
    if top <= floor:
        return min(scores, key=lambda s: abs(math.log(s)))
    ordered = sorted(scores)
    start = next(i for i, s in enumerate(ordered) if scores[s] >= share * top)
    chosen = ordered[start]
    for s in ordered[start + 1:]:
        if scores[s] < share * top:
            break
        chosen = s
    return chosen


def choose_scale(rgb: np.ndarray, cfg: Config, measure: Measure, kind: str) -> ScaleChoice:
    """The scale ``pick`` prefers among the ``ladder``'s, then among it and its half-octave
    neighbours; ``measure`` scores the tiles of one scale (evidence ``kind``)."""
    p = cfg.predict
    tile = cfg.evaluate.tile_size
    scores: dict[float, float] = {}

    def score(scale: float) -> float:
        if scale not in scores:
            boxes = sample_boxes(*scaled_size(rgb.shape, scale), tile, p.sample_tiles)
            scores[scale] = measure([view_of(rgb, box, scale) for box in boxes], scale)
        return scores[scale]

    candidates = ladder(rgb.shape, cfg)
    floor = p.min_crack_probability if kind == "classifier" else 0.0
    best = pick({s: score(s) for s in candidates}, p.evidence_share, floor)
    half = math.sqrt(p.scale_step)
    for neighbour in (best * half, best / half):
        if candidates[-1] <= neighbour <= candidates[0]:
            score(neighbour)
    chosen = pick(scores, p.evidence_share, floor)
    edge = chosen in (candidates[0], candidates[-1]) and len(candidates) > 1 and max(scores.values()) > floor
    return ScaleChoice((chosen,), "auto", dict(sorted(scores.items())), edge, kind)


# --- width matching ------------------------------------------------------------------------------

RIDGE_SIGMAS = tuple(0.7 * 2 ** (k / 3) for k in range(16))  # 0.7 .. 22 px, a third of an octave apart
WIDTH_MEASURE_SIDE = 1024  # crack widths are measured on the photo shrunk to at most this long side


def ridge_width(gray: np.ndarray, where: np.ndarray) -> float | None:
    """Median width, px, of the dark lines through the pixels ``where`` (a skeleton) of ``gray``.

    Scale-space ridge detection: the largest eigenvalue of the Hessian of the photo blurred by
    sigma, times sigma squared, is largest for a dark bar of width w at sigma = w / 2 (Lindeberg
    1998, with gamma 1). It reads the width from the photo's own grey levels, not from how thick the
    detector draws a crack, which saturates at a few pixels. None where nothing is marked."""
    import cv2

    if not where.any():
        return None
    gray = gray.astype(np.float32)
    best = np.full(int(where.sum()), -np.inf, np.float32)
    arg = np.zeros(best.shape, np.int64)
    for i, sigma in enumerate(RIDGE_SIGMAS):
        g = cv2.GaussianBlur(gray, (0, 0), sigma)
        dxx = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3)[where] / 4  # the 3x3 Sobel's second derivative is 4x
        dyy = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3)[where] / 4
        dxy = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3)[where] / 4
        response = sigma * sigma * ((dxx + dyy) + np.sqrt((dxx - dyy) ** 2 + 4 * dxy ** 2)) / 2
        better = response > best
        best[better], arg[better] = response[better], i
    return float(np.median(2 * np.asarray(RIDGE_SIGMAS)[arg]))


def photo_crack_width(rgb: np.ndarray, prob: np.ndarray, threshold: float) -> float | None:
    """The photo's crack width, px of the photo, where ``prob`` (any size) finds cracks: ridge
    widths along the skeleton of its mask, measured on the photo shrunk to ``WIDTH_MEASURE_SIDE``."""
    import cv2

    m = min(1.0, WIDTH_MEASURE_SIDE / max(rgb.shape[:2]))
    size = scaled_size(rgb.shape, m)
    mask = resize_map(prob, size) > threshold
    width = ridge_width(cv2.cvtColor(resize_image(rgb, size), cv2.COLOR_RGB2GRAY), skeletonize(mask))
    return None if width is None else width / m


def match_width(choice: ScaleChoice, photo_width: float | None, trained_width: float, weight: float,
                bounds: tuple[float, float]) -> ScaleChoice:
    """Move the evidence's scale towards the one at which the photo's cracks are as wide as the
    training rows' (``trained_width / photo_width``): their geometric mean, ``weight`` on the width's
    side, within ``bounds``. Without a measured width the evidence's choice stands."""
    if photo_width is None or photo_width <= 0:
        return choice
    by_width = trained_width / photo_width
    scale = math.exp((1 - weight) * math.log(choice.scale) + weight * math.log(by_width))
    scale = float(min(max(scale, bounds[0]), bounds[1]))
    edge = choice.at_edge and scale in bounds
    return ScaleChoice((scale,), choice.source, choice.evidence, edge, choice.kind, photo_width, choice.scale)


def spread(choice: ScaleChoice, octaves: float) -> ScaleChoice:
    """The chosen scale and its neighbours ``octaves`` above and below (their geometric mean stays the
    choice): the choice is an estimate, and on the val photos of DeepCrack, CFD and CRACK500 the mean of
    the three maps beat the chosen scale alone for the DeepCrack and the CFD model (docs/operations.md)."""
    if octaves <= 0:
        return choice
    s, f = choice.scale, 2.0 ** octaves
    return replace(choice, scales=(s / f, s, s * f))
