"""The manifest schema (pandera), checked when ``prepare`` writes a manifest and on every load.

A manifest is the contract between data preparation and everything downstream, so a bad one must
fail before training starts, with every bad row named at once (lazy validation) rather than as a
crash in epoch 3. Image sizes come from file headers (PIL reads only the header), which keeps a
4,000-row check to about a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pandera.pandas as pa

from wpcrack.errors import DataError
from wpcrack.io import atomic_path

COLUMNS = ("image", "mask", "label", "split", "dataset", "source_id", "height", "width")
SPLITS = ("train", "val", "test")
INCOMING_PREFIX = "incoming-"  # source_id of rows from data/incoming (pipelines/retrain.py)
_MAX_EXAMPLES = 3


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file header, or None when the file is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _row_checks(base: Path) -> list[pa.Check]:
    """Checks that need the files or several columns; each returns one boolean per row."""
    sizes: dict[str, tuple[int, int] | None] = {}

    def size(rel: str) -> tuple[int, int] | None:
        if rel not in sizes:
            sizes[rel] = image_size(base / rel) if rel else None
        return sizes[rel]

    def exists(col: str):
        return lambda df: df[col].map(lambda r: not r or (base / r).is_file())

    def readable(col: str):
        return lambda df: df[col].map(lambda r: not r or not (base / r).is_file() or size(r) is not None)

    def mask_required(df: pd.DataFrame) -> pd.Series:
        # incoming train rows (retraining flow) carry an image-level label only: no pixel mask
        incoming = df["split"].eq("train") & df["source_id"].astype(str).str.startswith(INCOMING_PREFIX)
        needed = df["split"].isin(["val", "test"]) | (df["label"].eq(1).fillna(False) & ~incoming)
        return ~needed | (df["mask"] != "")

    def size_matches(df: pd.DataFrame) -> pd.Series:
        ok = [s is None or pd.isna(h) or pd.isna(w) or s == (h, w)
              for s, h, w in zip(df["image"].map(size), df["height"], df["width"])]
        return pd.Series(ok, index=df.index)

    def mask_matches(df: pd.DataFrame) -> pd.Series:
        ok = [a is None or b is None or a == b for a, b in zip(df["image"].map(size), df["mask"].map(size))]
        return pd.Series(ok, index=df.index)

    def one_split(df: pd.DataFrame) -> pd.Series:
        n = df.groupby("source_id")["split"].transform("nunique")
        return n == 1

    def unique_image(df: pd.DataFrame) -> pd.Series:
        return ~df["image"].duplicated(keep=False)

    return [
        pa.Check(exists("image"), name="image_exists", error="image file not found"),
        pa.Check(readable("image"), name="image_readable", error="image file is not a readable image"),
        pa.Check(exists("mask"), name="mask_exists", error="mask file not found"),
        pa.Check(readable("mask"), name="mask_readable", error="mask file is not a readable image"),
        pa.Check(mask_required, name="mask_required",
                 error="val/test and crack rows need a mask (incoming train rows excepted)"),
        pa.Check(size_matches, name="size_matches", error="image size differs from height/width"),
        pa.Check(mask_matches, name="mask_matches", error="mask size differs from image size"),
        pa.Check(one_split, name="one_split", error="source_id appears in more than one split"),
        pa.Check(unique_image, name="unique_image", error="image path listed twice"),
    ]


def schema(base: Path) -> pa.DataFrameSchema:
    """The manifest schema; file paths are relative to ``base`` (the manifest's folder)."""
    text = pa.Column(str, pa.Check.str_length(min_value=1))
    return pa.DataFrameSchema(
        {
            "image": text,
            "mask": pa.Column(str),  # "" = no mask (only train no-crack rows and incoming train rows)
            "label": pa.Column("Int64", pa.Check.isin([0, 1])),
            "split": pa.Column(str, pa.Check.isin(list(SPLITS))),
            "dataset": text,
            "source_id": text,
            "height": pa.Column("Int64", pa.Check.gt(0)),
            "width": pa.Column("Int64", pa.Check.gt(0)),
        },
        checks=_row_checks(base),
        coerce=True,  # the integer columns are parsed beforehand (see _parse_ints)
        strict=False,
    )


def _lines(rows: Sequence[int]) -> str:
    """CSV line numbers (header = line 1) as compact ranges: 2-5, 9."""
    rows = sorted({int(r) + 2 for r in rows})
    spans, start = [], rows[0]
    for prev, cur in zip(rows, [*rows[1:], None]):
        if cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(spans)


def _summary(errors: pa.errors.SchemaErrors, df: pd.DataFrame) -> str:
    """One line: per failed check, its message, every failing CSV line and a few example values."""
    cases = errors.failure_cases
    wide = cases["schema_context"] == "DataFrameSchema"  # row checks report every column: keep one
    cases = cases[~wide | (cases["column"] == "image")]
    parts = []
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        is_wide = group["schema_context"].iloc[0] == "DataFrameSchema"
        what = str(check) if is_wide else f"{column}: " + ("not an integer" if check == "not_nullable" else f"failed {check}")
        idx = [int(i) for i in group["index"].dropna()]
        if not idx:
            parts.append(f"{what} ({', '.join(map(str, group['failure_case'].tolist()[:_MAX_EXAMPLES]))})")
            continue
        col = "image" if is_wide or column not in df.columns else column
        examples = ", ".join(repr(df.at[i, col]) for i in idx[:_MAX_EXAMPLES] if i in df.index)
        parts.append(f"{what} on line(s) {_lines(idx)} ({col} e.g. {examples})")
    return "; ".join(parts)


def _parse_ints(df: pd.DataFrame) -> pd.DataFrame:
    """Integer columns -> nullable Int64 with <NA> for anything that is not a whole number.

    Done before pandera so one bad cell is reported on its own line instead of leaving the whole
    column as text (which would make every row fail the label and size checks).
    """
    out = df.copy()
    for col in ("label", "height", "width"):
        num = pd.to_numeric(out[col], errors="coerce")
        out[col] = num.where(num == num.round()).astype("Int64")
    return out


def validate(df: pd.DataFrame, base: Path, name: str | Path) -> pd.DataFrame:
    """Validate lazily; raise one DataError naming ``name`` and every failing row."""
    if df.empty:
        raise DataError(name, "manifest has no rows")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(name, f"manifest lacks column(s) {', '.join(missing)}")
    df = df.assign(mask=df["mask"].fillna(""))
    try:
        out = schema(Path(base)).validate(_parse_ints(df), lazy=True)
    except pa.errors.SchemaErrors as exc:
        bad = exc.failure_cases["index"].dropna().nunique()
        raise DataError(name, f"invalid manifest ({bad} bad row(s)): {_summary(exc, df)}") from None
    return out.astype({"label": "int64", "height": "int64", "width": "int64"})


def load_manifest(path: str | Path, split: str | None = None) -> pd.DataFrame:
    """Read and validate a manifest (optionally only one split); paths stay relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "manifest not found; run `wpcrack prepare <dataset>` first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable CSV ({exc.__class__.__name__})") from None
    df = validate(df, path.parent, path)
    if split is not None:
        if split not in SPLITS:
            raise DataError(path, f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        df = df[df["split"] == split].reset_index(drop=True)
    return df


def save_manifest(rows: pd.DataFrame | list[dict], path: str | Path, name: str | Path | None = None) -> pd.DataFrame:
    """Validate against the files beside ``path`` and write the CSV atomically.

    ``name`` is the path errors mention (prepare writes into a temporary folder first).
    """
    path = Path(path)
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    df = validate(df.reindex(columns=[*COLUMNS, *(c for c in df.columns if c not in COLUMNS)]), path.parent, name or path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def fingerprint(path: str | Path) -> str:
    """md5 of a prepared dataset: the manifest and, in its order, every image and mask it lists.
    Two preparations with the same fingerprint give training the same bytes (a resumed run checks it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "manifest not found (run `wpcrack prepare` or `dvc repro prepare@<dataset>`)")
    digest = hashlib.md5(path.read_bytes())
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("image", "mask"):
        for rel in frame.get(column, []):
            if rel:
                digest.update(rel.encode())
                digest.update((path.parent / rel).read_bytes())
    return digest.hexdigest()
