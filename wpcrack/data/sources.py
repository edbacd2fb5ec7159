"""Dataset registry and the ``download`` stage: fetch from the original source or copy from a mirror.

Each dataset has two possible sources. The *original* is the authors' public release; the *mirror*
is a local folder laid out like ``../shared/datasets`` whose archives are repacks of the releases
(members byte-identical, archive checksums different, design.md 7). So every source keeps the sha256
of what *it* serves; where an original's checksum cannot be checked from here it is ``None``: the
value seen at the first download is pinned in the dataset's marker and enforced from then on. The
unpacked contents are additionally checked against a listing digest that is the same for both
sources, which is what makes them interchangeable.

Output: ``raw/<dataset>/`` written atomically, with ``.download.json`` (source, checksums, pins) as
the last file, so a present marker means a complete download and a re-run is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from wpcrack.errors import DataError
from wpcrack.io import atomic_dir, read_image, write_image

MARKER = ".download.json"
_CFD_SUMS_FILE = Path(__file__).with_name("cfd_sha256sums.txt")
_CFD_SUMS_SHA256 = "0edd2b3601c0dca8a4f22f59c39c965f9333b54c2d762320e3b81b8e316be485"


@dataclass(frozen=True)
class Source:
    """One copy of a dataset: a URL prefix (original) or a mirror sub-folder, and its files.

    ``files`` maps a path relative to ``base`` to its sha256; ``None`` = pinned at first download.
    An original with no files cannot be fetched automatically; ``note`` says what to do instead.
    """

    base: str
    files: Mapping[str, str | None] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything ``download`` needs to know about one dataset (pure data, so tests can swap it)."""

    name: str
    title: str
    licence: str
    unpack: Literal["zip", "cfd", "generated"]
    original: Source | None = None
    mirror: Source | None = None
    layout: Mapping[str, int] = field(default_factory=dict)  # folder in raw/<name>/ -> file count
    content_sha256: str | None = None  # digest of the unpacked listing (see listing_sha256)


def _read_sums(path: Path, expected_sha256: str) -> dict[str, str]:
    """``sha256sum`` output -> {relative path: sha256}; the list itself is checked first."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(path, "package checksum list was modified (sha256 differs)")
    pairs = (line.split(maxsplit=1) for line in data.decode().splitlines() if line.strip())
    return {name.strip().lstrip("*"): digest for digest, name in pairs}


_CFD_SUMS = _read_sums(_CFD_SUMS_FILE, _CFD_SUMS_SHA256)

DATASETS: dict[str, DatasetSpec] = {
    "deepcrack": DatasetSpec(
        name="deepcrack",
        title="DeepCrack (Liu et al., Neurocomputing 2019)",
        licence="non-commercial research and educational use only (authors' statement)",
        unpack="zip",
        original=Source(
            "https://github.com/yhlleo/DeepCrack/raw/8202a60701068645c883ed68b95fd3f30914d90c/dataset",
            {"DeepCrack.zip": None},  # the original archive could not be fetched from here: pinned
        ),
        mirror=Source(
            "DeepCrack",
            {"DeepCrack.zip": "080d12c1e541cbc89fbe2d418b54ac184b1f7d47490e9b74b2ae56259e12bf1b"},
        ),
        layout={"train_img": 300, "train_lab": 300, "test_img": 237, "test_lab": 237},
        content_sha256="209f1d382c167a5ff18b09b30bff0801709402e3643dc7cd97478c13b77cbc54",
    ),
    "cfd": DatasetSpec(
        name="cfd",
        title="CrackForest / CFD (Shi et al., IEEE T-ITS 2016)",
        licence="non-commercial research purposes only (authors' statement)",
        unpack="cfd",
        # The mirror's files are byte-identical git blobs of this commit, so the checksums agree.
        original=Source(
            "https://raw.githubusercontent.com/cuilimeng/CrackForest-dataset/"
            "ed57c2d96754e6c7d105805cd29aeeb3a799f267",
            _CFD_SUMS,
        ),
        mirror=Source("CFD", _CFD_SUMS),
        layout={"images": 118, "masks": 118},
    ),
    "crack500": DatasetSpec(
        name="crack500",
        title="CRACK500 official training crops (Zhang et al. ICIP 2016; Yang et al. T-ITS 2019)",
        licence="not stated; cite the two papers",
        unpack="zip",
        original=Source(
            "https://github.com/fyangneil/pavement-crack-detection",
            {},
            note="the authors only link cloud drives (no direct URL); use --mirror with a folder "
            "holding CRACK500/CRACK500_traincrop.zip (the practical route)",
        ),
        mirror=Source(
            "CRACK500",
            {"CRACK500_traincrop.zip": "7f295342ae9ca68798032cf35bf3e9f2fa0110fa51258301bd5e7c12b0f15d35"},
        ),
        layout={"crack500/train": 1517, "crack500/label": 1517, "crack500/val": 379, "crack500/val_label": 379},
        content_sha256="2903472910d2fd4c204d504ad3cbe8a728dae407eaf810c00b98377745ca48ee",
    ),
    "synthetic": DatasetSpec(
        name="synthetic",
        title="procedural road textures with thin cracks (wpcrack.data.synthetic)",
        licence="generated; no restrictions",
        unpack="generated",  # `wpcrack prepare synthetic` generates it from prepare.synthetic.seed
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry, or an error listing the valid names."""
    if name not in DATASETS:
        raise DataError(name, f"unknown dataset; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def listing_sha256(root: Path) -> str:
    """sha256 of ``sha256sum`` lines over all files, paths relative to ``root``, sorted bytewise.

    Equals ``find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs sha256sum | sha256sum`` (the
    values in the mirror READMEs). The marker file is left out.
    """
    files = sorted((p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()), key=str.encode)
    lines = "".join(f"{file_sha256(root / f)}  {f}\n" for f in files if f != MARKER)
    return hashlib.sha256(lines.encode()).hexdigest()


def fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with a progress bar (urllib also serves ``file://`` URLs)."""
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(url, f"download failed ({exc})") from exc


def read_marker(target: Path) -> dict:
    """The marker of a completed download, or {} when there is none (or it is unreadable)."""
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _is_current(target: Path, spec: DatasetSpec) -> bool:
    """A marker exists and agrees with every checksum the registry knows for its source."""
    marker = read_marker(target)
    source = getattr(spec, marker.get("source", ""), None) if marker else None
    if not isinstance(source, Source):
        return False
    recorded = marker.get("sha256", {})
    return all(recorded.get(f) == s for f, s in source.files.items() if s is not None)


def _collect(spec: DatasetSpec, mirror: Path | None, tmp: Path) -> tuple[str, dict[str, Path]]:
    """Local paths of every source file: in the mirror, or downloaded into ``tmp``."""
    if mirror is not None:
        if spec.mirror is None:
            raise DataError(mirror, f"no mirror layout known for {spec.name}")
        folder = Path(mirror) / spec.mirror.base
        paths = {rel: folder / rel for rel in spec.mirror.files}
        for path in paths.values():
            if not path.is_file():
                raise DataError(path, "file not found in the mirror")
        return "mirror", paths
    if spec.original is None or not spec.original.files:
        note = spec.original.note if spec.original else "no source"
        raise DataError(spec.original.base if spec.original else spec.name, f"cannot download {spec.name}: {note}")
    paths = {}
    files = list(spec.original.files)
    for rel in (files if len(files) == 1 else _progress(files, spec.name)):
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(f"{spec.original.base}/{rel}", dest)
        paths[rel] = dest
    return "original", paths


def _progress(items: list[str], desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file")


def _verify(paths: Mapping[str, Path], expected: Mapping[str, str | None], pins: Mapping[str, str]) -> dict[str, str]:
    """Check every file against the registry (or its pin); return the observed sha256 values."""
    sums = {}
    for rel, path in paths.items():
        sums[rel] = digest = file_sha256(path)
        want = expected.get(rel) or pins.get(rel)
        if want is not None and digest != want:
            origin = "registry" if expected.get(rel) else "value pinned at first download"
            raise DataError(path, f"checksum mismatch: sha256 {digest[:12]}... but the {origin} says {want[:12]}...")
    return sums


def _unzip(paths: Mapping[str, Path], out: Path) -> None:
    """Extract the dataset's single archive, refusing members that would escape ``out``."""
    (archive,) = paths.values()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise DataError(archive, f"unsafe member path {member!r} in archive")
            zf.extractall(out)
    except zipfile.BadZipFile as exc:
        raise DataError(archive, "not a valid zip archive") from exc
    shutil.rmtree(out / "__MACOSX", ignore_errors=True)


def _cfd_mask(mat: Path) -> np.ndarray:
    """CFD ground truth: crack = Segmentation == 2 (3 and 4 mark enclosed background, not crack)."""
    import scipy.io

    try:
        seg = scipy.io.loadmat(str(mat))["groundTruth"][0, 0]["Segmentation"]
    except Exception as exc:  # scipy raises several unrelated types for a bad .mat
        raise DataError(mat, f"cannot read CFD ground truth ({exc.__class__.__name__})") from exc
    return (seg == 2).astype("uint8") * 255


def _unpack_cfd(paths: Mapping[str, Path], out: Path) -> None:
    """image/NNN.jpg -> images/NNN.jpg (bytes kept); groundTruth/NNN.mat -> masks/NNN.png (0/255)."""
    (out / "images").mkdir()
    (out / "masks").mkdir()
    for rel, path in sorted(paths.items()):
        stem = Path(rel).stem
        if rel.startswith("image/"):
            shutil.copyfile(path, out / "images" / f"{stem}.jpg")
        elif rel.startswith("groundTruth/"):
            mask = _cfd_mask(path)
            image = paths.get(f"image/{stem}.jpg")
            if image is not None and read_image(image).shape[:2] != mask.shape:
                raise DataError(path, f"ground truth {mask.shape[1]}x{mask.shape[0]} does not match image/{stem}.jpg")
            write_image(out / "masks" / f"{stem}.png", mask)


_UNPACKERS: dict[str, Callable[[Mapping[str, Path], Path], None]] = {"zip": _unzip, "cfd": _unpack_cfd}


def _lift_single_root(out: Path, layout: Mapping[str, int]) -> None:
    """An archive that wraps everything in one top folder is flattened, so layouts agree."""
    first = next(iter(layout), None)
    children = [p for p in out.iterdir() if not p.name.startswith(".")]
    if first and not (out / first).exists() and len(children) == 1 and (children[0] / first).exists():
        inner = children[0]
        for item in list(inner.iterdir()):
            shutil.move(str(item), out / item.name)
        inner.rmdir()


def _check_layout(out: Path, target: Path, spec: DatasetSpec) -> None:
    for folder, count in spec.layout.items():
        found = sum(1 for p in (out / folder).glob("*") if p.is_file()) if (out / folder).is_dir() else 0
        if found != count:
            raise DataError(target / folder, f"expected {count} files after unpacking, found {found}")
    if spec.content_sha256 and listing_sha256(out) != spec.content_sha256:
        raise DataError(target, "unpacked files differ from the known release (listing sha256 mismatch)")


def download_one(spec: DatasetSpec, raw_dir: Path, mirror: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify and unpack one dataset into ``raw_dir/<name>/``; a no-op when already done."""
    target = Path(raw_dir) / spec.name
    if spec.unpack == "generated":
        print(f"{spec.name}: generated by `wpcrack prepare {spec.name}` from its seed; nothing to download")
        return target
    if not force and _is_current(target, spec):
        print(f"{spec.name}: up to date ({target})")
        return target
    old = read_marker(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.fetch.", dir=target.parent) as tmp:
        kind, paths = _collect(spec, mirror, Path(tmp))
        source: Source = getattr(spec, kind)
        pins = dict(old.get("pins", {}).get(kind, {}))
        sums = _verify(paths, source.files, pins)
        new_pins = {rel: sums[rel] for rel, s in source.files.items() if s is None and rel not in pins}
        with atomic_dir(target) as out:
            _UNPACKERS[spec.unpack](paths, out)
            _lift_single_root(out, spec.layout)
            _check_layout(out, target, spec)
            all_pins = {**old.get("pins", {}), kind: {**pins, **new_pins}}
            marker = {"dataset": spec.name, "source": kind, "base": source.base,
                      "sha256": sums, "pins": {k: v for k, v in all_pins.items() if v}}
            (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    for rel in new_pins:
        print(f"{spec.name}: pinned sha256 of {rel} = {new_pins[rel]} (first download)", file=sys.stderr)
    print(f"{spec.name}: {kind} -> {target}")
    return target


def download(names: list[str], raw_dir: Path, mirror: Path | None = None, force: bool = False) -> list[Path]:
    """Download several datasets; every name is checked before any work starts."""
    specs = [get_spec(n) for n in names]
    if mirror is not None and not Path(mirror).is_dir():
        raise DataError(mirror, "mirror folder not found")
    return [download_one(s, Path(raw_dir), mirror, force) for s in specs]
