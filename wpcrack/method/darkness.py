"""The image-processing crack cue: cracks are thin lines darker than the road around them.

Bilateral filter (keeps the crack's edges, flattens the road's grain), a mean adaptive threshold
(a pixel is dark when it is ``offset`` grey levels below the mean of its ``block`` x ``block``
window), then connected components smaller than ``min_area`` pixels are dropped. Used two ways:
inside the CAM's crack region as the weak model's pseudo labels (``pseudo_labels.method:
darkness``), and alone as the classical baseline (``wpcrack classical``) the learned model must beat.
"""

from __future__ import annotations

import cv2
import numpy as np

from wpcrack.config import DarknessConfig


def dark_pixels(rgb: np.ndarray, cfg: DarknessConfig) -> np.ndarray:
    """uint8 HxW in {0, 1}: the locally dark, line-sized pixels of an RGB (or grey) image."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    if cfg.bilateral_d > 0:
        grey = cv2.bilateralFilter(grey, cfg.bilateral_d, cfg.bilateral_sigma_color, cfg.bilateral_sigma_space)
    block = _odd_block(cfg.block, min(grey.shape[:2]))
    dark = cv2.adaptiveThreshold(grey, 1, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, cfg.offset)
    return remove_small(dark, cfg.min_area)


def remove_small(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components of fewer than ``min_area`` pixels (uint8 {0,1} in and out)."""
    binary = (np.asarray(binary) > 0).astype(np.uint8)
    if min_area <= 1 or not binary.any():
        return binary
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def _odd_block(block: int, limit: int) -> int:
    """OpenCV needs an odd block > 1; a block larger than the image is clipped to it."""
    block = max(3, min(int(block), limit if limit % 2 else limit - 1))
    return block if block % 2 else block - 1
