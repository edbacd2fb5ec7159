"""Torch datasets over a prepared manifest, with seeded augmentation.

Augmentation is a pure function of (seed, epoch, index), so a run is repeatable whatever the number
of DataLoader workers; call ``set_epoch`` once per epoch (as with DistributedSampler) to get new
crops each epoch. With ``augment=False`` and ``crop_size=None`` items are the full stored images
(the evaluation variant; test rows keep their original resolution, so batch them one at a time).

Note for weak labels: a random crop smaller than the image can miss the crack of a crack image while
the label stays 1. Keep ``crop_size`` close to the stored size (256) or accept that label noise.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wpcrack.errors import DataError
from wpcrack.geometry import LINEAR, resize_image, resize_mask, scaled_size
from wpcrack.io import read_image, read_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PAD_RGB = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)  # normalises to ~0


def normalize(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., H, W, 3] (numpy or torch, any device) -> float32 [..., 3, H, W], ImageNet-normalised."""
    x = torch.as_tensor(rgb).movedim(-1, -3).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize``: float [..., 3, H, W] -> uint8 RGB [..., H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    rgb = (x.float() * std + mean).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return rgb.movedim(-3, -1)


def _crop(rgb: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """size x size crop (random with ``rng``, centred without); smaller images are padded first.
    ``mask`` may be HxW or HxWxK (every map cropped like the image)."""
    h, w = mask.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        top = int(rng.integers(0, ph + 1)) if rng is not None else ph // 2
        left = int(rng.integers(0, pw + 1)) if rng is not None else pw // 2
        pads = (top, ph - top, left, pw - left)
        rgb = cv2.copyMakeBorder(rgb, *pads, cv2.BORDER_CONSTANT, value=_PAD_RGB)
        mask = np.pad(mask, ((top, ph - top), (left, pw - left)) + ((0, 0),) * (mask.ndim - 2))
        h, w = mask.shape[:2]
    y = int(rng.integers(0, h - size + 1)) if rng is not None else (h - size) // 2
    x = int(rng.integers(0, w - size + 1)) if rng is not None else (w - size) // 2
    return rgb[y:y + size, x:x + size], mask[y:y + size, x:x + size]


def augment(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop_size: int | None,
            scale_range: tuple[float, float] = (0.75, 1.25), flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale (bilinear image, nearest mask), horizontal flip, then random crop.

    ``mask`` may be HxW or HxWxK (a mask and a pseudo label travel together). The rescale never
    shrinks an image below the crop: the padding that would follow is a cue of its own when only the
    small (crack-free) patches get it.
    """
    s = float(rng.uniform(*scale_range))
    if crop_size:
        s = max(s, min(1.0, crop_size / min(mask.shape[:2])))
    if s != 1.0:
        size = scaled_size(mask.shape, s)
        rgb = resize_image(rgb, size, shrink=LINEAR)
        mask = resize_mask(mask, size)
    if flip and rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    if crop_size:
        rgb, mask = _crop(rgb, mask, crop_size, rng)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(mask)


class WeakDataset(Dataset):
    """Rows of one split of a prepared manifest (see docs/architecture.md, "Data for training")."""

    def __init__(self, manifest_path: str | Path, split: str, crop_size: int | None = None, augment: bool = False,
                 seed: int = 0, scale_range: tuple[float, float] = (0.75, 1.25), flip: bool = True):
        from wpcrack.data.manifest import load_manifest

        self.manifest_path = Path(manifest_path)
        self.root = self.manifest_path.parent
        self.frame = load_manifest(self.manifest_path, split)
        if self.frame.empty:
            raise DataError(self.manifest_path, f"no rows in split {split!r}")
        self.split, self.crop_size, self.augment, self.seed = split, crop_size, augment, seed
        self.scale_range, self.flip, self.epoch = scale_range, flip, 0
        # Row index -> pseudo label of the whole stored image (``pseudo_labels.source: image``),
        # cropped and flipped with the image. Set by the trainer, before the epoch's loader starts.
        self.pseudo: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Pick the augmentation stream of this epoch (call before iterating)."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        """Image-level labels in row order (for samplers and class weights)."""
        return self.frame["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.frame)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(uint8 RGB, uint8 mask (zeros without one), has a mask) of a row as stored."""
        row = self.frame.iloc[index]
        rgb = read_image(self.root / row["image"])
        has_mask = bool(row["mask"])
        mask = read_mask(self.root / row["mask"], shape=rgb.shape[:2]) if has_mask else np.zeros(rgb.shape[:2], np.uint8)
        return rgb, mask, has_mask

    def __getitem__(self, index: int) -> dict:
        rgb, mask, has_mask = self.raw(index)
        pseudo = self.pseudo.get(index)
        if pseudo is not None and pseudo.shape != mask.shape:
            raise DataError(self.root / self.frame.iloc[index]["image"],
                            f"pseudo label is {pseudo.shape[1]}x{pseudo.shape[0]}, image {mask.shape[1]}x{mask.shape[0]}")
        maps = np.stack([mask > 0, pseudo if pseudo is not None else np.zeros_like(mask)], axis=-1).astype(np.uint8)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            rgb, maps = augment(rgb, maps, rng, self.crop_size, self.scale_range, self.flip)
        elif self.crop_size:
            rgb, maps = _crop(rgb, maps, self.crop_size, None)
        rgb_t = torch.from_numpy(np.ascontiguousarray(rgb))
        return {
            "image": normalize(rgb_t),
            "rgb": rgb_t,
            "label": torch.tensor(int(self.frame.iloc[index]["label"]), dtype=torch.int64),
            "mask": torch.from_numpy(maps[..., 0].astype(np.float32))[None],
            "has_mask": has_mask,
            "pseudo": torch.from_numpy(maps[..., 1].astype(np.float32))[None],
            "has_pseudo": pseudo is not None,
            "index": index,
        }
