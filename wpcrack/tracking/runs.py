"""MLflow tracking: one run per stage, the detector as a registered pyfunc, a ``champion`` alias.

The store is ``$MLFLOW_TRACKING_URI``, by default ``sqlite:///<repo root>/mlflow.db`` (repo root:
the nearest folder at or above the working directory that holds ``params.yaml``). With a sqlite
store, artifacts go to ``mlartifacts/`` beside the database, so ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` at the repo root shows runs, artifacts and models.

Every run is tagged ``dataset``, ``variant``, ``profile``, ``git_commit``, ``git_dirty``, ``stage``
(e.g. ``train@deepcrack``) and, when DVC runs the command, ``dvc_stage`` (from ``$DVC_STAGE``).

Models are registered as ``<tracking.model_name_prefix>-<dataset>``; each version carries the same
tags plus ``test_iou`` once it has been scored. The serving model is the alias ``champion``
(aliases, not the deprecated stages), moved by the promotion gate (``wpcrack.tracking.gate``).

MLflow is imported inside the functions: ``wpcrack --help`` must not pay for it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wpcrack.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from wpcrack.config import Config

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CHAMPION = "champion"
EVALUATION_PREFIX = "detector/"  # evaluate logs the detector's metrics as detector/<name>


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding params.yaml, else ``start``."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return start


def tracking_uri() -> str:
    return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """``mlartifacts/`` beside a sqlite database; None lets a tracking server decide."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def mlflow_module():
    """The ``mlflow`` module, pointed at this project's store, telemetry off."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def client():
    return mlflow_module().MlflowClient()


def model_name(prefix: str, dataset: str | None) -> str:
    """Registered model name of a dataset's detector, e.g. ``wpcrack-deepcrack``."""
    if not dataset:
        raise ConfigError("a registered model needs a dataset")
    return f"{prefix}-{dataset}"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(root: str | Path | None = None) -> str:
    """HEAD of the repository at ``root`` (default: repo root), or ``unknown`` outside git."""
    return _git(Path(root or repo_root()), "rev-parse", "HEAD") or "unknown"


def run_tags(cfg: Config, stage: str) -> dict[str, str]:
    """The tags every run and model version carries."""
    root = repo_root()
    commit = git_commit(root)
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit != "unknown" else None
    tags = {
        "dataset": cfg.dataset or "",
        "variant": cfg.variant,
        "profile": cfg.profile,
        "stage": stage,
        "git_commit": commit,
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "mlflow.source.git.commit": commit,
    }
    if os.environ.get("DVC_STAGE"):
        tags["dvc_stage"] = os.environ["DVC_STAGE"]
    return tags


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite store) on first use."""
    mlflow = mlflow_module()
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_root(mlflow.get_tracking_uri()))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel stage
        return mlflow.get_experiment_by_name(name).experiment_id


class Tracker:
    """The open run of one stage. Create it with ``start_run``."""

    def __init__(self, cfg: Config, stage: str, run_id: str, tags: dict[str, str]):
        self.cfg = cfg
        self.stage = stage
        self.run_id = run_id
        self.tags = tags

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters, nested mappings flattened with dots (e.g. ``cfg.to_dict()``)."""
        mlflow_module().log_params({k: str(v) for k, v in flatten(params).items()}, run_id=self.run_id)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        mlflow_module().log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self.run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole folder."""
        from wpcrack.errors import DataError

        path = Path(path)
        mlflow = mlflow_module()
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path, run_id=self.run_id)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path, run_id=self.run_id)
        else:
            raise DataError(path, "artifact to log not found")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow_client = client()
        for key, value in tags.items():
            mlflow_client.set_tag(self.run_id, key, str(value))

    def log_detector(self, slim_model, input_example: Any = None) -> int | None:
        """Log the detector as a pyfunc (``wpcrack.deploy.serving``) with signature and input example,
        register it as ``<prefix>-<dataset>`` and return the new version (None when
        ``tracking.log_models`` is off). ``slim_model`` may be a SlimDetector or a WPCrackNet.

        The crack width the detector learned at is measured first (``wpcrack.deploy.calibrate.measure``,
        as ``wpcrack calibrate`` does) and logged with it, so the served model chooses each photo's scale
        as ``wpcrack predict`` does; where it cannot be measured the model is logged without it."""
        if not self.cfg.tracking.log_models:
            return None
        import wpcrack
        from wpcrack.deploy import serving
        from wpcrack.deploy.detection import DEFAULT_GATE, weights_digest

        mlflow = mlflow_module()
        name = model_name(self.cfg.tracking.model_name_prefix, self.cfg.dataset)
        detector = slim_model.slim() if hasattr(slim_model, "slim") else slim_model
        scale = self._crack_width(detector)
        with tempfile.TemporaryDirectory(prefix="wpcrack-model-") as tmp:
            artifacts = serving.save_artifacts(detector, self.cfg, Path(tmp) / "artifacts", scale)
            example = serving.example_frame(input_example) if input_example is not None else None
            info = mlflow.pyfunc.log_model(
                name="detector",
                python_model=serving.__file__,
                artifacts=artifacts,
                code_paths=[_package_copy(Path(wpcrack.__file__).parent, Path(tmp) / "code")],
                signature=serving.signature(self.cfg.evaluate.threshold, DEFAULT_GATE),
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=name,
            )
        version = int(info.registered_model_version)
        mlflow_client = mlflow.MlflowClient()
        for key, value in {**self.tags, WEIGHTS_TAG: weights_digest(detector)}.items():
            if not key.startswith("mlflow."):
                mlflow_client.set_model_version_tag(name, str(version), key, value)
        if scale:
            tag_crack_width(self.cfg, scale)  # the width tag, as `wpcrack calibrate` writes it
        self.set_tags({"registered_model": name, "model_version": version})
        return version

    def _crack_width(self, detector) -> dict | None:
        """``calibrate.measure`` of ``detector`` on this run's training rows; None, said on stderr, where
        there is nothing to measure on (no prepared data, or no crack found on its crack rows)."""
        import sys

        from wpcrack.deploy.calibrate import measure
        from wpcrack.errors import DataError

        try:
            return measure(self.cfg, detector)
        except DataError as exc:
            print(f"{self.stage}: the model is logged without its training crack width ({exc}); "
                  "served, it chooses scales by its classifier alone", file=sys.stderr)
            return None


def _package_copy(package: Path, dest: Path) -> str:
    """A copy of the ``wpcrack`` package without caches, to log as the model's code."""
    import shutil

    target = dest / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def _requirements() -> list[str]:
    """What the serving environment needs, pinned to what trained the model (no slow inference)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("mlflow", "torch", "torchvision", "numpy", "pandas", "opencv-python-headless", "pyyaml", "scipy", "pillow")
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


@contextlib.contextmanager
def start_run(cfg: Config, stage: str, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """An MLflow run for one stage of one dataset/variant; FAILED if the block raises."""
    mlflow = mlflow_module()
    all_tags = {**run_tags(cfg, stage), **(tags or {})}
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id(cfg.tracking.experiment), run_name=stage,
                          tags=all_tags, nested=nested) as run:
        context = DATASET_CONTEXTS.get(stage.split("@")[0])
        if context:
            log_prepared_dataset(cfg, context)
        yield Tracker(cfg, stage, run.info.run_id, all_tags)


DATASET_CONTEXTS = {"train": "training", "evaluate": "evaluation"}  # stage -> MLflow input context


def log_prepared_dataset(cfg: Config, context: str) -> str | None:
    """Log the prepared manifest as the active run's input dataset (the UI's Dataset column), named
    ``<dataset>-prepared`` with the manifest's md5 (its DVC hash in dvc.lock) as digest, so two runs
    on the same data version show the same digest. Returns the digest (None without a manifest)."""
    import hashlib
    import warnings

    import pandas as pd

    manifest = Path(cfg.paths.data) / "prepared" / cfg.dataset / "manifest.csv"
    if not manifest.is_file():
        return None
    digest = hashlib.md5(manifest.read_bytes()).hexdigest()
    mlflow = mlflow_module()
    with warnings.catch_warnings():  # the schema's note on integer columns concerns model inputs, not this
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(pd.read_csv(manifest), source=str(manifest.resolve()),
                                          name=f"{cfg.dataset}-prepared", digest=digest)
        mlflow.log_input(dataset, context=context, tags={"dvc_md5": digest})
    return digest


# --- model registry: champion --------------------------------------------------------------------


WEIGHTS_TAG = "weights_md5"  # model version tag: deploy.detection.weights_digest of the registered detector


def tag_crack_width(cfg: Config, result: Mapping[str, Any]) -> list[str]:
    """Tag every registered version of ``result["weights_md5"]``'s weights with its measured crack width
    and fitted width weight (``wpcrack.deploy.calibrate.measure``), so `predict --model champion` (or
    ``models:/...``) chooses scales as the model folder does; the versions tagged."""
    from wpcrack.deploy.detection import RECORDED

    c = client()
    name = model_name(cfg.tracking.model_name_prefix, cfg.dataset)
    versions = [v for v in c.search_model_versions(f"name = '{name}'")
                if v.tags.get(WEIGHTS_TAG) == result["weights_md5"]]
    for v in versions:
        for tag, key in RECORDED.items():
            if result.get(key) is not None:
                c.set_model_version_tag(name, v.version, tag, repr(result[key]))
    return [str(v.version) for v in versions]


def score_tag(metric: str = "iou") -> str:
    return f"test_{metric}"


def champion_version(name: str):
    """The ModelVersion the ``champion`` alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def latest_version(name: str, variant: str | None = None):
    """The newest registered version of ``name`` (only versions tagged ``variant``, if given)."""
    found = client().search_model_versions(f"name = '{name}'")
    found = [v for v in found if variant is None or v.tags.get("variant") == variant]
    return max(found, key=lambda v: int(v.version), default=None)


def version_score(name: str, version: int | str, metric: str = "iou") -> float | None:
    """A version's recorded test score: its ``test_<metric>`` tag, else the ``detector/<metric>`` of
    the first evaluate run of its dataset/variant that started after the version was registered."""
    c = client()
    mv = c.get_model_version(name, str(version))
    if score_tag(metric) in mv.tags:
        return float(mv.tags[score_tag(metric)])
    dataset, variant = mv.tags.get("dataset"), mv.tags.get("variant")
    if not dataset or not variant or not mv.run_id:
        return None
    runs = c.search_runs(
        [c.get_run(mv.run_id).info.experiment_id],
        filter_string=(f"tags.dataset = '{dataset}' and tags.variant = '{variant}' and tags.stage LIKE 'evaluate@%' "
                       f"and attributes.start_time >= {mv.creation_timestamp}"),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    value = runs[0].data.metrics.get(EVALUATION_PREFIX + metric) if runs else None
    return None if value is None else float(value)


def record_score(name: str, version: int | str, score: float, metric: str = "iou") -> None:
    """Remember a version's test score on the version itself (tag ``test_<metric>``)."""
    client().set_model_version_tag(name, str(version), score_tag(metric), repr(float(score)))


# --- queries for reports -------------------------------------------------------------------------


def search_runs(experiment: str = "wpcrack", dataset: str | None = None, variant: str | None = None,
                stage: str | None = None, max_results: int = 1000) -> pd.DataFrame:
    """Runs of the experiment as a DataFrame (``metrics.*``, ``params.*``, ``tags.*`` columns),
    newest first, filtered by tags; empty when the experiment does not exist yet."""
    import pandas as pd

    mlflow = mlflow_module()
    if mlflow.get_experiment_by_name(experiment) is None:
        return pd.DataFrame()
    filters = [f"tags.{k} = '{v}'" for k, v in (("dataset", dataset), ("variant", variant), ("stage", stage)) if v]
    return mlflow.search_runs(experiment_names=[experiment], filter_string=" and ".join(filters),
                              order_by=["attributes.start_time DESC"], max_results=max_results)


def latest_metrics(experiment: str = "wpcrack", dataset: str | None = None, variant: str | None = None,
                   stage: str | None = None) -> dict[str, float]:
    """Metrics of the newest matching run ({} if none), e.g. for a comparison table."""
    runs = search_runs(experiment, dataset, variant, stage, max_results=1)
    if runs.empty:
        return {}
    row = runs.iloc[0]
    return {k.removeprefix("metrics."): float(row[k]) for k in runs.columns
            if k.startswith("metrics.") and row[k] == row[k]}
