"""Whole-image pseudo labels (``pseudo_labels.source: image``), remade every ``refresh_epochs``.

The paper makes each label from the CAM of the training crop. A 128 px crop's CAM lacks context
and its 8 px cells are wider than a crack; the CAM of the whole stored image, averaged over scales
and flips as IRNet and ACR infer, covers a crack end to end. The labels are made in eval mode at the
start of an epoch from the current classifier, kept with the dataset, and cropped and flipped with
the image by its augmentation, so the detector sees the same label wherever the crop falls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from wpcrack.method.cam import crack_cam
from wpcrack.config import Config
from wpcrack.method.pseudo_labels import CRFPool, confusion, crack_pixels, iou_of

BATCH = 16


@torch.inference_mode()
def image_cams(classifier: torch.nn.Module, images: torch.Tensor, scales: tuple[float, ...], flip: bool) -> torch.Tensor:
    """[B, H, W] crack CAMs of normalised images [B, 3, H, W]: the mean over ``scales`` (and their
    flips) of each per-image normalised CAM at the input size, normalised again to a maximum of 1."""
    size = tuple(images.shape[-2:])
    total = torch.zeros(images.shape[0], 1, *size, device=images.device)
    views = 0
    ones = torch.ones(images.shape[0], dtype=torch.int64)
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            cam = crack_cam(classifier(xi).cam, ones, size=tuple(xi.shape[-2:]))
            cam = cam.flip(-1) if flipped else cam
            if cam.shape[-2:] != size:
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            total += cam.float()
            views += 1
    total /= views
    peak = total.amax(dim=(2, 3), keepdim=True).clamp(min=1e-5)
    return (total / peak)[:, 0]


def refresh(model: torch.nn.Module, dataset, cfg: Config, runtime, pool: CRFPool) -> dict[str, float]:
    """Set ``dataset.pseudo`` to the labels of its crack rows; returns the label diagnostic
    (``pseudo_label_iou`` against the rows' masks, monitoring only; ``pseudo_label_kept``)."""
    p = cfg.pseudo_labels

    def labels_of(rgbs: list[np.ndarray], x: torch.Tensor, source: str) -> list[np.ndarray]:
        with runtime.autocast():
            cams = image_cams(model.classifier, x, p.cam_scales, p.cam_flip)
        return pool.submit(rgbs, list(cams.float().cpu().numpy()), p.of_source(source)).result()

    return relabel_crack_rows(model, dataset, cfg, runtime, labels_of)


def relabel_crack_rows(model: torch.nn.Module, dataset, cfg: Config, runtime,
                       labels_of: Callable[[list[np.ndarray], torch.Tensor, str], list[np.ndarray]]) -> dict[str, float]:
    """Set ``dataset.pseudo`` to ``labels_of(rgbs, normalised batch, source)`` for every crack row, the
    model in eval mode, images of one shape and source (the manifest's ``dataset``) batched together;
    returns the label diagnostic."""
    from wpcrack.data.datasets import normalize
    from wpcrack.models.wpcracknet import eval_mode

    crack_rows = [i for i, label in enumerate(dataset.labels) if label == 1]
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    raws = {}
    sources = dataset.frame["dataset"].astype(str).tolist()
    for i in crack_rows:
        raws[i] = dataset.raw(i)
        by_shape[raws[i][0].shape, sources[i]].append(i)
    labels: dict[int, np.ndarray] = {}
    with eval_mode(model), torch.inference_mode():
        for (_, source), rows in by_shape.items():
            for start in range(0, len(rows), BATCH):
                chunk = rows[start:start + BATCH]
                rgbs = [raws[i][0] for i in chunk]
                x = runtime.images(normalize(torch.from_numpy(np.stack(rgbs))))
                labels.update(zip(chunk, labels_of(rgbs, x, source), strict=True))
    dataset.pseudo = labels
    return _label_diagnostic(labels, raws, crack_rows, cfg.pseudo_labels.min_pixels)


def _label_diagnostic(labels: dict[int, np.ndarray], raws: dict, crack_rows: list[int], min_pixels: int) -> dict[str, float]:
    """``pseudo_label_iou`` of the labels against the rows' masks (monitoring only) and the share of
    crack rows whose label has ``min_pixels`` crack pixels (``pseudo_label_kept``)."""
    with_mask = [i for i in crack_rows if raws[i][2]]
    diag = confusion([labels[i] for i in with_mask], [raws[i][1] for i in with_mask])
    kept = sum(crack_pixels(labels[i]) >= min_pixels for i in crack_rows)
    return {"pseudo_label_iou": iou_of(diag) if with_mask else float("nan"),
            "pseudo_label_kept": kept / len(crack_rows) if crack_rows else float("nan")}
