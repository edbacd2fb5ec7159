"""Field check sets: a few dozen photos of a team's own roads, annotated once (0/255 masks).

``<paths.data>/field/<name>/images/`` holds the photos at their own size and ``masks/`` a PNG of
the same stem for each. They are the team's yardstick for retraining (``wpcrack field``, the
promotion gate): a bad set must stop everything before a score exists, naming every bad file at once
(pandera, lazy), never turn into a lower IoU that looks like a worse model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from wpcrack.errors import DataError
from wpcrack.io import list_images

_MAX_NAMED = 5


def _probe(image: Path, mask: Path | None) -> dict:
    """What the checks need of one pair, read once: sizes, readability, the mask's values."""
    import cv2

    row = {"image": str(image), "mask": str(mask) if mask else "", "image_size": "", "mask_size": "",
           "mask_values": ""}
    pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    if pixels is not None:
        row["image_size"] = f"{pixels.shape[1]}x{pixels.shape[0]}"
    if mask is not None:
        values = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
        if values is not None:
            row["mask_size"] = f"{values.shape[1]}x{values.shape[0]}"
            found = np.unique(values)
            row["mask_values"] = ",".join(str(int(v)) for v in found[:6]) + ("..." if len(found) > 6 else "")
    return row


def _binary(values: str) -> bool:
    return bool(values) and set(values.split(",")) <= {"0", "255"}


SCHEMA = pa.DataFrameSchema(
    {
        "image": pa.Column(str),
        "mask": pa.Column(str, pa.Check(lambda s: s != "", element_wise=True, name="mask_missing")),
        "image_size": pa.Column(str, pa.Check(lambda s: s != "", element_wise=True, name="image_unreadable")),
    },
    checks=[
        pa.Check(lambda df: (df["mask"] == "") | (df["mask_size"] != ""), name="mask_readable"),
        pa.Check(lambda df: (df["mask_size"] == "") | (df["image_size"] == "") | (df["mask_size"] == df["image_size"]),
                 name="mask_size"),
        pa.Check(lambda df: (df["mask_size"] == "") | df["mask_values"].map(_binary), name="mask_binary"),
    ],
    strict=False,
)


_ERRORS = {"mask_missing": "no mask of the same name in masks/", "image_unreadable": "photo unreadable",
           "mask_readable": "mask unreadable", "mask_size": "mask size differs from the photo's",
           "mask_binary": "mask is not binary 0/255"}


def _explain(errors: pa.errors.SchemaErrors, df: pd.DataFrame, folder: Path) -> str:
    """One clause per failed check, naming its files (and what is wrong with each)."""
    parts = []
    cases = errors.failure_cases
    for check, group in cases.groupby("check", sort=False):
        rows = sorted({int(i) for i in group["index"].dropna()})
        names = []
        for i in rows[:_MAX_NAMED]:
            r = df.loc[i]
            name = Path(r["image"] if str(check) in ("mask_missing", "image_unreadable") else r["mask"])
            name = name.relative_to(folder).as_posix()
            detail = {"mask_size": f" ({r['mask_size']} vs {r['image_size']})",
                      "mask_binary": f" (values {r['mask_values']})"}.get(str(check), "")
            names.append(name + detail)
        more = f" and {len(rows) - _MAX_NAMED} more" if len(rows) > _MAX_NAMED else ""
        error = _ERRORS.get(str(check), str(check))
        parts.append(f"{error}: {', '.join(names)}{more}")
    return "; ".join(parts)


def field_photos(data_root: str | Path, name: str) -> list[tuple[Path, Path]]:
    """The checked (photo, mask) pairs of field set ``name``; a DataError names every bad file."""
    folder = Path(data_root) / "field" / name
    images_dir, masks_dir = folder / "images", folder / "masks"
    for needed in (images_dir, masks_dir):
        if not needed.is_dir():
            raise DataError(needed, f"field set {name!r} needs images/ and masks/ folders (docs/operations.md)")
    images = list_images(images_dir)
    if not images:
        raise DataError(images_dir, f"field set {name!r} has no photos")
    masks = {m.stem: m for m in masks_dir.glob("*.png")}
    orphans = sorted(set(masks) - {i.stem for i in images})
    if orphans:
        raise DataError(masks_dir, "masks without a photo of the same name: " + ", ".join(f"{o}.png" for o in orphans[:_MAX_NAMED]))
    df = pd.DataFrame([_probe(i, masks.get(i.stem)) for i in images])
    try:
        SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise DataError(folder, _explain(exc, df, folder)) from None
    return [(Path(r.image), Path(r.mask)) for r in df.itertuples()]


def field_digest(pairs: list[tuple[Path, Path]]) -> str:
    """md5 over a field set's file names and bytes: a score recorded for a model is reused only
    while the set is exactly the one it was measured on."""
    import hashlib

    digest = hashlib.md5()
    for image, mask in sorted(pairs):
        for path in (image, mask):
            digest.update(path.name.encode())
            digest.update(hashlib.md5(path.read_bytes()).digest())
    return digest.hexdigest()
