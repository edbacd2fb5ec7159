"""Segmentation metrics: confusion counts first, then a *named* reduction (design.md 1).

Crack papers blur "counts summed over the test set" and "mean of per-image scores"; here each is a
reduction with a name, so a table always says which one it reports:

- ``dataset``: TP, FP, FN, TN summed over every pixel of the whole test set, then precision,
  recall, accuracy, F1 = 2PR/(P+R) and crack IoU = TP/(TP+FP+FN). This is the paper's protocol and
  gives the primary metrics.
- ``per_image``: the same scores per image, then their mean (an extra).

Zero denominators: a ratio whose denominator is 0 is 0 (a set with no crack pixel and no
predicted crack pixel has precision = recall = F1 = IoU = 0 under ``dataset``), except that under
``per_image`` an image with an empty ground truth *and* an empty prediction is perfect
(precision = recall = F1 = IoU = 1): the model did exactly the right thing on it.

Binarisation: a pixel is crack when its probability is ``> threshold``. Probabilities given as
8-bit images are ``value / 255`` (float64), so threshold 0.5 is ``value > 127`` exactly
(127/255 < 0.5 < 128/255). Ground truth is binary already (``wpcrack.io.read_mask``: ``> 127``).

Resize rule (DeepCrack is scored at 256x256): ground truth is resized with nearest-neighbour
interpolation (``cv2.INTER_NEAREST``, as the verified protocol does; on a binary mask this equals
thresholding after the resize), a prediction of another size is resized *bilinearly as a
probability map* before thresholding, so a thin crack does not vanish or thicken by pixel picking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from wpcrack.errors import WpcrackError
from wpcrack.geometry import resize_map, resize_mask

PRIMARY = ("precision", "recall", "accuracy", "f1", "iou")


class Confusion(NamedTuple):
    """Pixel counts of the crack class."""

    tp: int
    fp: int
    fn: int
    tn: int


def confusion(pred_bin: np.ndarray, gt_bin: np.ndarray) -> Confusion:
    """Counts of one image; both arrays are boolean-like (nonzero = crack) and of one shape."""
    pred, gt = np.asarray(pred_bin).astype(bool), np.asarray(gt_bin).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return Confusion(tp, fp, fn, gt.size - tp - fp - fn)


def as_probability(pred: np.ndarray) -> np.ndarray:
    """float64 probabilities: uint8 images are divided by 255, floats kept, booleans are 0/1."""
    pred = np.asarray(pred)
    if pred.dtype == np.uint8:
        return pred.astype(np.float64) / 255.0
    return pred.astype(np.float64)


def binarize(pred: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Crack where probability > threshold (see module docstring for 8-bit inputs)."""
    return as_probability(pred) > threshold


def resize_gt(gt_bin: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Binary mask to (H, W) with nearest-neighbour interpolation (the DeepCrack protocol)."""
    if gt_bin.shape == tuple(size):
        return gt_bin
    return resize_mask(np.asarray(gt_bin, dtype=np.uint8), size)


def resize_probability(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Probability map to (H, W), bilinear on values in [0,1]; unchanged (exact) when it fits."""
    return resize_map(as_probability(pred), size).astype(np.float64)


def align(pred: np.ndarray, gt_bin: np.ndarray, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probability, gt) at the evaluation size: ``size`` x ``size`` or, when None, the GT's own.

    Without ``size`` the prediction must already have the ground truth's shape: a silent resize
    would hide a prediction that belongs to another image.
    """
    if size is not None:
        target = (int(size), int(size))
        return resize_probability(pred, target), resize_gt(gt_bin, target)
    if np.shape(pred) != np.shape(gt_bin):
        raise WpcrackError(
            f"prediction is {np.shape(pred)[1]}x{np.shape(pred)[0]} but ground truth is "
            f"{gt_bin.shape[1]}x{gt_bin.shape[0]} (give an evaluation size to resize both)"
        )
    return as_probability(pred), gt_bin


def pr_thresholds(n: int) -> np.ndarray:
    """``n`` evenly spaced thresholds k/(n-1) in [0, 1], computed as exact ratios (0.5 is one when n is odd)."""
    if n < 2:
        raise ValueError(f"need at least 2 PR thresholds, got {n}")
    return np.arange(n, dtype=np.float64) / (n - 1)


def sweep(prob: np.ndarray, gt_bin: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Counts at every threshold as int64 [T, 4] (tp, fp, fn, tn), exact for ``prob > t``."""
    prob = as_probability(prob).ravel()
    gt = np.asarray(gt_bin).astype(bool).ravel()
    pos, neg = np.sort(prob[gt]), np.sort(prob[~gt])
    tp = pos.size - np.searchsorted(pos, thresholds, side="right")
    fp = neg.size - np.searchsorted(neg, thresholds, side="right")
    return np.stack([tp, fp, pos.size - tp, neg.size - fp], axis=-1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def scores(counts: np.ndarray, empty_is_perfect: bool = False) -> dict[str, np.ndarray]:
    """Fractions from counts [..., 4]; 0/0 is 0, or 1 for images with no crack anywhere if asked."""
    c = np.asarray(counts, dtype=np.int64)
    tp, fp, fn, tn = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    out = {
        "precision": precision,
        "recall": recall,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": _ratio(2 * precision * recall, precision + recall),
        "iou": _ratio(tp, tp + fp + fn),
        "background_iou": _ratio(tn, tn + fp + fn),
    }
    if empty_is_perfect:
        empty = (tp + fp + fn) == 0
        for key in ("precision", "recall", "f1", "iou"):
            out[key] = np.where(empty, 1.0, out[key])
    return out


def _dataset(counts: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in scores(np.asarray(counts).reshape(-1, 4).sum(axis=0)).items()}


def _per_image(counts: np.ndarray) -> dict[str, float]:
    per = scores(np.asarray(counts).reshape(-1, 4), empty_is_perfect=True)
    return {k: float(v.mean()) if v.size else 0.0 for k, v in per.items()}


REDUCTIONS: dict[str, Callable[[np.ndarray], dict[str, float]]] = {
    "dataset": _dataset,
    "per_image": _per_image,
}


def reduce(counts: np.ndarray, reduction: str = "dataset") -> dict[str, float]:
    """Scores (fractions) of per-image counts [N, 4] under a named reduction."""
    try:
        fn = REDUCTIONS[reduction]
    except KeyError:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}") from None
    return fn(counts)


class ConfusionAccumulator:
    """Per-image counts at the evaluation threshold and over a threshold sweep, for a whole test set."""

    def __init__(self, threshold: float = 0.5, n_thresholds: int = 51):
        self.threshold = float(threshold)
        self.thresholds = pr_thresholds(n_thresholds)
        self._counts: list[Confusion] = []
        self._sweeps: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, pred: np.ndarray, gt_bin: np.ndarray) -> Confusion:
        """Add one image (probabilities or 8-bit values, and a binary mask of the same shape)."""
        prob = as_probability(pred)
        counts = confusion(prob > self.threshold, gt_bin)
        self._counts.append(counts)
        self._sweeps.append(sweep(prob, gt_bin, self.thresholds))
        return counts

    @property
    def counts(self) -> np.ndarray:
        """Per-image counts, int64 [N, 4]."""
        return np.asarray(self._counts, dtype=np.int64).reshape(-1, 4)

    @property
    def total(self) -> Confusion:
        return Confusion(*(int(v) for v in self.counts.sum(axis=0)))

    def pr_curve(self) -> list[dict[str, float]]:
        """Dataset-reduced precision, recall, F1 and IoU at each sweep threshold (fractions)."""
        if not self._sweeps:
            return []
        s = scores(np.sum(self._sweeps, axis=0))
        return [
            {"threshold": float(t), **{k: float(s[k][i]) for k in ("precision", "recall", "f1", "iou")}}
            for i, t in enumerate(self.thresholds)
        ]

    def ods(self) -> tuple[float, float]:
        """(best dataset F1 over the sweep, its threshold): the optimal dataset scale; ties go to the lowest."""
        if not self._sweeps:
            return 0.0, self.threshold
        f1 = scores(np.sum(self._sweeps, axis=0))["f1"]
        best = int(np.argmax(f1))
        return float(f1[best]), float(self.thresholds[best])

    def ois(self) -> float:
        """Mean over images of each image's best F1 over the sweep (per-image 0/0 convention)."""
        if not self._sweeps:
            return 0.0
        f1 = scores(np.stack(self._sweeps), empty_is_perfect=True)["f1"]
        return float(f1.max(axis=1).mean())

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        """Primary metrics and labelled extras, in percent (raw floats), plus the summed counts."""
        counts = self.counts
        data, per = reduce(counts, "dataset"), reduce(counts, "per_image")
        ods_f1, ods_t = self.ods()
        out: dict = {k: 100.0 * data[k] for k in PRIMARY}
        out.update(
            extra_miou=100.0 * (data["iou"] + data["background_iou"]) / 2.0,
            extra_ods_f1=100.0 * ods_f1,
            extra_ods_threshold=ods_t,
            extra_ois_f1=100.0 * self.ois(),
            extra_per_image_f1=100.0 * per["f1"],
            extra_per_image_iou=100.0 * per["iou"],
            images=len(self),
            threshold=self.threshold,
            counts=self.total._asdict(),
        )
        return out


def format_table(rows: dict[str, dict], keys: tuple[str, ...] | None = None, label: str = "mode") -> str:
    """A Markdown table of summaries, percent with three decimals (the paper's format)."""
    keys = keys or PRIMARY + ("extra_miou", "extra_ods_f1", "extra_ois_f1", "extra_per_image_f1", "extra_per_image_iou")
    header = f"| {label} | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for name, summary in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{summary[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


SUMMARY_KEYS = ("precision", "recall", "f1", "iou")


def summary_row(scores: dict, train_seconds: float | None = None) -> dict:
    """The few figures compared between runs (``dvc metrics show``/``diff``; one file per run):
    test precision, recall, F1 and IoU in percent, rounded to 0.01, and training minutes."""
    row = {k: round(float(scores[k]), 2) for k in SUMMARY_KEYS}
    if train_seconds:
        row["train_min"] = round(train_seconds / 60.0, 1)
    return row
