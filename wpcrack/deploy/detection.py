"""The trained detector as a function of an image: loading a model folder and the probability map.

Shared by ``wpcrack predict``, the evaluation's gated scores and the MLflow pyfunc wrapper
(``wpcrack.deploy.serving``); it knows nothing of MLflow, so the imports run one way:
predict -> tracking -> serving -> detection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from wpcrack.deploy.scale import (
    ScaleChoice,
    choose_scale,
    evidence,
    ladder,
    match_width,
    photo_crack_width,
    spread,
    training_mm_per_pixel,
)
from wpcrack.errors import DataError
from wpcrack.geometry import resize_image, resize_map, scaled_size

if TYPE_CHECKING:
    from wpcrack.config import Config

DEFAULT_GATE = 0.0  # classifier crack probability below which a tile is skipped (0: every tile kept)


def load_resolved_config(path: str | Path) -> Config:
    """A ``config.yaml`` written by ``dump_config`` (a resolved run) back into a typed Config."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "resolved configuration not found (a trained model folder has config.yaml)")
    return config_from_text(path.read_text())


def config_from_text(text: str) -> Config:
    """A resolved configuration (``dump_config``'s YAML) as a typed Config."""
    import yaml

    from wpcrack.config import resolve

    raw = yaml.safe_load(text) or {}
    meta = {k: raw.pop(k, None) for k in ("profile", "dataset", "variant")}
    profile, variant = meta["profile"] or "cpu", meta["variant"] or "full"
    raw.update(profiles={profile: {}}, variants={variant: {}})
    return resolve(raw, meta["dataset"], variant, profile=profile)


def inference_copy(cfg: Config) -> Config:
    """``cfg`` without anything that would fetch backbone weights: the checkpoint replaces them all."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, weights_path=None))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


CRACK_WIDTH_ATTR = "training_crack_width"    # px: the crack width of the model's training rows (scale.json)
WIDTH_WEIGHT_ATTR = "training_width_weight"  # 0..1: the width weight fitted to its training geometry (scale.json)
RECORDED = {CRACK_WIDTH_ATTR: "crack_width_px", WIDTH_WEIGHT_ATTR: "width_weight"}  # attribute -> scale.json key
SCALE_FILE = "scale.json"                   # beside best.pt: written by `wpcrack calibrate`


def training_crack_width(detector: torch.nn.Module) -> float | None:
    """The crack width the model learned at, px of its training rows, where it was recorded."""
    return getattr(detector, CRACK_WIDTH_ATTR, None)


def recorded_scale(detector: torch.nn.Module) -> dict[str, float]:
    """What the model records for scale choice (attribute -> value): what an export or a tag carries."""
    return {attr: getattr(detector, attr) for attr in RECORDED if getattr(detector, attr, None) is not None}


def width_weight(detector: torch.nn.Module, cfg: Config) -> float:
    """How far the scale moves towards the width-matched one: the weight ``wpcrack calibrate`` fitted for
    this model (``predict.width_from: fitted``) where it records one, else ``predict.width_weight``."""
    fitted = getattr(detector, WIDTH_WEIGHT_ATTR, None)
    return fitted if cfg.predict.width_from == "fitted" and fitted is not None else cfg.predict.width_weight


def attach_crack_width(detector: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Give ``detector`` the training crack width of ``folder``'s ``scale.json`` (see ``attach_scale_file``)."""
    return attach_scale_file(detector, folder / SCALE_FILE)


def attach_scale_file(detector: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Give ``detector`` the training crack width a ``scale.json`` records, when the file exists and was
    measured on these very weights (a retrained model needs `wpcrack calibrate` again)."""
    if path.is_file():
        import json

        recorded = json.loads(path.read_text())
        if recorded.get("weights_md5") == weights_digest(detector):
            for attr, key in RECORDED.items():
                if recorded.get(key) is not None:
                    setattr(detector, attr, float(recorded[key]))
    return detector


def load_model_dir(path: str | Path) -> tuple[torch.nn.Module, Config]:
    """(SlimDetector, resolved config) of a trained model folder, of the ``best.pt`` in one, or of an
    ONNX file written by ``wpcrack export --onnx`` (run by ONNX Runtime)."""
    from wpcrack.inference.loading import load_trained

    path = Path(path)
    if path.suffix == ".onnx":
        return load_onnx(path)
    if path.is_file() and path.name != "best.pt":
        raise DataError(path, "pass a trained model folder, the best.pt inside one, or a .onnx export")
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise DataError(path, "model folder not found")
    cfg = load_resolved_config(folder / "config.yaml")
    return attach_crack_width(load_trained(folder, inference_copy(cfg), device()).slim(), folder), cfg


def weights_digest(detector: torch.nn.Module) -> str:
    """md5 of a detector's weights (every tensor of its state dict, in order): the registry tags each
    version with it and evaluate writes it into metrics.json, so a promotion can check that the
    scores it compares were measured on the version it promotes."""
    import hashlib

    digest = hashlib.md5()
    for key, value in detector.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_detector(detector: torch.nn.Module, cfg: Config, folder: Path) -> tuple[Path, Path]:
    """Write a SlimDetector's weights and the resolved config into ``folder``: (weights, config)."""
    from wpcrack.config import dump_config

    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / "detector.pt", folder / "config.yaml"
    torch.save({k: v.detach().cpu() for k, v in detector.state_dict().items()}, weights)
    dump_config(cfg, config)
    return weights, config


def load_slim(weights: str | Path, cfg: Config) -> torch.nn.Module:
    """Rebuild the SlimDetector for ``cfg`` and load its weights (sliced with the classifier head,
    for gating, when the weights have one)."""
    from wpcrack.models.wpcracknet import build_model

    state = torch.load(weights, map_location="cpu", weights_only=True)
    gating = any(k.startswith("cls_head.") for k in state)
    slim = build_model(inference_copy(cfg)).slim(gating=gating)
    slim.load_state_dict(state)
    return slim.eval()


class GatedDetector(torch.nn.Module):
    """A SlimDetector whose ``predict`` returns zeros for inputs the classifier calls crack-free.

    ``predict_image`` tiles large photos and calls ``predict`` per batch of tiles, so gating here
    skips crack-free tiles without a second tiling implementation. ``gate=0`` keeps every tile.
    """

    def __init__(self, detector: torch.nn.Module, gate: float = DEFAULT_GATE):
        super().__init__()
        self.detector = detector
        self.gate = gate
        self.tiles = 0
        self.skipped = 0

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
        keep = self.detector.classify(x) >= self.gate if self.gate > 0 else torch.ones(len(x), dtype=torch.bool)
        keep = keep.to(x.device)
        self.tiles += len(x)
        self.skipped += int((~keep).sum())
        if keep.any():
            out[keep] = self.detector(x[keep]).float()
        return out


def supports_gate(detector: torch.nn.Module) -> bool:
    """Whether ``detector`` has the classifier head that ``--gate`` needs (an ONNX export only with
    its classifier graph beside it)."""
    return callable(getattr(detector, "classify", None)) and getattr(detector, "cls_head", True) is not None


def check_gate(gate: float) -> float:
    if not 0.0 <= gate < 1.0:
        raise DataError("--gate", f"must be a classifier probability in [0, 1), got {gate} (0 keeps every tile)")
    return gate


def check_scales(scales: Sequence[float] | None) -> tuple[float, ...] | None:
    """The user's scales (None: chosen per image, ``wpcrack.deploy.scale``)."""
    if scales is None:
        return None
    if not scales or any(not 0.01 <= s <= 8.0 for s in scales):
        raise DataError("--scale", f"each scale must be between 0.01 and 8, got {list(scales)}")
    return tuple(scales)


def scale_measure(detector: torch.nn.Module, cfg: Config) -> tuple[Callable[[list[np.ndarray], float], float], str]:
    """(how ``choose_scale`` scores the tiles of one scale, the evidence kind): ``predict.evidence``,
    or the detector's crack mass for a model without a classifier head (an ONNX export)."""
    from wpcrack.inference.tiles import classify, predict_image

    kind = cfg.predict.evidence
    if kind == "classifier" and supports_gate(detector):
        def by_classifier(views: list[np.ndarray], scale: float) -> float:
            return float(np.mean(classify(detector, views)))  # sample_boxes' tiles of a scale share one size
        return by_classifier, kind
    kind = "mass" if kind == "classifier" else kind
    plain = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, flip=False))
    probe = GatedDetector(detector)  # the detector alone, no flips

    def by_detector(views: list[np.ndarray], scale: float) -> float:
        return evidence([predict_image(probe, v, plain) for v in views], scale, cfg.evaluate.threshold, kind)
    return by_detector, kind


class Prediction(NamedTuple):
    """One image's crack probabilities (its own size) and how they were made."""

    prob: np.ndarray      # float32 HxW
    tiles: int            # tiles the detector saw (per scale, summed)
    skipped: int          # of those, skipped by the gate
    choice: ScaleChoice   # the scale(s) and whether the user gave them


def decide_scale(detector: torch.nn.Module, rgb: np.ndarray, cfg: Config, scales: Sequence[float] | None = None,
                 mm_per_pixel: float | None = None, chooser: torch.nn.Module | None = None,
                 gated: torch.nn.Module | None = None) -> tuple[ScaleChoice, dict[float, np.ndarray]]:
    """The scale(s) ``probability_map`` predicts ``rgb`` at (see there), and the predictions it made
    on the way by scale (the width is read from the prediction at the classifier's scale, made by
    ``gated``, default the detector ungated). The retraining's intake stores new photos at this scale."""
    from wpcrack.inference.tiles import predict_image

    scales = check_scales(scales)
    trained_mm = training_mm_per_pixel(cfg)
    if scales is None and mm_per_pixel and trained_mm:
        return ScaleChoice(check_scales([mm_per_pixel / trained_mm]), "mm_per_pixel"), {}  # finer pixels: shrink
    if scales is not None:
        return ScaleChoice(scales, "given"), {}
    choice = choose_scale(rgb, cfg, *scale_measure(chooser or detector, cfg))
    made: dict[float, np.ndarray] = {}
    trained_width = training_crack_width(chooser or detector)
    weight = width_weight(chooser or detector, cfg)
    if trained_width and weight > 0:
        view = resize_image(rgb, scaled_size(rgb.shape, choice.scale))
        made[choice.scale] = predict_image(gated or GatedDetector(detector, DEFAULT_GATE), view, cfg)
        found = photo_crack_width(rgb, made[choice.scale], cfg.evaluate.threshold)
        candidates = ladder(rgb.shape, cfg)
        choice = match_width(choice, found, trained_width, weight, (candidates[-1], candidates[0]))
    return spread(choice, cfg.predict.spread), made


def probability_map(detector: torch.nn.Module, rgb: np.ndarray, cfg: Config, gate: float = DEFAULT_GATE,
                    scales: Sequence[float] | None = None, mm_per_pixel: float | None = None,
                    chooser: torch.nn.Module | None = None) -> Prediction:
    """Crack probabilities of one RGB image of any size: the mean over ``scales`` of the prediction
    of the image resized by each, resized back. Without ``scales`` the scale is the photo's
    ``mm_per_pixel`` over the training data's, where both are known, else chosen for this image
    (``choose_scale`` on the evidence of ``chooser``, default the detector itself: the survey flow
    lets the torch model's classifier choose and ONNX Runtime detect; the gate and flips do not take
    part in the choice).

    With ``evaluate.flip`` the gate sees each tile's four flips; the counts are per tile (skipped:
    the mean over the flips)."""
    from wpcrack.inference.tiles import FLIPS, predict_image

    gated = GatedDetector(detector, check_gate(gate))
    choice, made = decide_scale(detector, rgb, cfg, scales, mm_per_pixel, chooser, gated)
    total = None  # one photo-sized map at a time: a 12 MP photo's maps are 48 MB each
    for scale in choice.scales:
        prob = made.pop(scale, None)
        if prob is None:
            prob = predict_image(gated, resize_image(rgb, scaled_size(rgb.shape, scale)), cfg)
        full = resize_map(prob, rgb.shape[:2])
        total = full if total is None else total + full
    views = len(FLIPS) if cfg.evaluate.flip else 1
    mean = total if len(choice.scales) == 1 else total / len(choice.scales)  # float32 either way
    return Prediction(mean, gated.tiles // views, round(gated.skipped / views), choice)


ONNX_CONFIG_KEY = "wpcrack_config"  # ONNX metadata: the resolved configuration (YAML)
ONNX_RECORDED_KEYS = {CRACK_WIDTH_ATTR: "wpcrack_crack_width",  # ONNX metadata: what scale.json records
                      WIDTH_WEIGHT_ATTR: "wpcrack_width_weight"}
ONNX_ANY_SIZE_KEY = "wpcrack_any_size"  # ONNX metadata: the detector graph takes any height and width
# Exports made before ONNX_ANY_SIZE_KEY were traced for sides that are multiples of 8 (the backbone's
# output stride): for them other sizes are padded (replicate) to the next multiple and the output cropped.
ONNX_SIZE_MULTIPLE = 8


def classifier_path(path: str | Path) -> Path:
    """Where the export of a model's classifier head lies beside its detector graph ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.classifier.onnx")


class OnnxDetector(torch.nn.Module):
    """An ONNX export of the SlimDetector run by ONNX Runtime on the CPU, behind the torch interface
    that tiling and ``probability_map`` use (tensor in, crack probabilities out); with the classifier
    graph (``classifier``) it also has ``classify``, as a gated torch model has."""

    def __init__(self, session, path: Path, classifier=None):
        super().__init__()
        self.session, self.path = session, path
        self.cls_head = classifier  # the classifier graph's session, or None (what supports_gate reads)
        any_size = ONNX_ANY_SIZE_KEY in session.get_modelmeta().custom_metadata_map
        self.multiple = 1 if any_size else ONNX_SIZE_MULTIPLE

    @staticmethod
    def _run(session, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: array})[0]).to(x.device)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """[B] crack probability per image (the classifier graph takes any height and width)."""
        if self.cls_head is None:
            raise RuntimeError(f"{self.path}: exported without its classifier ({classifier_path(self.path).name})")
        return self._run(self.cls_head, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        return self._run(self.session, x)[..., :h, :w]


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxDetector, Config]:
    """(OnnxDetector, resolved config) of an ONNX export; the config travels in its metadata."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "ONNX model not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # The arena keeps the tensors' memory between runs: without it every large activation is fresh
    # memory that the kernel must fault in and zero (a survey worker at 1 thread: 1.33 -> 1.19 s a photo,
    # system time 12 -> 6 % of it). Its size is bounded, since the graphs never see more than a batch of
    # tiles whatever the photo's size. Per-shape memory plans are not kept: every photo brings other tile
    # sizes, and the plans grew a worker by 200 MB over 80 photos at no gain in speed.
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False

    def session_of(file: Path):
        try:
            return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise DataError(file, f"not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None

    session = session_of(path)
    text = session.get_modelmeta().custom_metadata_map.get(ONNX_CONFIG_KEY)
    if not text:
        raise DataError(path, f"ONNX model without the {ONNX_CONFIG_KEY!r} metadata; export it with `wpcrack export --onnx`")
    beside = classifier_path(path)
    detector = OnnxDetector(session, path, session_of(beside) if beside.is_file() else None)
    metadata = session.get_modelmeta().custom_metadata_map
    for attr, key in ONNX_RECORDED_KEYS.items():
        if metadata.get(key):
            setattr(detector, attr, float(metadata[key]))
    return detector, config_from_text(text)
