"""Typed view of params.yaml.

Resolution order for one training run: the base sections, then the dataset's profile
(``profiles.<name>``), then the dataset's own settings for that profile
(``datasets.<name>.overrides.<profile>``), then the variant (``variants.<name>``; the name
``<name>-seed<N>`` also sets ``train.seed`` N), then command-line
overrides (``section.key=value``). Unknown keys and values of the wrong type are errors, so a typo in
``dvc exp run -S ...`` fails loudly instead of silently training the default.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from wpcrack.errors import ConfigError

DATASET_NAMES = ("synthetic", "deepcrack", "cfd", "crack500", "roads")
COMPOSITE_DATASETS = ("roads",)  # unions of other prepared datasets (wpcrack.data.prepare)
BACKBONES = ("resnet38d", "mobilenet_v2", "resnet18", "resnet50", "tiny")


@dataclass(frozen=True)
class DatasetEntry:
    """Per-dataset choices: the profile, and ``overrides``: per profile name, sections of
    params.yaml merged over that profile for this dataset only (checked like them), for what a
    dataset's imagery or size needs under that profile."""

    profile: str = "cpu"
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PathsConfig:
    data: str = "data"
    models: str = "models"
    results: str = "results"
    reports: str = "reports"


@dataclass(frozen=True)
class SyntheticPrepare:
    """Procedural road photos: thin cracks that fade, among shadows, stains, joints and paint (docs/data.md)."""

    size: int = 96
    train_crack: int = 48
    train_nocrack: int = 48
    val_crack: int = 8
    val_nocrack: int = 8
    test: int = 12
    seed: int = 7
    # the generated roads' ground sampling distance (training rows and survey photos share it): with
    # `wpcrack predict --mm-per-pixel`, a photo's scale is the ratio of the two (wpcrack.deploy.scale)
    mm_per_pixel: float = 1.0


@dataclass(frozen=True)
class DeepCrackPrepare:
    image_size: int = 256
    nocrack_patches: int = 296
    nocrack_patch_size: int = 128
    nocrack_scale: Literal["photo", "matched"] = "photo"
    val_fraction: float = 0.1
    eval_size: int = 256


@dataclass(frozen=True)
class CFDPrepare:
    train_count: int = 70
    test_count: int = 48
    grid: int = 3
    patch_size: int = 256
    val_fraction: float = 0.1


@dataclass(frozen=True)
class Crack500Prepare:
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    image_size: int = 256
    nocrack_crops: int = 756
    nocrack_crop_size: int = 128
    nocrack_scale: Literal["photo", "matched"] = "photo"


@dataclass(frozen=True)
class RoadsPrepare:
    """The multi-source run: the train and val rows of these prepared datasets, each at the pixel
    scale of its own rows (docs/data.md), and every source's test split."""

    sources: tuple[str, ...] = ("deepcrack", "cfd", "crack500")


@dataclass(frozen=True)
class PrepareConfig:
    seed: int = 2024
    min_crack_pixels: int = 1
    synthetic: SyntheticPrepare = field(default_factory=SyntheticPrepare)
    deepcrack: DeepCrackPrepare = field(default_factory=DeepCrackPrepare)
    cfd: CFDPrepare = field(default_factory=CFDPrepare)
    crack500: Crack500Prepare = field(default_factory=Crack500Prepare)
    roads: RoadsPrepare = field(default_factory=RoadsPrepare)


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["resnet38d", "mobilenet_v2", "resnet18", "resnet50", "tiny"] = "mobilenet_v2"
    pretrained: bool = True
    weights_path: str | None = None
    cam_channels: int = 256
    detector_inputs: Literal["cls", "cls+rec"] = "cls+rec"
    paam: bool = True
    paam_channels: int = 128
    paam_reduction: int = 16
    detector_channels: int = 64
    detector_decoder: Literal["transposed", "unet"] = "transposed"
    decoder_channels: int = 64


@dataclass(frozen=True)
class CECCMConfig:
    enabled: bool = True
    mode: Literal["paper", "release"] = "paper"
    sigma: float = 0.25


@dataclass(frozen=True)
class LossConfig:
    lambda_c1: float = 1.0
    lambda_r1_c: float = 0.5
    lambda_r1_r: float = 0.5
    lambda_c2: float = 1.0
    lambda_r2_c: float = 0.8
    lambda_r2_r: float = 0.3
    lambda_cec: float = 0.5
    det_pos_weight: float = 1.0
    det_dice: float = 0.0


@dataclass(frozen=True)
class DarknessConfig:
    """Locally dark pixels (``wpcrack.method.darkness``); block and min_area in pixels of the image it runs on."""

    block: int = 61
    offset: float = 25.0
    min_area: int = 80
    bilateral_d: int = 5
    bilateral_sigma_color: float = 50.0
    bilateral_sigma_space: float = 5.0


@dataclass(frozen=True)
class PseudoLabelConfig:
    method: Literal["crf", "darkness"] = "crf"  # crf: the paper's denseCRF of the CAM
    source: Literal["crop", "image"] = "crop"  # crop: the paper's online CAM of each training crop
    refresh_epochs: int = 1  # source image: whole-image labels are remade every this many epochs
    cam_scales: tuple[float, ...] = (1.0,)  # source image: CAM averaged over these scales ...
    cam_flip: bool = False  # ... and their horizontal flips
    cam_threshold: float = 0.2  # method darkness: the CAM's crack region
    cam_gate: Literal["pixel", "component"] = "pixel"  # darkness: keep dark pixels / whole dark blobs in that region
    darkness: DarknessConfig = field(default_factory=DarknessConfig)
    ignore_band: int = 0  # pixels this close to a crack label, but not in it, get no loss
    negatives: bool = False  # crack-free images train the detector as all-background targets
    bg_power: float = 0.5
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    workers: int = 1
    min_pixels: int = 1
    # Composite datasets (roads): the pseudo-label sections each source's own runs merge over these
    # (datasets.<source>.overrides.<profile>.pseudo_labels), filled in by ``resolve``, never by hand.
    by_source: dict = field(default_factory=dict, hash=False)  # settings stay hashable (crf_tuning's grid)

    def of_source(self, source: str) -> PseudoLabelConfig:
        """The settings for the rows of ``source``: these, with that source's own overrides merged."""
        extra = self.by_source.get(source)
        if not extra:
            return self
        values = deep_merge({k: v for k, v in dataclasses.asdict(self).items() if k != "by_source"}, extra)
        return _build(PseudoLabelConfig, values, f"pseudo_labels (source {source})")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 4
    crop_size: int = 128
    lr: float = 1e-3
    lr_detector: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 1.1
    adversarial: bool = True
    detector_target: Literal["pseudo", "mask"] = "pseudo"
    detector_warmup_epochs: int = 0
    detach_detector_features: bool = True
    freeze_bn: bool = False
    max_steps_per_epoch: int | None = None
    # Rows drawn per source (the manifest's ``dataset`` column) in these proportions, with
    # replacement, max_steps_per_epoch batches an epoch; empty: every row once per epoch, shuffled.
    source_weights: dict = field(default_factory=dict, hash=False)
    num_workers: int = 0
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    val_every: int = 1
    # Detector fine-tuning after the three-phase epochs (wpcrack.train.finetune); 0: the paper's schedule.
    finetune_epochs: int = 0
    finetune_crop_size: int = 192
    finetune_lr: float = 1e-3
    finetune_labels: Literal["pseudo", "detector"] = "pseudo"
    # Exponential moving average of the weights (wpcrack.train.averaging): validated, kept and deployed
    # instead of the live weights; 0: off (the paper's schedule).
    ema_decay: float = 0.0


@dataclass(frozen=True)
class EvaluateConfig:
    threshold: float = 0.5
    flip: bool = False  # average the detector over the image and its flips (test-time augmentation)
    tile_size: int = 256
    tile_overlap: int = 32
    figure_images: int = 4
    pr_thresholds: int = 51


@dataclass(frozen=True)
class PredictConfig:
    """How ``wpcrack predict``, the served model and the ONNX path choose a photo's scale when the
    user gives none (``wpcrack.deploy.scale``); read from params.yaml at prediction time, so they are
    tuned without retraining."""

    max_scale: float = 2.0       # the most a photo is enlarged (photos of finer cracks than the training rows') ...
    max_side: int = 4096         # ... and never beyond this long side, px (cost, and blur that fools the classifier)
    min_side_rows: float = 0.5   # the least: its long side down to this many training rows
    scale_step: float = 2.0      # ladder step (one octave); the best octave is refined by half a step
    sample_tiles: int = 12       # tiles per candidate scale that score it (spread over the photo)
    evidence: Literal["classifier", "mass", "length"] = "classifier"  # what a candidate scale is scored by
    evidence_share: float = 0.9  # the finest scale whose evidence reaches this share of the best wins
    min_crack_probability: float = 0.5  # classifier evidence below this at every scale (no crack seen): scale 1
    width_weight: float = 0.5    # 0..1: how far the evidence's scale moves towards the one at which the photo's
                                 # cracks are as wide as the training rows' (a model with scale.json; 0: off)
    width_from: Literal["fitted", "setting"] = "fitted"  # fitted: the weight `wpcrack calibrate` fitted for the
                                 # model where its scale.json records one (else width_weight); setting: width_weight
    spread: float = 0.25         # octaves: the photo is predicted at the chosen scale and this far above and below
                                 # it, and the three maps averaged (0: the chosen scale alone)


@dataclass(frozen=True)
class ClassicalConfig:
    """The classical baseline's grid (``wpcrack classical``): every combination is scored on the
    masks of ``splits`` and the best is applied to test. The bilateral filter is ``pseudo_labels.darkness``'s."""

    splits: tuple[Literal["train", "val"], ...] = ("val",)  # whose masks choose the grid point
    blocks: tuple[int, ...] = (31, 61, 91)
    offsets: tuple[float, ...] = (10.0, 15.0, 20.0, 25.0, 30.0)
    min_areas: tuple[int, ...] = (40, 80, 150, 300)


@dataclass(frozen=True)
class BenchmarkConfig:
    size: int = 256
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 3
    iterations: int = 10


@dataclass(frozen=True)
class FieldConfig:
    """Field check sets (``<paths.data>/field/<name>/``, ``wpcrack.data.field``): what ``wpcrack field``
    scores every model on, through predict's default path."""

    sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromotionConfig:
    """The promotion gate (``wpcrack.tracking.gate``): how many IoU points a challenger may lose
    against the champion on each field set and on the benchmark's test split, and still replace it
    (it must also gain somewhere)."""

    field_tolerance: float = 1.0
    benchmark_tolerance: float = 1.0


@dataclass(frozen=True)
class RetrainConfig:
    """How a run is retrained on old + newly tagged data (``pipelines.retrain``, ``dvc repro train@<run>``).

    ``scratch`` trains anew from ImageNet with the run's own recipe. ``finetune`` continues the run's
    current model (the champion: its ``best.pt``, which the flow keeps aside) for ``epochs``
    three-phase epochs at ``lr_scale`` times the recipe's learning rates, pseudo labels remade by
    that model at the start. ``incoming_scale``: ``predict`` stores each incoming image at the scale
    predict chooses for it with the champion (chosen at intake, aspect kept), ``square`` squashes it
    to the dataset's square training size. Kept out of ``Config``: the recipe a scratch run saves in
    ``best.pt`` does not change with it; a fine-tuned model records its start and these settings."""

    mode: str = "scratch"
    epochs: int = 3
    lr_scale: float = 0.3
    incoming_scale: str = "predict"


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "wpcrack"
    model_name_prefix: str = "wpcrack"
    log_models: bool = True


@dataclass(frozen=True)
class Config:
    """One fully resolved configuration (base + profile + variant + overrides)."""

    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ceccm: CECCMConfig = field(default_factory=CECCMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    field: FieldConfig = field(default_factory=FieldConfig)  # last: the name hides dataclasses.field below it
    profile: str = "cpu"
    dataset: str | None = None
    variant: str = "full"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Top-level keys of params.yaml that are not Config sections.
_META_KEYS = ("profiles", "variants", "runs", "retrain")


def _hint_is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, building nested dataclasses."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if value is None:
        if hint is type(None) or _hint_is_optional(hint):
            return None
        raise ConfigError(f"{where}: must not be null")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_convert(k, key_t, where): _convert(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        (item_t, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, item_t, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is dict:  # checked when merged into the sections it overrides
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    built = cls(**kwargs)
    for name, (ok, rule) in _LIMITS.get(cls, {}).items():
        value = getattr(built, name)
        if value is not None and not all(ok(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(f"{where}.{name}: {value!r} {rule}" if where else f"{name}: {value!r} {rule}")
    return built


# Value ranges, checked when a configuration is built: a wrong value fails here with its key instead of
# deep inside training (a learning rate of 0 divided by zero in the schedule).
_POSITIVE = (lambda v: v > 0, "must be > 0")
_ONE_OR_MORE = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_OPEN_UNIT = (lambda v: 0 < v < 1, "must be in (0, 1)")
_HALF_OPEN_UNIT = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_LIMITS: dict[type, dict[str, tuple[Callable[[Any], bool], str]]] = {
    ModelConfig: {k: _ONE_OR_MORE for k in ("cam_channels", "paam_channels", "paam_reduction", "detector_channels",
                                            "decoder_channels")},
    CECCMConfig: {"sigma": _POSITIVE},
    LossConfig: {**{k: _NON_NEGATIVE for k in ("lambda_c1", "lambda_r1_c", "lambda_r1_r", "lambda_c2", "lambda_r2_c",
                                               "lambda_r2_r", "lambda_cec", "det_dice")},
                 "det_pos_weight": _POSITIVE},
    DarknessConfig: {"block": (lambda v: v >= 3, "must be >= 3"), "min_area": _NON_NEGATIVE, "offset": _NON_NEGATIVE,
                     "bilateral_d": _NON_NEGATIVE},
    PseudoLabelConfig: {"refresh_epochs": _ONE_OR_MORE, "cam_scales": _POSITIVE, "cam_threshold": _HALF_OPEN_UNIT,
                        "ignore_band": _NON_NEGATIVE, "iterations": _NON_NEGATIVE, "workers": _NON_NEGATIVE,
                        "min_pixels": _NON_NEGATIVE, "bg_power": _POSITIVE},
    TrainConfig: {"epochs": _NON_NEGATIVE, "batch_size": _ONE_OR_MORE, "crop_size": _NON_NEGATIVE, "lr": _POSITIVE,
                  "lr_detector": _POSITIVE, "momentum": _HALF_OPEN_UNIT, "weight_decay": _NON_NEGATIVE,
                  "poly_power": _POSITIVE, "detector_warmup_epochs": _NON_NEGATIVE,
                  "max_steps_per_epoch": _ONE_OR_MORE, "num_workers": _NON_NEGATIVE, "val_every": _ONE_OR_MORE,
                  "finetune_epochs": _NON_NEGATIVE, "finetune_crop_size": _NON_NEGATIVE, "finetune_lr": _POSITIVE,
                  "ema_decay": _HALF_OPEN_UNIT},
    EvaluateConfig: {"threshold": _OPEN_UNIT, "tile_size": _ONE_OR_MORE, "tile_overlap": _NON_NEGATIVE,
                     "figure_images": _NON_NEGATIVE, "pr_thresholds": (lambda v: v >= 2, "must be >= 2")},
    SyntheticPrepare: {"mm_per_pixel": _POSITIVE},
    RetrainConfig: {"epochs": _ONE_OR_MORE, "lr_scale": _POSITIVE},
    PredictConfig: {"max_scale": _POSITIVE, "max_side": _ONE_OR_MORE, "min_side_rows": _POSITIVE,
                    "scale_step": (lambda v: v > 1, "must be > 1"), "sample_tiles": _ONE_OR_MORE,
                    "evidence_share": (lambda v: 0 < v <= 1, "must be in (0, 1]"), "min_crack_probability": _HALF_OPEN_UNIT,
                    "spread": _NON_NEGATIVE},
    BenchmarkConfig: {"size": _ONE_OR_MORE, "batch_sizes": _ONE_OR_MORE, "warmup": _NON_NEGATIVE,
                      "iterations": _ONE_OR_MORE},
}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.epochs=3`` -> ``{"train": {"epochs": 3}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    out: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r}: empty key")
        out = {part: out}
    return out


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


_SEED_SUFFIX = re.compile(r"^(?P<variant>.+)-seed(?P<seed>[0-9]+)$")


def split_seed(variant: str) -> tuple[str, int | None]:
    """``rec-seed1`` -> (``rec``, 1): a variant retrained with another ``train.seed`` (the repeats
    of Table 1) has its own run, folder and MLflow tag; the other names -> (name, None)."""
    match = _SEED_SUFFIX.match(variant)
    return (match["variant"], int(match["seed"])) if match else (variant, None)


def resolve(
    raw: dict[str, Any],
    dataset: str | None = None,
    variant: str = "full",
    overrides: list[str] | tuple[str, ...] = (),
    profile: str | None = None,
) -> Config:
    """Resolve the raw params mapping into a typed Config for one dataset and variant."""
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", {}) or {}
    variants = raw.pop("variants", {}) or {}
    raw.pop("runs", None)
    retrain = raw.pop("retrain", None) or {}
    for meta in ("profile", "dataset", "variant"):
        if meta in raw:
            raise ConfigError(f"params: '{meta}' is chosen per run, not a top-level key")

    if dataset is not None and dataset not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASET_NAMES)}")
    datasets = raw.get("datasets", {}) or {}
    entry = (datasets.get(dataset, {}) if dataset else {}) or {}
    if profile is None:
        profile = entry.get("profile", "cpu")
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; defined in params.yaml: {', '.join(profiles) or 'none'}")
    base, seed = split_seed(variant) if variant not in variants else (variant, None)
    if base not in variants:
        raise ConfigError(f"unknown variant {variant!r}; defined in params.yaml: {', '.join(variants) or 'none'} "
                          f"(each also as <variant>-seed<N>, trained with train.seed N)")

    merged = deep_merge(raw, profiles[profile] or {})
    overrides_of_dataset = (entry.get("overrides") or {}).get(profile) or {}
    for meta in ("datasets", "profiles", "variants", "runs"):
        if meta in overrides_of_dataset:
            raise ConfigError(f"datasets.{dataset}.overrides.{profile}: '{meta}' cannot be overridden per dataset")
    merged = deep_merge(merged, overrides_of_dataset)
    merged = deep_merge(merged, variants[base] or {})
    if seed is not None:
        merged = deep_merge(merged, {"train": {"seed": seed}})
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    retrain = deep_merge(retrain, merged.pop("retrain", None) or {})
    build_retrain(retrain)  # a typo there fails every command, not only the retraining
    if dataset in COMPOSITE_DATASETS:
        merged.setdefault("pseudo_labels", {})["by_source"] = _labels_by_source(datasets, merged, dataset, profile)
    merged.update(profile=profile, dataset=dataset, variant=variant)
    cfg = _build(Config, merged, "")
    _check_sources(cfg)
    t = cfg.train
    if t.epochs == 0 and not (t.finetune_epochs and t.detector_target == "mask"):
        raise ConfigError("train.epochs: 0 (fine-tuning alone, from ImageNet) needs train.finetune_epochs > 0 and "
                          "train.detector_target: mask; weak labels need the three-phase epochs' classifier")
    for key in ("field_tolerance", "benchmark_tolerance"):
        if getattr(cfg.promotion, key) < 0:
            raise ConfigError(f"promotion.{key}: {getattr(cfg.promotion, key)} must be >= 0 (IoU points a challenger may lose)")
    if not 0.0 <= cfg.predict.width_weight <= 1.0:
        raise ConfigError(f"predict.width_weight: {cfg.predict.width_weight} must be between 0 and 1")
    e = cfg.evaluate
    if e.tile_overlap >= e.tile_size:
        raise ConfigError(f"evaluate.tile_overlap: {e.tile_overlap} must be smaller than evaluate.tile_size "
                          f"({e.tile_size}): the tiles would not advance")
    return cfg


def _labels_by_source(datasets: dict, merged: dict, dataset: str, profile: str) -> dict[str, dict]:
    """Each source's own pseudo-label overrides under ``profile``: a composite run labels a source's
    rows as that source's own run does."""
    sources = ((merged.get("prepare") or {}).get(dataset) or {}).get("sources", RoadsPrepare.sources)
    out = {}
    for source in sources:
        entry = datasets.get(source) or {}
        extra = ((entry.get("overrides") or {}).get(profile) or {}).get("pseudo_labels")
        if extra:
            out[source] = copy.deepcopy(extra)
    return out


def _check_sources(cfg: Config) -> None:
    sources = cfg.prepare.roads.sources
    wrong = [s for s in sources if s not in DATASET_NAMES or s in COMPOSITE_DATASETS]
    if wrong or not sources:
        raise ConfigError(f"prepare.roads.sources: {', '.join(map(repr, wrong)) or 'empty'}; each must be one of "
                          f"{', '.join(d for d in DATASET_NAMES if d not in COMPOSITE_DATASETS)}")
    for name, weight in cfg.train.source_weights.items():
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
            raise ConfigError(f"train.source_weights.{name}: {weight!r} must be a number >= 0")
    if cfg.train.source_weights and not any(cfg.train.source_weights.values()):
        raise ConfigError("train.source_weights: at least one weight must be > 0")
    if cfg.train.source_weights and cfg.train.max_steps_per_epoch is None:
        raise ConfigError("train.source_weights needs train.max_steps_per_epoch: rows are drawn with replacement, "
                          "so an epoch has no natural length")


def load_config(
    path: str | Path = "params.yaml",
    dataset: str | None = None,
    variant: str = "full",
    overrides: list[str] | tuple[str, ...] = (),
    profile: str | None = None,
) -> Config:
    """Read params.yaml and resolve it for one dataset/variant (see module docstring); a bad value's
    error names the file and the key."""
    raw = read_params(path)
    try:
        return resolve(raw, dataset, variant, overrides, profile)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def list_runs(path: str | Path = "params.yaml") -> dict[str, dict[str, str]]:
    """The ``runs`` table: DVC stage key -> {dataset, variant}."""
    runs = read_params(path).get("runs", {}) or {}
    for key, run in runs.items():
        if set(run) != {"dataset", "variant"}:
            raise ConfigError(f"params.yaml runs.{key}: needs exactly 'dataset' and 'variant'")
    return runs


RETRAIN_MODES = ("scratch", "finetune")
INCOMING_SCALES = ("predict", "square")


def build_retrain(values: dict[str, Any]) -> RetrainConfig:
    """The ``retrain`` section as a RetrainConfig; unknown keys and bad values are errors."""
    cfg = _build(RetrainConfig, values, "retrain")
    if cfg.mode not in RETRAIN_MODES:
        raise ConfigError(f"retrain.mode: {cfg.mode!r}; valid: {', '.join(RETRAIN_MODES)}")
    if cfg.incoming_scale not in INCOMING_SCALES:
        raise ConfigError(f"retrain.incoming_scale: {cfg.incoming_scale!r}; valid: {', '.join(INCOMING_SCALES)}")
    return cfg


def load_retrain(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> RetrainConfig:
    """The ``retrain`` section of params.yaml with the ``retrain.*`` ones of ``overrides`` applied."""
    values = read_params(path).get("retrain") or {}
    for text in overrides:
        values = deep_merge(values, parse_override(text).get("retrain") or {})
    try:
        return build_retrain(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(values: dict[str, Any]) -> Config:
    """A resolved configuration stored as a dict (a checkpoint's ``config``) as a Config; keys added
    to the dataclasses since it was written take their defaults."""
    return _build(Config, values, "")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration next to a run's outputs."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
