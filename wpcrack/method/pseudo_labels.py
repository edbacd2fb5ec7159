"""Pseudo labels from the classifier's crack CAM (paper 3.3, design.md 3).

``pseudo_labels.method``:
- ``crf``: the paper's denseCRF refinement of the CAM;
- ``darkness``: the locally dark pixels (``wpcrack.method.darkness``) inside the CAM's crack region
  (CAM > ``cam_threshold``; ``cam_gate: component`` keeps each dark blob that reaches into it
  whole). The CAM says where a crack is, the darkness how wide it is: a CAM
  cell is 8 px wide, a crack 1-3 px, and the CRF's smoothness erases thin, faint cracks.
Labels are uint8 {0 crack-free, 1 crack, ``IGNORE`` no loss}; ``ignore_band`` > 0 marks the
pixels that close to a crack label (its uncertain border) ``IGNORE``.

The CRF is the slowest part of a training step at paper scale, so ``CRFPool`` makes the labels in
worker processes while the networks step. This module imports no torch: spawned workers start fast
and stay small.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from wpcrack.config import PseudoLabelConfig
from wpcrack.evaluate.metrics import scores

# unary_from_softmax's clip: -log(1e-5) bounds the unary of a zero probability.
_PROB_CLIP = 1e-5
IGNORE = 255


def make_label(rgb: np.ndarray, cam: np.ndarray, cfg: PseudoLabelConfig) -> np.ndarray:
    """The pseudo label (uint8 HxW: 0, 1 or ``IGNORE``) of an RGB image and its crack CAM in [0, 1]."""
    if rgb.shape[:2] != cam.shape:
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but its CAM is {cam.shape[1]}x{cam.shape[0]}")
    if cfg.method == "darkness":
        from wpcrack.method.darkness import dark_pixels

        label = gate_by_cam(dark_pixels(rgb, cfg.darkness), cam, cfg.cam_threshold, cfg.cam_gate)
    else:
        label = refine(rgb, cam, cfg)
    return with_ignore_band(label, cfg.ignore_band)


def gate_by_cam(dark: np.ndarray, cam: np.ndarray, threshold: float, gate: str) -> np.ndarray:
    """The dark pixels that the CAM calls crack (uint8 {0, 1}).

    ``pixel``: those where CAM > ``threshold``. ``component``: every 8-connected dark blob whose CAM
    peak exceeds ``threshold``, whole. A classifier's CAM lights the most telling stretch of a
    crack, not all of it (CRACK500's crack CAMs shrink as the classifier trains); the dark blob
    carries the crack on to its ends.
    """
    cam = np.asarray(cam, np.float32)
    inside = cam > threshold
    if gate == "pixel":
        return (dark.astype(bool) & inside).astype(np.uint8)
    import cv2

    count, blobs = cv2.connectedComponents(dark.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[np.unique(blobs[inside & (blobs > 0)])] = 1
    return keep[blobs]


def with_ignore_band(label: np.ndarray, band: int) -> np.ndarray:
    """Mark the pixels within ``band`` px of a crack label (and not in it) ``IGNORE``."""
    if band <= 0 or not label.any():
        return label
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    near = cv2.dilate((label == 1).astype(np.uint8), kernel) > 0
    out = label.copy()
    out[near & (label != 1)] = IGNORE
    return out


def crack_pixels(label: np.ndarray) -> int:
    return int(np.count_nonzero(np.asarray(label) == 1))


def refine(rgb: np.ndarray, cam: np.ndarray, cfg: PseudoLabelConfig) -> np.ndarray:
    """Binary crack label (uint8 HxW in {0,1}) from an RGB image and its crack CAM in [0,1].

    As the released code: background score ``(1 - cam) ** bg_power``, unary ``-log`` of the two
    scores (not renormalised; a per-pixel constant does not change mean-field inference), a
    Gaussian and a bilateral pairwise term, ``iterations`` steps, argmax.
    """
    import pydensecrf.densecrf as dcrf

    h, w = cam.shape
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but its CAM is {w}x{h}")
    fg = np.clip(cam.astype(np.float32), 0.0, 1.0)
    bg = np.power(1.0 - fg, cfg.bg_power)
    probs = np.stack([bg, fg]).reshape(2, -1)
    unary = np.ascontiguousarray(-np.log(np.clip(probs, _PROB_CLIP, 1.0)), dtype=np.float32)

    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=cfg.bilateral_sxy,
        srgb=cfg.bilateral_srgb,
        rgbim=np.ascontiguousarray(rgb, dtype=np.uint8),
        compat=cfg.bilateral_compat,
    )
    q = np.asarray(crf.inference(cfg.iterations)).reshape(2, h, w)
    return q.argmax(axis=0).astype(np.uint8)


def _refine_many(rgbs: list[np.ndarray], cams: list[np.ndarray], cfg: PseudoLabelConfig) -> list[np.ndarray]:
    return [make_label(rgb, np.asarray(cam, np.float32), cfg) for rgb, cam in zip(rgbs, cams, strict=True)]


def _compact_cam(cam: np.ndarray) -> np.ndarray:
    """float16 halves what crosses the process boundary and keeps the small values the log needs."""
    return np.ascontiguousarray(cam, dtype=np.float16)


class CRFHandle:
    """Labels of one ``submit`` call, in submission order."""

    def __init__(self, futures: list[Future] | None = None, inline: tuple | None = None):
        self._futures = futures or []
        self._inline = inline

    def result(self) -> list[np.ndarray]:
        if self._inline is not None:
            return _refine_many(*self._inline)
        return [label for future in self._futures for label in future.result()]


class CRFPool:
    """A pool of ``cfg.workers`` pseudo-label processes (``workers: 0`` runs in the caller, at ``result()``).

    Workers are started with ``forkserver`` where available (``spawn`` otherwise): forking a
    process that holds torch's thread pools is unsafe. Each submit is split into one chunk per
    worker to keep the per-call overhead at a handful of messages.
    """

    def __init__(self, cfg: PseudoLabelConfig):
        self.cfg = cfg
        self.workers = max(int(cfg.workers), 0)
        self._executor: ProcessPoolExecutor | None = None
        if self.workers:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)

    def submit(self, rgbs: Sequence[np.ndarray], cams: Sequence[np.ndarray],
               cfg: PseudoLabelConfig | None = None) -> CRFHandle:
        """Queue the pseudo label of each (uint8 HxWx3 image, HxW CAM in [0,1]) pair, made with ``cfg``
        (the pool's settings by default; another for the rows of one source of a composite dataset)."""
        cfg = cfg or self.cfg
        rgbs = [np.ascontiguousarray(r, dtype=np.uint8) for r in rgbs]
        cams = [_compact_cam(c) for c in cams]
        if len(rgbs) != len(cams):
            raise ValueError(f"{len(rgbs)} images but {len(cams)} CAMs")
        if self._executor is None:
            return CRFHandle(inline=(rgbs, cams, cfg))
        chunks = np.array_split(np.arange(len(rgbs)), min(self.workers, len(rgbs))) if rgbs else []
        futures = [
            self._executor.submit(_refine_many, [rgbs[i] for i in idx], [cams[i] for i in idx], cfg)
            for idx in chunks
        ]
        return CRFHandle(futures=futures)

    def warm_up(self) -> None:
        """Start the workers and import pydensecrf in them now, not inside the first timed step."""
        tiny_rgb, tiny_cam = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
        self.submit([tiny_rgb] * max(self.workers, 1), [tiny_cam] * max(self.workers, 1)).result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def confusion(labels: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """int64 [TP, FP, FN] of the crack class, summed over pairs of (label, mask); ``IGNORE`` counts as
    not crack."""
    counts = np.zeros(3, dtype=np.int64)
    for label, mask in zip(labels, masks, strict=True):
        label = np.asarray(label)
        pred, gt = (label > 0) & (label != IGNORE), np.asarray(mask) > 0
        counts += (np.count_nonzero(pred & gt), np.count_nonzero(pred & ~gt), np.count_nonzero(~pred & gt))
    return counts


def iou_of(counts: np.ndarray) -> float:
    """TP / (TP + FP + FN) of [TP, FP, FN] counts by the evaluation's rule (0/0 is 0): one IoU for
    labels, validation and test scores. Callers with no labelled image at all report NaN themselves."""
    return float(scores(np.append(np.asarray(counts, dtype=np.int64), 0))["iou"])


def pseudo_label_iou(labels: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Crack-class IoU of pseudo labels against pixel masks, counts summed over the set.

    Monitoring only: ground truth never reaches a loss.
    """
    return iou_of(confusion(labels, masks))
