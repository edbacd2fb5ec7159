"""Survey-scale prediction, one photo at a time: what each worker of the survey flow runs.

A season of survey photos is tens of thousands of 12 MP images. ``pipelines/survey.py`` shards them
over Dask workers; this module is what a worker does with one photo, and how the results are put
together:

- ``load_survey_model`` / ``worker_model``: the model once per worker process. It runs through ONNX
  Runtime when an export exists (``ensure_onnx`` exports each model version once into a cache kept
  between surveys and places it in the survey's folder before the workers start), torch otherwise:
  the detector, and the classifier that chooses the scale exactly as ``wpcrack predict`` chooses it
  (the classifier's graph beside the detector's).
- ``process_photo``: reads the bytes once (SHA-256, truncation, decoding), refuses photos over
  ``max_pixels``, predicts, writes the mask and overlay as predict names them, and writes the
  photo's row last (``rows/<key>.json``, atomically). A row with the same model version and
  settings means the photo is done: a killed run restarted with the same command does the rest,
  nothing twice. A bad file gives a row with its ``error``, never an exception.
- ``write_outputs``: the rows as one pandera-checked Parquet table, a GeoJSON of the photos with
  GPS, and a summary page (Markdown + PNG).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wpcrack.errors import DataError
from wpcrack.io import IMAGE_SUFFIXES, atomic_path, image_format, is_complete, write_image, write_json

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from wpcrack.config import Config

COLUMNS = ("path", "key", "sha256", "model_version", "settings", "engine", "height", "width", "scale",
           "scale_source", "crack_pixels", "crack_share", "length_px", "max_width_px", "mean_width_px",
           "length_mm", "max_width_mm", "mean_width_mm", "taken", "latitude", "longitude", "mask", "overlay",
           "seconds", "error")
MAX_PIXELS = 50_000_000  # a 12 MP survey photo is 12e6; larger ones are refused (memory per worker)


# --- which photos ------------------------------------------------------------------------------


def list_photos(source: str | Path) -> list[Path]:
    """The photos of a survey: a folder (searched recursively, sorted) or a CSV manifest with a
    ``path`` column (relative paths are relative to the CSV). Listed files that do not exist stay
    in the list: they become rows with an error, so nothing listed goes missing silently."""
    import pandas as pd

    source = Path(source)
    if source.is_dir():
        photos = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise DataError(source, "a survey manifest needs a column named path")
        photos = [Path(p) if Path(p).is_absolute() else source.parent / p for p in table["path"] if p]
    elif not source.exists():
        raise DataError(source, "survey folder or manifest not found")
    else:
        raise DataError(source, "a survey is a folder of photos or a .csv manifest with a path column")
    if not photos:
        raise DataError(source, f"no photos ({', '.join(IMAGE_SUFFIXES)})")
    return list(dict.fromkeys(p.resolve() for p in photos))


def photo_key(path: Path) -> str:
    """The photo's output name: its stem and a digest of its full path (two photos of one name in
    different folders never share outputs, and the name does not depend on how work was sharded)."""
    return f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


# --- the model, once per worker ------------------------------------------------------------------


@dataclass
class SurveyModel:
    detector: torch.nn.Module     # what predicts (ONNX Runtime or torch)
    chooser: torch.nn.Module      # whose classifier chooses the scale (the ONNX export with its classifier graph, else torch)
    cfg: Config
    version: str                  # registered version, or the weights' digest of a model folder
    engine: str                   # "onnxruntime" | "torch"


def model_version(model: str, source: str, weights_md5: str) -> str:
    """What makes outputs of two runs interchangeable: the registered model's name and version for
    ``models:/`` and the champion, otherwise the weights' digest."""
    if source.startswith("models:/"):
        from wpcrack.tracking.runs import client

        name, _, ref = source.removeprefix("models:/").partition("@")
        if ref:
            return f"{name}/{client().get_model_version_by_alias(name, ref).version}"
        return source.removeprefix("models:/")
    return f"md5:{weights_md5}"


def settings_digest(cfg: Config, mm_per_pixel: float | None) -> str:
    """The inference settings that change a photo's outputs (threshold, tiles, flips, scale search,
    pixel size): a row made with other settings is made again."""
    settings = {"evaluate": dataclasses.asdict(cfg.evaluate), "predict": dataclasses.asdict(cfg.predict),
                "mm_per_pixel": mm_per_pixel}
    return hashlib.md5(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def onnx_cache() -> Path:
    """Where exports are kept between surveys: ``$WPCRACK_ONNX_CACHE``, else the user's cache folder."""
    if os.environ.get("WPCRACK_ONNX_CACHE"):
        return Path(os.environ["WPCRACK_ONNX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wpcrack" / "onnx"


def _place(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems), written atomically."""
    import shutil

    with atomic_path(target) as tmp:
        try:
            Path(tmp).unlink(missing_ok=True)
            Path(tmp).hardlink_to(source)
        except OSError:
            shutil.copyfile(source, tmp)


def ensure_onnx(detector: torch.nn.Module, cfg: Config, folder: Path, weights_md5: str,
                cache: Path | None = None) -> Path | None:
    """The model's ONNX export in ``folder`` (the survey's, where every worker finds it), exported once
    per weights digest into ``cache`` (default ``onnx_cache()``) and placed from there into each
    survey's folder; None when it cannot be exported (the survey then runs on torch)."""
    from wpcrack.deploy.detection import classifier_path, supports_gate
    from wpcrack.deploy.export import export_onnx

    def complete(path: Path) -> bool:
        return path.is_file() and (classifier_path(path).is_file() or not supports_gate(detector))

    path = folder / f"{weights_md5}.onnx"
    if complete(path):
        return path
    kept = (cache or onnx_cache()) / path.name
    if not complete(kept):
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(detector, cfg, kept)
        except Exception as exc:  # the exporter raises many types; torch still works
            print(f"survey: ONNX export failed ({str(exc).splitlines()[0][:200]}); predicting with torch")
            return None
    folder.mkdir(parents=True, exist_ok=True)
    if classifier_path(kept).is_file():  # the classifier first: a detector file never stands beside a stale one
        _place(classifier_path(kept), classifier_path(path))
    _place(kept, path)
    return path


def load_survey_model(model: str, dataset: str, params: str | Path | None, onnx: str | Path | None,
                      threads: int | None = None, version: str | None = None, cfg: Config | None = None) -> SurveyModel:
    """The torch model, and with ``onnx`` its export run by ONNX Runtime, which then detects and, with
    its classifier graph, chooses the scale too; ``version`` and ``cfg`` as the flow worked them out
    once (else worked out here: weights digest, registry, params). An export with its classifier
    graph, given both, needs no torch model at all: a worker then starts in a fraction of the time
    and holds a few hundred MB less."""
    import torch

    from wpcrack.deploy.detection import load_onnx, supports_gate, weights_digest
    from wpcrack.deploy.predict import load_detector

    if threads:
        import cv2

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)  # OpenCV's own pool (decode, resize, blur) would use every core in every worker
    detector = load_onnx(onnx, threads)[0] if onnx else None
    if detector is not None and supports_gate(detector) and version and cfg is not None:
        return SurveyModel(detector, detector, cfg, version, "onnxruntime")
    chooser, loaded, source = load_detector(model, dataset, params)
    cfg = cfg if cfg is not None else loaded
    version = version or model_version(model, source, weights_digest(chooser))
    if detector is not None:
        return SurveyModel(detector, detector if supports_gate(detector) else chooser, cfg, version, "onnxruntime")
    return SurveyModel(chooser, chooser, cfg, version, "torch")


_MODELS: dict[tuple, SurveyModel] = {}  # per worker process: the loaded model of each spec
LOADS = {"models": 0}  # models this process has loaded (the flow reports it: once per worker)


def worker_model(spec: dict[str, Any]) -> SurveyModel:
    """The model of the survey flow's ``spec``, loaded once per worker process. The cache lives here, in
    a module the workers import, not in the flow's: a flow run as ``python -m pipelines.survey`` is
    ``__main__``, whose functions Dask ships by value, each task with globals of its own (the model was
    loaded again for every shard, 21 MB a shard never given back)."""
    key = tuple(sorted((k, str(v)) for k, v in spec.items()))
    if key not in _MODELS:
        _MODELS[key] = load_survey_model(spec["model"], spec["dataset"], spec["params"], spec["onnx"],
                                         spec["threads"], spec["version"], spec.get("cfg"))
        LOADS["models"] += 1
    return _MODELS[key]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (macOS, musl: nothing to trim)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_memory() -> None:
    """Give the heap's free pages back to the system: after a 12 MP photo a worker would otherwise keep
    much of its freed maps, and a 12 MP photo's peak comes on top (measured between photos over 160 of
    the survey bench's: 1.0-1.25 GB untrimmed, 0.9 GB trimmed, a few microseconds a call)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# --- one photo -----------------------------------------------------------------------------------


def _ratio(value: Any) -> float:
    return float(value[0]) / float(value[1]) if isinstance(value, tuple) else float(value)


def read_exif(photo: Path | bytes) -> tuple[str | None, float | None, float | None]:
    """(capture time ISO 8601, latitude, longitude) from a photo's EXIF (its file or its bytes), each
    None when absent."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(photo) if isinstance(photo, bytes) else photo) as img:
            exif = img.getexif()
    except Exception:  # not an image PIL reads, or broken EXIF: no metadata, the photo itself is judged elsewhere
        return None, None, None
    taken = exif.get_ifd(0x8769).get(36867) or exif.get(306)  # DateTimeOriginal, else DateTime
    try:
        taken = dt.datetime.strptime(str(taken), "%Y:%m:%d %H:%M:%S").isoformat() if taken else None
    except ValueError:
        taken = None
    gps = exif.get_ifd(0x8825)
    lat = lon = None
    if 2 in gps and 4 in gps:
        try:
            lat = sum(_ratio(v) / 60 ** i for i, v in enumerate(gps[2])) * (-1 if gps.get(1) == "S" else 1)
            lon = sum(_ratio(v) / 60 ** i for i, v in enumerate(gps[4])) * (-1 if gps.get(3) == "W" else 1)
        except (TypeError, ValueError, ZeroDivisionError, IndexError):
            lat = lon = None
        if lat is not None and not (-90 <= lat <= 90 and -180 <= lon <= 180):
            lat = lon = None
    return taken, lat, lon


def row_path(out: Path, key: str) -> Path:
    return out / "rows" / f"{key}.json"


def done_row(out: Path, path: Path, version: str, settings: str) -> dict | None:
    """The photo's row if an earlier run made it with this model version and these settings."""
    file = row_path(out, photo_key(path))
    if not file.is_file():
        return None
    try:
        row = json.loads(file.read_text())
    except json.JSONDecodeError:  # the row is written atomically; a broken one is redone
        return None
    return row if (row.get("model_version"), row.get("settings")) == (version, settings) else None


def decode(path: Path, max_pixels: int) -> tuple[np.ndarray, bytes]:
    """(RGB photo, its file's bytes: read once for the hash and the EXIF too); a DataError says what
    is wrong with the file."""
    import cv2
    from PIL import Image

    if not path.is_file():
        raise DataError(path, "file not found")
    data = path.read_bytes()
    if not data:
        raise DataError(path, "file is empty")
    if not is_complete(data, image_format(data[:16])):
        raise DataError(path, "truncated file (incomplete copy or upload?)")
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header alone: no pixels decoded yet
            width, height = img.size
    except Exception:  # PIL cannot identify it; OpenCV below decides
        width = height = 0
    if width * height > max_pixels:
        raise DataError(path, f"{width}x{height} px, more than the {max_pixels / 1e6:g} MP a survey photo may "
                              "have (--max-megapixels)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(path, "cannot be decoded as an image (corrupt or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), data


def process_photo(path: Path, model: SurveyModel, out: Path, mm_per_pixel: float | None = None,
                  max_pixels: int = MAX_PIXELS, settings: str | None = None) -> dict[str, Any]:
    """The photo's row (done before: read back; else predicted, outputs written, row written last)."""
    from wpcrack.deploy.detection import probability_map
    from wpcrack.deploy.measure import crack_stats
    from wpcrack.deploy.predict import overlay

    settings = settings or settings_digest(model.cfg, mm_per_pixel)
    earlier = done_row(out, path, model.version, settings)
    if earlier is not None:
        return {**earlier, "skipped": True}
    key, start = photo_key(path), time.perf_counter()
    row: dict[str, Any] = {**dict.fromkeys(COLUMNS), "path": str(path), "key": key,
                           "model_version": model.version, "settings": settings, "engine": model.engine}
    try:
        rgb, data = decode(path, max_pixels)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        prediction = probability_map(model.detector, rgb, model.cfg, mm_per_pixel=mm_per_pixel, chooser=model.chooser)
        mask = prediction.prob > model.cfg.evaluate.threshold
        row.update(mask=f"masks/{key}_mask.png", overlay=f"overlays/{key}_overlay.jpg")
        write_image(out / row["mask"], mask.astype(np.uint8) * 255)
        write_image(out / row["overlay"], overlay(rgb, mask))
        row.update(height=rgb.shape[0], width=rgb.shape[1], scale=round(prediction.choice.scale, 6),
                   scale_source=prediction.choice.source, **crack_stats(mask, mm_per_pixel))
        row["taken"], row["latitude"], row["longitude"] = read_exif(data)
    except DataError as exc:
        row["error"] = exc.problem
    row["seconds"] = time.perf_counter() - start
    write_json(row_path(out, key), row)
    return {**row, "skipped": False}


# --- the survey's outputs ------------------------------------------------------------------------


def schema():
    """One row per listed photo: figures where it was read, an ``error`` where it was not."""
    import pandera.pandas as pa

    def figure(dtype: str, low: float | None = None, high: float | None = None) -> pa.Column:
        checks = [pa.Check.in_range(low, high)] if high is not None else [pa.Check.ge(low)] if low is not None else []
        return pa.Column(dtype, checks, nullable=True)

    return pa.DataFrameSchema(
        {
            "path": pa.Column(str, unique=True),
            "sha256": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{64}$"), nullable=True),
            "model_version": pa.Column(str),
            "scale": figure("Float64", 0.0),
            "crack_share": figure("Float64", 0.0, 1.0),
            "length_px": figure("Float64", 0.0),
            "max_width_px": figure("Float64", 0.0),
            "mean_width_px": figure("Float64", 0.0),
            "latitude": figure("Float64", -90.0, 90.0),
            "longitude": figure("Float64", -180.0, 180.0),
            "error": pa.Column(str, nullable=True),
        },
        checks=[pa.Check(lambda df: df["error"].notna() | (df["sha256"].notna() & df["crack_share"].notna()),
                         error="a row without an error has its sha256 and figures")],
        strict=False,
    )


def table(rows: list[dict]) -> pd.DataFrame:
    """The rows as the survey table (one per photo, in the listing's order), schema-checked."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype({
        **{k: "Int64" for k in ("height", "width", "crack_pixels")},
        **{k: "Float64" for k in ("scale", "crack_share", "length_px", "max_width_px", "mean_width_px", "length_mm",
                                  "max_width_mm", "mean_width_mm", "latitude", "longitude", "seconds")},
        **{k: "string" for k in ("sha256", "taken", "error", "mask", "overlay", "scale_source")},
    })
    return schema().validate(frame)


def geojson(frame: pd.DataFrame) -> dict:
    """The photos with GPS as points, with their crack figures (opens in QGIS)."""
    located = frame[frame["latitude"].notna() & frame["longitude"].notna()]
    keep = ["path", "taken", "crack_share", "length_px", "max_width_px", "length_mm", "max_width_mm", "overlay"]
    props = json.loads(located[keep].to_json(orient="records"))
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(lon), float(lat)]}, "properties": p}
        for lat, lon, p in zip(located["latitude"], located["longitude"], props, strict=True)]}


def summary_figure(frame: pd.DataFrame, out: Path, worst: int) -> list[str]:
    """``summary.png``: the histogram of crack share and the ``worst`` photos' overlays; their paths."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["error"].isna()]
    top = ok.sort_values("crack_share", ascending=False).head(worst)
    cols = max(1, min(4, len(top)))
    rows = 1 + (len(top) + cols - 1) // cols
    fig = plt.figure(figsize=(3.2 * cols, 2.6 * rows))
    ax = fig.add_subplot(rows, 1, 1)
    ax.hist(ok["crack_share"].astype(float) * 100, bins=40, color="#b03030")
    ax.set(xlabel="crack share of the photo, %", ylabel="photos", title=f"{len(ok)} photos")
    for i, row in enumerate(top.to_dict("records")):
        thumb = cv2.imread(str(out / row["overlay"]), cv2.IMREAD_REDUCED_COLOR_4)
        sub = fig.add_subplot(rows, cols, cols + i + 1)
        if thumb is not None:
            sub.imshow(cv2.cvtColor(thumb, cv2.COLOR_BGR2RGB))
        sub.set_title(f"{Path(row['path']).name}\n{row['crack_share'] * 100:.2f} %", fontsize=7)
        sub.axis("off")
    fig.tight_layout()
    with atomic_path(out / "summary.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return [row["path"] for row in top.to_dict("records")]


def write_outputs(frame: pd.DataFrame, out: Path, meta: dict[str, Any], worst: int = 8) -> dict[str, Any]:
    """``survey.parquet``, ``survey.geojson``, ``summary.png`` and ``summary.md`` in ``out``; the counts."""
    ok = frame["error"].isna()
    counts = {"photos": len(frame), "predicted": int(ok.sum()), "errors": int((~ok).sum()),
              "with_gps": int((frame["latitude"].notna()).sum()),
              "with_cracks": int((frame.loc[ok, "crack_pixels"] > 0).sum())}
    with atomic_path(out / "survey.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    write_json(out / "survey.geojson", geojson(frame))
    top = summary_figure(frame, out, worst)
    lines = [f"# Survey: {counts['photos']} photos", "",
             f"Model {meta['model_version']} ({meta['engine']}), {meta['workers']} worker(s), "
             f"{meta['seconds']:.0f} s for {meta['processed']} photos ({meta['photos_per_s']:.2f} photos/s); "
             f"{meta['skipped']} were done by an earlier run.", "",
             f"- predicted: {counts['predicted']}, with cracks: {counts['with_cracks']}, with GPS: {counts['with_gps']}",
             f"- errors: {counts['errors']}", "",
             "![crack share and the photos with the most crack](summary.png)", "",
             "| photo | crack share % | length px | max width px |", "| --- | ---: | ---: | ---: |"]
    for path in top:
        r = frame[frame["path"] == path].iloc[0]
        lines.append(f"| {Path(path).name} | {r['crack_share'] * 100:.2f} | {r['length_px']:.0f} | {r['max_width_px']:.1f} |")
    errors = frame[~ok]
    if len(errors):
        lines += ["", "## Photos not predicted", "", "| photo | problem |", "| --- | --- |"]
        lines += [f"| {r['path']} | {r['error']} |" for r in errors.head(200).to_dict("records")]
    with atomic_path(out / "summary.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return counts
