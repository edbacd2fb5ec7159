"""The detector as an MLflow pyfunc model: base64 images in, base64 masks and crack shares out.

Request: a DataFrame (REST: ``dataframe_records``) with one string column ``image`` holding
base64-encoded PNG or JPEG bytes, one row per image, any size. Large images are tiled exactly as
``wpcrack predict`` does (``wpcrack.deploy.detection.probability_map``). Response, per row:
``mask`` (base64 PNG, 0/255, the image's size), ``crack_share`` (crack pixels / all pixels) and
``scale`` (what the image was resized by before inference). Optional params: ``threshold`` (crack
probability; default: the model's ``evaluate.threshold``), ``gate`` (classifier probability below
which a tile is skipped; 0 keeps every tile) and ``scale`` (0, the default: chosen per image as
``wpcrack predict`` chooses it, ``wpcrack.deploy.scale``, with the training crack width measured
before the model was logged and the ``predict:`` settings it was trained with).

Base64 strings rather than pixel arrays because any client (curl, a browser) can send a photo that
way, each image keeps its own size, and the signature stays one plain string column.

This file is logged as the model's code (MLflow "models from code", so no pickle), with the
``wpcrack`` package beside it; ``load_context`` rebuilds the network from the logged weights and
resolved configuration with ``build_model(cfg).slim()``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from wpcrack.deploy.detection import (
    DEFAULT_GATE,
    SCALE_FILE,
    attach_scale_file,
    device,
    load_resolved_config,
    load_slim,
    probability_map,
    save_detector,
)
from wpcrack.errors import DataError

INPUT_COLUMN = "image"
AUTO_SCALE = 0.0  # the ``scale`` param's default: chosen per image
WEIGHTS_ARTIFACT = "weights"
CONFIG_ARTIFACT = "config"
SCALE_ARTIFACT = "scale"  # the training crack width (scale.json), measured before logging


def encode_png(array: np.ndarray) -> str:
    """A uint8 image (HxW or RGB HxWx3) as base64 PNG text."""
    import cv2

    img = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def decode_image(text: str) -> np.ndarray:
    """Base64 PNG/JPEG text -> RGB uint8 HxWx3 (ValueError when it is not one)."""
    import cv2

    try:
        data = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"not base64 text ({exc})") from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ValueError("the bytes are not a PNG or JPEG image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def example_frame(example: Any) -> pd.DataFrame:
    """The pyfunc input for an example: a DataFrame as is, uint8 RGB ([B,]H,W,3), or an
    ImageNet-normalised float ([B,]3,H,W); numpy or torch; of a batch the first image is used."""
    import torch

    if isinstance(example, pd.DataFrame):
        return example
    x = torch.as_tensor(np.asarray(example.detach().cpu() if isinstance(example, torch.Tensor) else example))
    if x.dtype == torch.uint8:
        rgb = x[0] if x.ndim == 4 else x
    else:
        from wpcrack.data.datasets import denormalize

        rgb = denormalize(x[0] if x.ndim == 4 else x)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"input example: expected an RGB image or batch, got shape {tuple(x.shape)}")
    return pd.DataFrame({INPUT_COLUMN: [encode_png(rgb.numpy())]})


def signature(threshold: float, gate: float):
    """Input: string column ``image``; output: ``mask`` (string), ``crack_share``, ``scale`` (double)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string", "mask"), ColSpec("double", "crack_share"), ColSpec("double", "scale")]),
        params=ParamSchema([ParamSpec("threshold", "double", threshold), ParamSpec("gate", "double", gate),
                            ParamSpec("scale", "double", AUTO_SCALE)]),
    )


def save_artifacts(detector, cfg, folder: Path, scale: dict | None = None) -> dict[str, str]:
    """Write the detector's weights, resolved config and, where measured, its training crack width
    (``wpcrack.deploy.calibrate.measure``) into ``folder``; the pyfunc artifact map."""
    from wpcrack.io import write_json

    weights, config = save_detector(detector, cfg, folder)
    artifacts = {WEIGHTS_ARTIFACT: str(weights), CONFIG_ARTIFACT: str(config)}
    if scale is not None:
        write_json(folder / SCALE_FILE, scale)
        artifacts[SCALE_ARTIFACT] = str(folder / SCALE_FILE)
    return artifacts


class CrackDetector(PythonModel):
    """pyfunc wrapper; ``detector`` and ``cfg`` are public so ``wpcrack predict`` can reuse them."""

    def load_context(self, context) -> None:
        self.cfg = load_resolved_config(context.artifacts[CONFIG_ARTIFACT])
        self.detector = load_slim(context.artifacts[WEIGHTS_ARTIFACT], self.cfg).to(device())
        if SCALE_ARTIFACT in context.artifacts:  # models logged before it was measured at training have none
            attach_scale_file(self.detector, Path(context.artifacts[SCALE_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        params = params or {}
        threshold = float(params.get("threshold", self.cfg.evaluate.threshold))
        gate = float(params.get("gate", DEFAULT_GATE))
        scale = float(params.get("scale", AUTO_SCALE))
        if INPUT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(f"input needs a column {INPUT_COLUMN!r} of base64 images")
        masks, shares, used = [], [], []
        for i, text in enumerate(model_input[INPUT_COLUMN]):
            try:
                rgb = decode_image(text)
            except ValueError as exc:
                raise MlflowException.invalid_parameter_value(f"row {i}: {exc}") from None
            try:
                result = probability_map(self.detector, rgb, self.cfg, gate, [scale] if scale else None)
            except DataError as exc:
                raise MlflowException.invalid_parameter_value(f"params: {exc}") from None
            mask = result.prob > threshold
            masks.append(encode_png(mask.astype(np.uint8) * 255))
            shares.append(float(mask.mean()))
            used.append(result.choice.scale)
        return pd.DataFrame({"mask": masks, "crack_share": shares, "scale": used})


set_model(CrackDetector())
