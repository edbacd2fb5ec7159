"""The ``prepare`` stage: per-dataset splits, patches and a validated manifest (design.md 2).

``data/prepared/<dataset>/`` holds ``images/<split>/``, ``masks/<split>/``, ``manifest.csv``,
``counts.json`` (DVC metrics) and ``split.json`` (source ids per split). It is built in a temporary folder and renamed into place, so a failure
leaves the previous output untouched and never a half-written one.

Pixel masks decide only the image-level label of a row (crack if it has at least
``prepare.min_crack_pixels`` crack pixels; crack-free patches are cut where the mask is all zero), as
a human labeller would. They are written beside each row for evaluation, monitoring and the
supervised upper bound, and never reach the weakly-supervised losses.

Training rows are rescaled to a square size (aspect ratio not kept, as in the paper); test rows keep
their original resolution and their original image bytes (evaluation applies dataset rules itself).

Newly collected images ingested by the retraining flow (``<paths.data>/incoming/<dataset>/`` with its
``manifest.csv``) are added to the training split only, rescaled like the dataset's training rows,
with their image-level label and no mask (they have no pixel labels).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from wpcrack.config import COMPOSITE_DATASETS, Config, PrepareConfig
from wpcrack.errors import DataError
from wpcrack.geometry import grid_cells, resize_image, resize_mask, resize_square, scaled_size
from wpcrack.io import atomic_dir, list_images, read_image, read_mask, write_image, write_json

SPLITS = ("train", "val", "test")
PAPER_COUNTS = {  # WP-CrackNet section 4.1: the weakly-supervised training sets
    "deepcrack": {"train_crack": 300, "train_nocrack": 296, "test": 237},
    "cfd": {"train_crack": 268, "train_nocrack": 256, "test": 48},
    "crack500": {"train_crack": 1896, "train_nocrack": 756, "test": 1124},
}


@dataclass(frozen=True)
class Item:
    """One source image with its mask on disk."""

    name: str
    image: Path
    mask: Path
    source_id: str


@dataclass
class Row:
    image: str
    mask: str
    label: int
    split: str
    dataset: str
    source_id: str
    height: int
    width: int


class _Writer:
    """Writes rows into the temporary prepared folder and keeps the manifest rows."""

    def __init__(self, root: Path, dataset: str):
        self.root, self.dataset, self.rows = root, dataset, []
        self._names: set[str] = set()

    def _paths(self, split: str, name: str, suffix: str) -> tuple[str, str]:
        image, mask = f"images/{split}/{name}{suffix}", f"masks/{split}/{name}.png"
        if image in self._names:
            raise DataError(image, "two rows would share this output name")
        self._names.add(image)
        return image, mask

    def add(self, split: str, name: str, rgb: np.ndarray, mask: np.ndarray, label: int, source_id: str) -> None:
        """A derived row (rescaled image or patch), stored losslessly as PNG; mask {0,1} -> {0,255}."""
        image, mask_rel = self._paths(split, name, ".png")
        write_image(self.root / image, rgb)
        write_image(self.root / mask_rel, mask.astype(np.uint8) * 255)
        self.rows.append(Row(image, mask_rel, label, split, self.dataset, source_id, *rgb.shape[:2]))

    def add_unmasked(self, split: str, name: str, rgb: np.ndarray, label: int, source_id: str) -> None:
        """A row with an image-level label only (incoming data): no mask file, ``mask`` empty."""
        image, _ = self._paths(split, name, ".png")
        write_image(self.root / image, rgb)
        self.rows.append(Row(image, "", label, split, self.dataset, source_id, *rgb.shape[:2]))

    def add_linked(self, source_root: Path, row: dict, source: str) -> None:
        """A row of another prepared dataset, unchanged: its files hard-linked (copied where links fail),
        ``dataset`` naming the source and ``source_id`` prefixed with it."""
        stem, suffix = Path(row["image"]).stem, Path(row["image"]).suffix
        image, mask_rel = self._paths(row["split"], f"{source}-{stem}", suffix)
        pairs = [(row["image"], image)] + ([(row["mask"], mask_rel)] if row["mask"] else [])
        for rel, out in pairs:
            (self.root / out).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source_root / rel, self.root / out)
            except OSError:
                shutil.copyfile(source_root / rel, self.root / out)
        self.rows.append(Row(image, mask_rel if row["mask"] else "", int(row["label"]), row["split"], source,
                             f"{source}/{row['source_id']}", int(row["height"]), int(row["width"])))

    def add_original(self, split: str, item: Item, min_pixels: int) -> None:
        """A test row: the original image bytes (decoded once to validate) and its mask as 0/255 PNG."""
        rgb = read_image(item.image)
        mask = read_mask(item.mask, shape=rgb.shape[:2])
        image, mask_rel = self._paths(split, item.name, item.image.suffix.lower())
        (self.root / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.image, self.root / image)
        write_image(self.root / mask_rel, mask * 255)
        self.rows.append(Row(image, mask_rel, label_of(mask, min_pixels), split, self.dataset,
                             item.source_id, *rgb.shape[:2]))


def label_of(mask: np.ndarray, min_pixels: int) -> int:
    """Image-level label from a {0,1} mask: the only use of pixel labels in weak training data."""
    return int(int(mask.sum()) >= min_pixels)


def split_sources(ids: Iterable[str], fractions: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Seeded split of *source* ids (never of crops/patches); each fraction rounds, train gets the rest."""
    ids = sorted(set(ids))
    order = [ids[i] for i in rng.permutation(len(ids))]
    out, start = {}, 0
    for split, frac in fractions.items():
        n = int(round(len(ids) * frac))
        out.update({s: split for s in order[start:start + n]})
        start += n
    out.update({s: "train" for s in order[start:]})
    return out


def pairs(image_dir: Path, mask_dir: Path, source_of: Callable[[str], str] = lambda s: s) -> list[Item]:
    """Images of a folder with their same-named .png masks; a missing mask is an error."""
    items = []
    for image in list_images(image_dir):
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(mask, f"mask not found for image {image.name}")
        items.append(Item(image.stem, image, mask, source_of(image.stem)))
    return items


def free_windows(mask: np.ndarray, size: int) -> np.ndarray:
    """Flat indices (y * (W - size + 1) + x) of size x size windows with no crack pixel."""
    h, w = mask.shape
    if h < size or w < size:
        return np.empty(0, np.int64)
    ii = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S)
    sums = ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]
    return np.flatnonzero(sums == 0)


def cut_nocrack(writer: _Writer, split: str, items: list[Item], count: int, size: int, out_size: int,
                rng: np.random.Generator, matched: bool = False) -> int:
    """Cut ``count`` crack-free squares, cycling over the shuffled sources so patches spread out.

    ``matched=False`` (the paper's wording): ``size`` px squares of the photo, rescaled to ``out_size``.
    ``matched=True``: ``size`` px squares of the photo after it is rescaled to ``out_size`` like the
    crack images, kept at ``size`` px, so crack and no-crack images share scale and interpolation and
    the classifier cannot tell them apart by sharpness alone.
    Returns how many were made (fewer only when the sources run out of distinct free windows).
    """
    used: dict[int, set[int]] = {}
    exhausted: set[int] = set()
    order = rng.permutation(len(items)) if items else []
    made = 0
    while made < count and len(exhausted) < len(items):
        for i in order:
            if made >= count:
                break
            if i in exhausted:
                continue
            item = items[i]
            rgb = read_image(item.image)
            mask = read_mask(item.mask, shape=rgb.shape[:2])
            if matched:
                rgb, mask = resize_square(rgb, out_size), resize_mask(mask, (out_size, out_size))
            free = np.setdiff1d(free_windows(mask, size), list(used.get(i, ())))
            if free.size == 0:
                exhausted.add(i)
                continue
            k = int(rng.choice(free))
            used.setdefault(i, set()).add(k)
            y, x = divmod(k, mask.shape[1] - size + 1)
            patch = rgb[y:y + size, x:x + size] if matched else resize_square(rgb[y:y + size, x:x + size], out_size)
            writer.add(split, f"{item.name}_nc{y}_{x}", patch, np.zeros(patch.shape[:2], np.uint8), 0, item.source_id)
            made += 1
    return made


def _proportional(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` between splits in proportion to their sizes (largest share gets the remainder)."""
    n = sum(sizes.values()) or 1
    out = {k: int(round(total * v / n)) for k, v in sizes.items()}
    biggest = max(sizes, key=sizes.get)
    out[biggest] += total - sum(out.values())
    return out


def _rescaled_rows(writer: _Writer, split_of: dict[str, str], items: list[Item], size: int, min_pixels: int) -> None:
    for item in _progress(items, writer.dataset):
        rgb = read_image(item.image)
        mask = read_mask(item.mask, shape=rgb.shape[:2])
        writer.add(split_of[item.source_id], item.name, resize_square(rgb, size), resize_mask(mask, (size, size)),
                   label_of(mask, min_pixels), item.source_id)


def _nocrack_rows(writer: _Writer, split_of: dict[str, str], items: list[Item], total: int, size: int,
                  out_size: int, rng: np.random.Generator, scale: str = "photo") -> dict[str, int]:
    """Crack-free patches from the train and val sources, shared in proportion to their images."""
    by_split = {s: [it for it in items if split_of[it.source_id] == s] for s in ("train", "val")}
    wanted = _proportional(total, {s: len(v) for s, v in by_split.items()})
    made = {s: cut_nocrack(writer, s, by_split[s], wanted[s], size, out_size, rng, matched=scale == "matched")
            for s in by_split}
    return {s: wanted[s] - made[s] for s in made if wanted[s] > made[s]}


def deepcrack_source(stem: str) -> str:
    """``11289-3`` -> ``11289``: DeepCrack crops of one scene share the name before ``-<k>``."""
    head, sep, tail = stem.rpartition("-")
    return head if sep and tail.isdigit() else stem


def _deepcrack(p: PrepareConfig, raw: Path, writer: _Writer) -> dict:
    """Official 300/237 split; the val photos are carved by scene, and training images whose scene
    also appears in the official test split are dropped (12 photos; see docs/data.md)."""
    c = p.deepcrack
    train = raw_items(raw, "deepcrack")
    test = pairs(raw / "test_img", raw / "test_lab", deepcrack_source)
    test_sources = {it.source_id for it in test}
    dropped = [it for it in train if it.source_id in test_sources]
    train = [it for it in train if it.source_id not in test_sources]
    split_of = split_sources((it.source_id for it in train), {"val": c.val_fraction}, np.random.default_rng([p.seed, 0]))
    _rescaled_rows(writer, split_of, train, c.image_size, p.min_crack_pixels)
    short = _nocrack_rows(writer, split_of, train, c.nocrack_patches, c.nocrack_patch_size, c.image_size,
                          np.random.default_rng([p.seed, 1]), c.nocrack_scale)
    for item in _progress(test, "deepcrack test"):
        writer.add_original("test", item, p.min_crack_pixels)
    return {"dropped_test_overlap": len(dropped), **({"nocrack_shortfall": short} if short else {})}


def _cfd(p: PrepareConfig, raw: Path, writer: _Writer) -> dict:
    c = p.cfd
    items = raw_items(raw, "cfd")
    if len(items) != c.train_count + c.test_count:
        raise DataError(raw / "images", f"expected {c.train_count + c.test_count} images "
                        f"(train_count + test_count), found {len(items)}")
    rng = np.random.default_rng([p.seed, 0])
    split_of = split_sources((it.source_id for it in items), {"test": c.test_count / len(items)}, rng)
    train_ids = sorted(s for s, v in split_of.items() if v == "train")
    split_of.update(split_sources(train_ids, {"val": c.val_fraction}, rng))
    for item in _progress(items, "cfd"):
        split = split_of[item.source_id]
        if split == "test":
            writer.add_original("test", item, p.min_crack_pixels)
            continue
        rgb = read_image(item.image)
        mask = read_mask(item.mask, shape=rgb.shape[:2])
        for k, (y0, y1, x0, x1) in enumerate(grid_cells(*rgb.shape[:2], c.grid)):
            cell = mask[y0:y1, x0:x1]
            writer.add(split, f"{item.name}_g{k}", resize_square(rgb[y0:y1, x0:x1], c.patch_size),
                       resize_mask(cell, (c.patch_size, c.patch_size)), label_of(cell, p.min_crack_pixels), item.source_id)
    return {}


def crack500_source(stem: str) -> str:
    """``YYYYMMDD_hhmmss_<x>_<y>`` (or ``IMG_NNNN_<x>_<y>``) -> the first two fields, the source photo."""
    parts = stem.split("_")
    if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
        raise ValueError(stem)
    return "_".join(parts[:2])


def raw_items(raw: Path, dataset: str) -> list[Item]:
    """The photos a dataset's train and val rows are made of, at their own size, with their source
    ids (DeepCrack: the official training photos; CFD: all of them; CRACK500: the crops)."""
    if dataset == "deepcrack":
        return pairs(raw / "train_img", raw / "train_lab", deepcrack_source)
    if dataset == "cfd":
        return pairs(raw / "images", raw / "masks")
    root = raw / "crack500"
    named = []
    for it in pairs(root / "train", root / "label") + pairs(root / "val", root / "val_label"):
        try:
            named.append(Item(it.name, it.image, it.mask, crack500_source(it.name)))
        except ValueError:
            raise DataError(it.image, "file name is not <date>_<time>_<x>_<y> (source photo unknown)") from None
    return named


def _crack500(p: PrepareConfig, raw: Path, writer: _Writer) -> dict:
    c = p.crack500
    named = raw_items(raw, "crack500")
    split_of = split_sources((it.source_id for it in named), {"val": c.val_fraction, "test": c.test_fraction},
                             np.random.default_rng([p.seed, 0]))
    test = [it for it in named if split_of[it.source_id] == "test"]
    trainval = [it for it in named if split_of[it.source_id] != "test"]
    _rescaled_rows(writer, split_of, trainval, c.image_size, p.min_crack_pixels)
    short = _nocrack_rows(writer, split_of, trainval, c.nocrack_crops, c.nocrack_crop_size, c.image_size,
                          np.random.default_rng([p.seed, 1]), c.nocrack_scale)
    for item in _progress(test, "crack500 test"):
        writer.add_original("test", item, p.min_crack_pixels)
    return {"nocrack_shortfall": short} if short else {}


def _synthetic(p: PrepareConfig, raw: Path, writer: _Writer) -> dict:
    """Generated from ``prepare.synthetic.seed``; test images all contain cracks, like the real test sets."""
    from wpcrack.data.synthetic import make_image

    s = p.synthetic
    plan = {"train": (s.train_crack, s.train_nocrack), "val": (s.val_crack, s.val_nocrack), "test": (s.test, 0)}
    for split, (n_crack, n_free) in plan.items():
        for i in range(n_crack + n_free):
            rgb, mask = make_image(s.seed, split, i, s.size, crack=i < n_crack)
            mask = (mask > 0).astype(np.uint8)
            writer.add(split, f"{split}_{i:04d}", rgb, mask, label_of(mask, p.min_crack_pixels), f"{split}_{i:04d}")
    return {}


def _roads(p: PrepareConfig, prepared: Path, writer: _Writer) -> dict:
    """The union of the sources' prepared rows, as their own runs see them: each source's prepare has
    already brought its training rows to a crack width of a few pixels at 256 px (docs/data.md), so
    no row is rescaled again. ``prepared`` is ``<paths.data>/prepared``."""
    from wpcrack.data.manifest import load_manifest

    rows = {}
    missing = [s for s in p.roads.sources if not (prepared / s / "manifest.csv").is_file()]
    if missing:
        raise DataError(prepared / missing[0] / "manifest.csv", "not found: the roads run is made of the prepared "
                        + ", ".join(missing) + "; run " + " ".join(f"`dvc repro prepare@{s}`" for s in missing) + " first")
    for source in p.roads.sources:
        manifest = prepared / source / "manifest.csv"
        frame = load_manifest(manifest)
        for row in _progress(frame.to_dict("records"), f"roads <- {source}"):
            writer.add_linked(manifest.parent, row, source)
        rows[source] = {s: int((frame["split"] == s).sum()) for s in SPLITS}
    return {"sources": rows}


BUILDERS: dict[str, Callable[[PrepareConfig, Path, _Writer], dict]] = {
    "synthetic": _synthetic, "deepcrack": _deepcrack, "cfd": _cfd, "crack500": _crack500, "roads": _roads,
}


def train_size(p: PrepareConfig, dataset: str) -> int:
    """Side of the square training rows of ``dataset`` (what incoming images are rescaled to)."""
    return {"synthetic": p.synthetic.size, "deepcrack": p.deepcrack.image_size, "cfd": p.cfd.patch_size,
            "crack500": p.crack500.image_size, "roads": p.deepcrack.image_size}[dataset]


def versions_log(data_root: Path, dataset: str) -> Path:
    """``data_versions/<dataset>.csv`` beside the data folder (the repository root for ``paths.data: data``)."""
    return Path(data_root).parent / "data_versions" / f"{dataset}.csv"


def _logged_versions(log: Path) -> int:
    """Number of versions listed in the retraining flow's version log (0 if absent or header only)."""
    import pandas as pd

    if not log.is_file():
        return 0
    try:
        return len(pd.read_csv(log, dtype=str, keep_default_na=False))
    except pd.errors.EmptyDataError:
        return 0
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(log, f"not a readable CSV ({exc.__class__.__name__})") from None


def _incoming_rows(root: Path, dataset: str):
    """The incoming manifest of ``dataset`` as a DataFrame (None when there is no incoming data).

    A version log that lists versions while the folder (or its manifest) is missing means the images
    were not checked out from the DVC cache: that is an error, not "no incoming data"."""
    import pandas as pd

    from wpcrack.data.manifest import INCOMING_PREFIX  # incoming-<sha256[:20]>, as pipelines/retrain.py writes

    folder = root / "incoming" / dataset
    manifest = folder / "manifest.csv"
    log = versions_log(root, dataset)
    if not manifest.is_file():
        n = _logged_versions(log)
        if n:
            what = folder if not folder.is_dir() else manifest
            raise DataError(what, f"missing, but {log} lists {n} version(s) of the incoming images; "
                            f"run `dvc checkout data_versions/{dataset}.dvc` first")
        return None
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(manifest, f"not a readable CSV ({exc.__class__.__name__})") from None
    missing = [c for c in ("image", "label", "source_id") if c not in df.columns]
    if missing:
        raise DataError(manifest, f"incoming manifest lacks column(s) {', '.join(missing)}")
    checks = [
        (~df["label"].str.strip().isin(["0", "1"]), "label must be 0 or 1"),
        (~df["source_id"].str.startswith(INCOMING_PREFIX), f"source_id must start with {INCOMING_PREFIX!r}"),
        (df["image"].str.strip().eq(""), "image path is empty"),
    ]
    if "split" in df.columns:
        checks.append((~df["split"].isin(["", "train"]), "incoming rows are training data only (split must be train)"))
    if "dataset" in df.columns:
        checks.append((~df["dataset"].isin(["", dataset]), f"dataset must be {dataset}"))
    if "mask" in df.columns:
        checks.append((df["mask"].ne(""), "incoming rows have no mask (mask must be empty)"))
    for bad, problem in checks:
        if bad.any():
            lines = ", ".join(str(i + 2) for i in df.index[bad][:10])
            raise DataError(manifest, f"{problem} (line(s) {lines})")
    return df


def _incoming_scale(row: dict, manifest: Path) -> float | None:
    """The scale an incoming image is stored at: the one predict chose for it at intake (``scale``),
    None (squashed to the training size) for rows ingested without one."""
    text = str(row.get("scale") or "").strip()
    if not text:
        return None
    try:
        scale = float(text)
    except ValueError:
        scale = float("nan")
    if not 0 < scale <= 8:
        raise DataError(manifest, f"{row['image']}: scale {text!r} must be a number in (0, 8]")
    return scale


def _incoming(p: PrepareConfig, root: Path, writer: _Writer) -> dict:
    """Add the incoming images to the training split: at the scale predict chose for them at intake
    (aspect kept), or squashed like the training rows when none was recorded; label kept, no mask."""
    dataset = writer.dataset
    df = _incoming_rows(root, dataset)
    if df is None or df.empty:
        return {"rows": 0, "crack": 0, "nocrack": 0}
    folder = root / "incoming" / dataset
    size = train_size(p, dataset)
    for row in _progress(df.to_dict("records"), f"{dataset} incoming"):
        path = folder / row["image"]
        if not path.resolve().is_relative_to(folder.resolve()):
            raise DataError(path, "incoming image path leaves the incoming folder")
        checkout = f"run `dvc checkout data_versions/{dataset}.dvc` to restore the incoming images"
        try:
            rgb = read_image(path)
        except DataError as exc:
            raise DataError(path, f"{exc.problem}; incoming images are validated at ingestion, so the file "
                            f"is corrupt or was never checked out ({checkout})") from None
        if row.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != row["sha256"]:
            raise DataError(path, f"content differs from its sha256 in {folder / 'manifest.csv'} (corrupt; {checkout})")
        scale = _incoming_scale(row, manifest=folder / "manifest.csv")
        stored = resize_square(rgb, size) if scale is None else resize_image(rgb, scaled_size(rgb.shape, scale))
        writer.add_unmasked("train", f"incoming-{Path(row['image']).stem}", stored, int(row["label"]), row["source_id"])
    crack = int(df["label"].astype(int).sum())
    return {"rows": len(df), "crack": crack, "nocrack": len(df) - crack}


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", leave=False, disable=None)


def counts(rows: list[Row], dataset: str, extra: dict) -> dict:
    """counts.json: rows per split and label, source photos per split, and the paper's numbers."""
    out: dict = {"dataset": dataset}
    for split in SPLITS:
        sel = [r for r in rows if r.split == split]
        crack = sum(r.label for r in sel)
        out[split] = {"crack": crack, "nocrack": len(sel) - crack, "rows": len(sel),
                      "sources": len({r.source_id for r in sel})}
    if dataset in PAPER_COUNTS:
        out["paper"] = PAPER_COUNTS[dataset]
    return {**out, **extra}


def prepare(cfg: Config, dataset: str) -> Path:
    """Build ``<paths.data>/prepared/<dataset>/`` from ``<paths.data>/raw/<dataset>/``; return the manifest path."""
    from wpcrack.data.manifest import save_manifest

    if dataset not in BUILDERS:
        raise DataError(dataset, f"unknown dataset; valid: {', '.join(BUILDERS)}")
    root = Path(cfg.paths.data)
    raw, out = root / "raw" / dataset, root / "prepared" / dataset
    if dataset in COMPOSITE_DATASETS:
        raw = root / "prepared"
    elif dataset != "synthetic" and not raw.is_dir():
        raise DataError(raw, f"raw data not found; run `wpcrack download {dataset}` first")
    with atomic_dir(out) as tmp:
        writer = _Writer(tmp, dataset)
        extra = BUILDERS[dataset](cfg.prepare, raw, writer)
        if not writer.rows:
            raise DataError(raw, "no rows were produced")
        extra["incoming"] = _incoming(cfg.prepare, root, writer)
        save_manifest([asdict(r) for r in writer.rows], tmp / "manifest.csv", name=out / "manifest.csv")
        summary = counts(writer.rows, dataset, extra)
        write_json(tmp / "counts.json", summary)
        write_json(tmp / "split.json", {s: sorted({r.source_id for r in writer.rows if r.split == s}) for s in SPLITS})
    added = summary["incoming"]["rows"]
    print(f"{dataset}: " + "; ".join(f"{s} {summary[s]['crack']} crack + {summary[s]['nocrack']} no-crack"
                                     for s in SPLITS) + (f" (train incl. {added} incoming)" if added else "")
          + f" -> {out}")
    return out / "manifest.csv"
