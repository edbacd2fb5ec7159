"""Batch intake: a team's newly tagged photos checked, the bad ones quarantined, the good ones versioned.

A *batch* is a folder with ``crack/`` and ``no_crack/`` sub-folders, or a CSV with columns
``path,label`` (label ``crack``/``no_crack`` or 1/0; relative paths are relative to the CSV).

1. Every file is probed (decodes, complete, content matches its extension, size bounds, colour
   mode, safe name inside the batch, exact duplicate by SHA-256 within the batch and against the
   dataset's raw, prepared and incoming images) and the probes are validated by a pandera schema.
2. Bad files are *moved* to the quarantine folder, each with ``<name>.reason.txt``, plus the whole
   ``report.csv``; nothing is deleted or rewritten. Files a previous intake already took from this
   same batch path are skipped silently, so a scheduled run over a drop folder takes only new files.
3. Good files are *copied* (content-addressed names) into ``data/incoming/<dataset>/images/`` and
   appended to ``data/incoming/<dataset>/manifest.csv`` (the prepared-manifest columns, split
   ``train``), which ``wpcrack prepare`` adds to the training split. The folder is versioned with
   DVC: ``data_versions/<dataset>.dvc`` (outside ``data/``, which git ignores) is re-hashed with
   ``dvc commit`` and each version's hash is appended to ``data_versions/<dataset>.csv``, so any
   retraining's data can be checked out again (``restore``).

``wpcrack intake <dataset> <batch>`` runs the three steps (``--check`` only the first); the
retraining flow (``pipelines.retrain``) runs them as Prefect tasks before it retrains.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import yaml

from wpcrack.dvc import run_dvc
from wpcrack.errors import DataError, WpcrackError
from wpcrack.io import IMAGE_SUFFIXES, atomic_path, image_format, is_complete

LABELS = {"crack": 1, "no_crack": 0, "1": 1, "0": 0}
SUFFIX_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}
SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
MODES = ("RGB", "L")
INCOMING_COLUMNS = ("image", "mask", "label", "split", "dataset", "source_id", "height", "width",
                    "sha256", "batch", "original", "added", "version", "scale", "scale_model")
VERSION_COLUMNS = ("version", "created", "batch", "added", "quarantined", "md5", "nfiles", "size")


class BatchRejected(WpcrackError):
    """The batch has no usable file."""


# --- probing -------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    """``path`` (not following links) lies under ``root`` (no ``..`` escape)."""
    return os.path.normpath(os.path.abspath(path)).startswith(os.path.abspath(root) + os.sep)


def _mode(img: np.ndarray) -> str:
    channels = 1 if img.ndim == 2 else img.shape[2]
    name = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels}-channel")
    return name if img.dtype == np.uint8 else f"{name};{img.dtype.itemsize * 8}-bit"


def probe(path: Path, root: Path, label: object) -> dict:
    """Everything the schema checks about one listed file (reads it only if it is inside the batch)."""
    import cv2

    inside = _inside(path, root)
    name = os.path.relpath(os.path.abspath(path), os.path.abspath(root)) if inside else str(path)
    row = {
        "path": str(path), "name": name, "label": LABELS.get(str(label).strip().lower(), -1),
        "inside": inside and not path.is_symlink() and path.resolve().is_relative_to(root.resolve()),
        "safe_name": all(SAFE_PART.match(part) for part in Path(name).parts) if inside else pd.NA,
        "exists": path.is_file(), "suffix": path.suffix.lower(), "format": None, "complete": pd.NA,
        "decodes": pd.NA, "height": pd.NA, "width": pd.NA, "mode": None, "sha256": "",
    }
    if not (row["inside"] and row["exists"]):
        return row  # the content checks do not apply (nulls are not checked)
    data = path.read_bytes()
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    row.update(sha256=hashlib.sha256(data).hexdigest(), format=image_format(data[:16]), decodes=img is not None)
    row["complete"] = is_complete(data, row["format"])
    if img is not None:
        row.update(height=img.shape[0], width=img.shape[1], mode=_mode(img))
    return row


def read_batch(batch: str | Path) -> tuple[Path, list[tuple[Path, object]]]:
    """(batch root, [(file, label)]) of a ``crack/`` + ``no_crack/`` folder or a ``path,label`` CSV."""
    batch = Path(batch)
    if batch.is_dir():
        subdirs = [batch / name for name in ("crack", "no_crack")]
        if not any(d.is_dir() for d in subdirs):
            raise DataError(batch, "a batch folder needs crack/ and/or no_crack/ sub-folders")
        files = [(p, d.name) for d in subdirs if d.is_dir()
                 for p in sorted(d.rglob("*")) if p.is_file() or p.is_symlink()]
        return batch, files
    if batch.is_file() and batch.suffix.lower() == ".csv":
        table = pd.read_csv(batch, dtype=str, keep_default_na=False)
        if not {"path", "label"} <= set(table.columns):
            raise DataError(batch, "a batch CSV needs the columns path,label")
        root = batch.parent
        return root, [(Path(p) if Path(p).is_absolute() else root / p, label)
                      for p, label in zip(table["path"], table["label"], strict=True)]
    raise DataError(batch, "not a batch folder or a .csv file")


# --- validation (pandera) ------------------------------------------------------------------------


def batch_schema(min_side: int, max_side: int, modes: tuple[str, ...] = MODES) -> pa.DataFrameSchema:
    """One row per listed file; each check's ``error`` is the key of its reason in ``REASONS``.
    Content columns are null for files that could not be read; nulls are not checked."""
    def true(key: str) -> pa.Check:
        return pa.Check.eq(True, error=key)

    return pa.DataFrameSchema(
        {
            "inside": pa.Column(bool, true("outside")),
            "safe_name": pa.Column("boolean", true("unsafe_name"), nullable=True),
            "exists": pa.Column(bool, true("missing")),
            "label": pa.Column(int, pa.Check.isin([0, 1], error="label")),
            "suffix": pa.Column(str, pa.Check.isin(list(SUFFIX_FORMAT), error="suffix")),
            "decodes": pa.Column("boolean", true("corrupt"), nullable=True),
            "complete": pa.Column("boolean", true("truncated"), nullable=True),
            "height": pa.Column("Int64", pa.Check.in_range(min_side, max_side, error="size"), nullable=True),
            "width": pa.Column("Int64", pa.Check.in_range(min_side, max_side, error="size"), nullable=True),
            "mode": pa.Column(str, pa.Check.isin(list(modes), error="mode"), nullable=True),
            "duplicate_of": pa.Column(str, pa.Check.eq("", error="duplicate")),
        },
        checks=[pa.Check(lambda df: ~df["decodes"].fillna(False) | df["suffix"].map(SUFFIX_FORMAT).eq(df["format"]),
                         error="format")],
        strict=False,
    )


REASONS = {
    "outside": lambda r: "outside the batch folder (path traversal or a symbolic link)",
    "unsafe_name": lambda r: "unsafe file name: use letters, digits, '.', '_' and '-' only (no hidden files)",
    "missing": lambda r: "file not found",
    "label": lambda r: "label must be crack or no_crack (1 or 0)",
    "suffix": lambda r: f"not a supported image type ({', '.join(IMAGE_SUFFIXES)})",
    "corrupt": lambda r: "cannot be decoded as an image (corrupt)",
    "truncated": lambda r: "truncated file (incomplete upload?)",
    "format": lambda r: f"content is {(r['format'] or 'unknown').upper()} but the extension says {r['suffix']}",
    "size": lambda r: f"size {r['width']}x{r['height']} outside the allowed bounds",
    "mode": lambda r: f"colour mode {r['mode']} not allowed",
    "duplicate": lambda r: f"exact duplicate of {r['duplicate_of']}",
}


def validate_probes(probes: pd.DataFrame, min_side: int, max_side: int, modes: tuple[str, ...] = MODES) -> pd.DataFrame:
    """``probes`` plus ``ok`` and ``reason`` (all failed checks of a row, joined with '; ')."""
    frame = probes.astype({"label": int, "height": "Int64", "width": "Int64", "safe_name": "boolean",
                           "decodes": "boolean", "complete": "boolean"})
    failed: dict[int, list[str]] = {}
    try:
        batch_schema(min_side, max_side, modes).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        for index, key in exc.failure_cases[["index", "check"]].dropna().drop_duplicates().itertuples(index=False):
            failed.setdefault(int(index), []).append(str(key))
    reasons = [
        "; ".join(REASONS[k](row) for k in REASONS if k in failed.get(i, []))
        for i, row in zip(frame.index, frame.to_dict("records"), strict=True)
    ]
    return frame.assign(ok=[not r for r in reasons], reason=reasons)


# --- data on disk --------------------------------------------------------------------------------


def incoming_dir(root: Path, dataset: str) -> Path:
    return root / "data" / "incoming" / dataset


def versions_csv(root: Path, dataset: str) -> Path:
    return root / "data_versions" / f"{dataset}.csv"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_incoming(root: Path, dataset: str) -> pd.DataFrame:
    path = incoming_dir(root, dataset) / "manifest.csv"
    if not path.is_file():
        return pd.DataFrame(columns=list(INCOMING_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def known_hashes(root: Path, dataset: str) -> dict[str, str]:
    """SHA-256 -> where it is, for every image the dataset already has (raw, prepared, incoming)."""
    known: dict[str, str] = {}
    for sub in ("raw", "prepared"):
        folder = root / "data" / sub / dataset
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    known.setdefault(_sha256(path), str(path.relative_to(root)))
    for row in read_incoming(root, dataset).itertuples(index=False):
        known.setdefault(row.sha256, f"data/incoming/{dataset}/{row.image} (from {row.original})")
    return known


def mark_duplicates(probes: pd.DataFrame, known: dict[str, str], ingested: set[tuple[str, str]]) -> pd.DataFrame:
    """Add ``duplicate_of`` (where the same bytes already are) and ``already_ingested`` (this very
    file, from this batch path, was ingested by an earlier run)."""
    seen: dict[str, str] = {}
    duplicate, already = [], []
    for sha, path, name in zip(probes["sha256"], probes["path"], probes["name"], strict=True):
        repeat = (sha, str(Path(path).resolve())) in ingested
        already.append(repeat)
        where = "" if not sha or repeat else seen.get(sha) or known.get(sha, "")
        duplicate.append(f"{where} in this batch" if sha in seen and not repeat else where)
        if sha and not repeat:
            seen.setdefault(sha, name)
    return probes.assign(duplicate_of=duplicate, already_ingested=already)


# --- the three steps ---------------------------------------------------------------------------


def validate_batch(batch: str, root: str, dataset: str, min_side: int = 64, max_side: int = 10000) -> pd.DataFrame:
    """The validation report of a batch: one row per listed file with ``ok`` and ``reason``."""
    batch_root, files = read_batch(batch)
    probes = pd.DataFrame([probe(path, batch_root, label) for path, label in files])
    if probes.empty:
        return probes.assign(ok=pd.Series(dtype=bool), reason="", already_ingested=pd.Series(dtype=bool))
    incoming = read_incoming(Path(root), dataset)
    ingested = set(zip(incoming["sha256"], incoming["original"], strict=True))
    probes = mark_duplicates(probes, known_hashes(Path(root), dataset), ingested)
    report = validate_probes(probes, min_side, max_side)
    return report.assign(ok=report["ok"] & ~report["already_ingested"])


def _free(path: Path) -> Path:
    """``path``, or ``path`` with -1, -2 ... before the suffix if that exists already."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def quarantine(report: pd.DataFrame, batch: str, folder: str) -> list[str]:
    """Move every rejected file that lies in the batch into ``folder`` with a reason file, and write
    the report there (nothing at all when nothing is rejected). Files outside the batch (a CSV may
    point anywhere) are never touched."""
    rejected = report[~report["ok"] & ~report["already_ingested"]] if len(report) else report
    if rejected.empty:
        return []
    batch_root, _ = read_batch(batch)
    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    needed = set(report.loc[report["ok"], "path"])  # a CSV may list one file twice
    moved = []
    for row in rejected.to_dict("records"):
        src = Path(row["path"])
        inside = _inside(src, batch_root) and (src.is_file() or src.is_symlink())
        rel = Path(row["name"]) if inside else Path("outside") / src.name
        dest = _free(folder_path / rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        movable = inside and row["path"] not in needed
        if movable:
            shutil.move(src, dest)
            moved.append(str(dest))
        why = "" if movable else "(not moved: " + ("also listed as good" if inside else "outside the batch") + ")\n"
        note = f"{row['path']}: {row['reason']}\n{why}"
        dest.with_name(dest.name + ".reason.txt").write_text(note)
    with atomic_path(folder_path / "report.csv") as tmp:
        report.to_csv(tmp, index=False)
    return moved


def _dvc_file(root: Path, dataset: str) -> Path:
    return root / "data_versions" / f"{dataset}.dvc"


def _read_dvc_out(path: Path) -> dict:
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0]


def predict_scales(paths: list[str], model_dir: str | Path) -> tuple[list[float], str]:
    """The scale ``wpcrack predict`` chooses for each image with the model of ``model_dir`` (how the
    deployed model will see such photos; ``wpcrack prepare`` stores them at it), and the model's md5."""
    import torch

    from wpcrack.deploy.detection import decide_scale, load_model_dir, weights_digest
    from wpcrack.io import read_image

    detector, cfg = load_model_dir(model_dir)
    with torch.inference_mode():
        scales = [float(decide_scale(detector, read_image(p), cfg)[0].scale) for p in paths]
    return scales, weights_digest(detector)


def scale_model(root: str | Path, dataset: str, variant: str = "full") -> Path | None:
    """The model whose scale choice stores a batch (``retrain.incoming_scale: predict``): the run's
    trained folder, the champion's files. None for ``square``, or when the run has no model yet."""
    from wpcrack.config import load_config, load_retrain

    params = Path(root) / "params.yaml"
    if load_retrain(params).incoming_scale != "predict":
        return None
    folder = Path(root) / load_config(params, dataset).paths.models / dataset / variant
    if not (folder / "best.pt").is_file():
        print(f"{folder}: no trained model to choose the scale of the new images; they are squashed to the "
              "training size (retrain.incoming_scale: predict needs the champion)")
        return None
    return folder


def ingest(report: pd.DataFrame, root: str, dataset: str, batch: str, quarantined: int,
           scale_model: str | Path | None = None) -> dict:
    """Copy the good files into the incoming set, append its manifest, commit a new DVC version.
    With ``scale_model`` (a trained model folder, the champion) each row records the scale predict
    chooses for it with that model (``predict_scales``); without, prepare squashes it to the
    training size."""
    root_path = Path(root)
    folder = incoming_dir(root_path, dataset)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    log = versions_csv(root_path, dataset)
    versions = pd.read_csv(log, dtype=str) if log.is_file() else pd.DataFrame(columns=list(VERSION_COLUMNS))
    version = int(pd.to_numeric(versions["version"]).max()) + 1 if len(versions) else 1
    added = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    good = report[report["ok"]].to_dict("records")
    scales, model_md5 = predict_scales([r["path"] for r in good], scale_model) if scale_model and good else ([], "")
    for i, row in enumerate(good):
        image = f"images/{row['sha256'][:20]}{row['suffix']}"
        shutil.copy2(row["path"], folder / image)
        rows.append({
            "image": image, "mask": "", "label": int(row["label"]), "split": "train", "dataset": dataset,
            "source_id": f"incoming-{row['sha256'][:20]}", "height": int(row["height"]), "width": int(row["width"]),
            "sha256": row["sha256"], "batch": str(Path(batch).resolve()), "original": str(Path(row["path"]).resolve()),
            "added": added, "version": version,
            "scale": f"{scales[i]:.6g}" if scales else "", "scale_model": model_md5,
        })
    manifest = pd.concat([read_incoming(root_path, dataset), pd.DataFrame(rows, columns=list(INCOMING_COLUMNS))])
    with atomic_path(folder / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False)

    dvc_file = _dvc_file(root_path, dataset)
    if not dvc_file.is_file():
        dvc_file.parent.mkdir(parents=True, exist_ok=True)
        dvc_file.write_text(yaml.safe_dump({"outs": [{"path": f"../data/incoming/{dataset}"}]}))
    run_dvc(["commit", "--force", str(dvc_file.relative_to(root_path))], root_path)
    out = _read_dvc_out(dvc_file)
    entry = {"version": version, "created": added, "batch": str(Path(batch).resolve()), "added": len(rows),
             "quarantined": quarantined, "md5": out.get("md5", ""), "nfiles": out.get("nfiles", ""),
             "size": out.get("size", "")}
    table = pd.concat([versions, pd.DataFrame([entry])])[list(VERSION_COLUMNS)]
    with atomic_path(log) as tmp:
        table.to_csv(tmp, index=False)
    print(f"incoming {dataset}: version {version} (+{len(rows)} images, md5 {entry['md5']})")
    return entry


def fingerprint_test_split(root: Path, dataset: str) -> str | None:
    """SHA-256 over the test rows of the prepared manifest and their files (None: not prepared)."""
    path = root / "data" / "prepared" / dataset / "manifest.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    test = table[table["split"] == "test"].sort_values("image")
    digest = hashlib.sha256()
    for row in test.itertuples(index=False):
        digest.update(f"{row.image}|{row.mask}|{row.label}|{row.source_id}\n".encode())
        for rel in (row.image, row.mask):
            if rel:
                digest.update(_sha256(path.parent / rel).encode())
    return digest.hexdigest()


# --- restoring a data version --------------------------------------------------------------------


def restore(root: Path, dataset: str, version: int) -> dict:
    """Check out ``data/incoming/<dataset>`` as it was at ``version`` (from the DVC cache)."""
    table = pd.read_csv(versions_csv(root, dataset), dtype=str)
    match = table[pd.to_numeric(table["version"]) == version]
    if match.empty:
        raise DataError(versions_csv(root, dataset), f"no version {version}; known: {', '.join(table['version'])}")
    entry = match.iloc[-1].to_dict()
    out = {"path": f"../data/incoming/{dataset}", "md5": entry["md5"], "size": int(entry["size"]),
           "nfiles": int(entry["nfiles"]), "hash": "md5"}
    dvc_file = _dvc_file(root, dataset)
    dvc_file.write_text(yaml.safe_dump({"outs": [out]}, sort_keys=False))
    run_dvc(["checkout", "--force", str(dvc_file.relative_to(root))], root)
    return entry


def quarantine_folder(root: Path, dataset: str, batch: Path) -> Path:
    """Where a batch's rejected files go by default: one folder per batch and intake time."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return root / "data" / "quarantine" / dataset / f"{batch.stem}-{stamp}"


def intake(batch: str | Path, root: str | Path, dataset: str, quarantine_dir: str | Path | None = None,
           min_side: int = 64, max_side: int = 10000, check_only: bool = False,
           scale_model: str | Path | None = None) -> dict:
    """The three steps on one batch: ``{"report", "good", "rejected", "already_ingested", "quarantine",
    "quarantined", "data_version"}``. Raises ``BatchRejected`` when a batch with new files has no
    good one; ``check_only`` validates and moves nothing."""
    batch_path, root_path = Path(batch).resolve(), Path(root).resolve()
    report = validate_batch(str(batch_path), str(root_path), dataset, min_side, max_side)
    good, skipped = int(report["ok"].sum()), int(report["already_ingested"].sum()) if len(report) else 0
    folder = Path(quarantine_dir or quarantine_folder(root_path, dataset, batch_path))
    result = {"report": report, "good": good, "rejected": len(report) - good - skipped,
              "already_ingested": skipped, "quarantine": str(folder), "quarantined": 0, "data_version": None}
    if check_only:
        return result
    result["quarantined"] = len(quarantine(report, str(batch_path), str(folder)))
    if good == 0 and len(report) > skipped:
        raise BatchRejected(f"{batch_path}: no usable image ({result['rejected']} rejected; "
                            f"reasons in {folder / 'report.csv'})")
    if good:
        result["data_version"] = ingest(report, str(root_path), dataset, str(batch_path), result["quarantined"],
                                        scale_model)
    return result
