"""Qualitative figure like the paper's Figs. 4-5: input, ground truth, crack CAM, pseudo label, prediction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wpcrack.io import atomic_path

COLUMNS = ("input", "ground truth", "crack CAM", "pseudo label (CAM + CRF)", "prediction")


@dataclass(frozen=True)
class FigureRow:
    """One test image at its evaluation resolution."""

    name: str
    rgb: np.ndarray      # uint8 HxWx3
    gt: np.ndarray       # {0,1} HxW
    cam: np.ndarray      # [0,1] HxW
    pseudo: np.ndarray   # {0,1} HxW
    prob: np.ndarray     # [0,1] HxW


def pick_rows(n_images: int, count: int) -> list[int]:
    """``count`` fixed indices spread evenly over the test set (first and last included)."""
    if n_images <= 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n_images - 1, min(count, n_images)).round()})


def cam_overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """CAM as a jet heat map over the image (how CAM papers show them)."""
    import cv2

    heat = cv2.applyColorMap(np.round(np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return np.round((1 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)).astype(np.uint8)


def write_figure(path: Path, rows: Sequence[FigureRow], title: str = "") -> Path:
    """Write a rows x 5 grid (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    h, w = rows[0].rgb.shape[:2] if rows else (1, 1)
    fig, axes = plt.subplots(n, len(COLUMNS), figsize=(2.6 * len(COLUMNS), 2.6 * n * h / w + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        panels = (row.rgb, row.gt, cam_overlay(row.rgb, row.cam), row.pseudo, row.prob)
        for c, image in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(image, cmap=None if image.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row.name, fontsize=8)
    if not rows:
        axes[0][0].text(0.5, 0.5, "no test images", ha="center")
    return _save(fig, path, title)


HISTORY_PANELS = (
    ("model selection (val)", ("val_score", "val_agreement_iou", "val_cls_accuracy", "val_det_accuracy")),
    ("IoU against masks (monitoring only)", ("pseudo_label_iou", "val_diag_pseudo_iou", "val_diag_det_iou")),
    ("losses", ("rec_total", "cls_total", "det_total")),
)


def write_curves(path: Path, pr_points: Sequence[dict], history: Path | None = None, title: str = "") -> Path:
    """The PR curve and, when the training's ``history.csv`` is given, its per-epoch curves, as one
    PNG: ``dvc plots show`` draws the CSVs with vega from a CDN, which shows nothing offline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(history) if history is not None and Path(history).is_file() else None
    panels = 1 + (len(HISTORY_PANELS) if frame is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot([p["recall"] for p in pr_points], [p["precision"] for p in pr_points], color="tab:red")
    ax.set(xlabel="recall (%)", ylabel="precision (%)", title="detector, test", xlim=(0, 100), ylim=(0, 100))
    ax.grid(alpha=0.3)
    if frame is not None:
        for ax, (name, columns) in zip(axes[0][1:], HISTORY_PANELS, strict=True):
            for column in columns:
                if column in frame and frame[column].notna().any():
                    ax.plot(frame["epoch"], frame[column], marker="o", markersize=3, label=column)
            ax.set(xlabel="epoch", title=name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path: Path, title: str = "") -> Path:
    """Title, tight layout, atomic PNG write; the figure is closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
