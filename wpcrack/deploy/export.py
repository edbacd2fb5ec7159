"""``wpcrack export --onnx``: the slim detector as an ONNX file for ONNX Runtime on the CPU.

The export has a dynamic batch, height and width (any image size, like the torch model), carries the
resolved configuration in its metadata (so ``wpcrack predict --model model.onnx`` knows the
threshold and tiling), and is checked against torch on images of the dataset's test split: the
largest absolute difference of the crack probabilities is reported and written beside the file.
The classifier head (a model sliced with its gate) goes into a second graph beside it,
``<name>.classifier.onnx`` (image-level crack probability, any height and width): with it an ONNX
model chooses predict's scale on the same classifier evidence as the torch model and takes
``--gate``. Both graphs take any height and width, as the torch model does (the detector's metadata
says so; an export made before that was traced for multiples of 8, and ``OnnxDetector`` pads for it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wpcrack.deploy.detection import (
    ONNX_ANY_SIZE_KEY,
    ONNX_CONFIG_KEY,
    ONNX_RECORDED_KEYS,
    classifier_path,
    load_model_dir,
    load_onnx,
    recorded_scale,
    supports_gate,
)
from wpcrack.errors import DataError
from wpcrack.io import atomic_path, write_json

if TYPE_CHECKING:
    from wpcrack.config import Config

OPSET = 18
CHECK_TOLERANCE = 1e-3  # largest |onnx - torch| crack probability accepted by the check


class _Classifier(torch.nn.Module):
    """The SlimDetector's image-level crack probability as a module's forward (what the export traces)."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.classify(x)


def export_onnx(detector: torch.nn.Module, cfg: Config, path: str | Path, size: int = 256) -> Path:
    """Write ``detector`` (a SlimDetector) to ``path`` with dynamic batch/height/width and ``cfg``
    in the metadata, and its classifier head (when it has one) to ``classifier_path(path)``; atomic,
    so a failed export leaves no half-written file (the classifier is written first: a detector file
    never stands beside a stale classifier)."""
    import onnx
    import yaml

    path = Path(path)
    detector = detector.cpu().eval()
    example = torch.zeros(1, 3, size, size)
    free = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=16, max=8192),
            3: torch.export.Dim("width", min=16, max=8192)}
    classifier = classifier_path(path)
    classifier.unlink(missing_ok=True)
    if supports_gate(detector):
        with atomic_path(classifier) as tmp, torch.inference_mode():
            program = torch.onnx.export(_Classifier(detector).eval(), (example,), input_names=["image"],
                                        output_names=["crack_probability"], dynamic_shapes={"x": free},
                                        opset_version=OPSET, dynamo=True, verbose=False)
            onnx.save_model(program.model_proto, str(tmp))
    with atomic_path(path) as tmp, torch.inference_mode():
        program = torch.onnx.export(detector, (example,), input_names=["image"], output_names=["crack_probability"],
                                    dynamic_shapes={"x": free}, opset_version=OPSET, dynamo=True, verbose=False)
        model = program.model_proto
        recorded = recorded_scale(detector)  # predict's width matching travels with the export
        metadata = {ONNX_CONFIG_KEY: yaml.safe_dump(cfg.to_dict(), sort_keys=False), ONNX_ANY_SIZE_KEY: "true",
                    **{ONNX_RECORDED_KEYS[attr]: repr(value) for attr, value in recorded.items()}}
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(model, str(tmp))
    return path


def max_abs_difference(detector: torch.nn.Module, onnx_detector: torch.nn.Module,
                       images: list[torch.Tensor]) -> float:
    """Largest |onnx - torch| crack probability over ``images`` (normalised [3, H, W] tensors): of the
    pixels, and of the image-level probability where both have the classifier."""
    worst = 0.0
    both = supports_gate(detector) and supports_gate(onnx_detector)
    with torch.inference_mode():
        for x in images:
            worst = max(worst, float((detector(x[None]) - onnx_detector(x[None])).abs().max()))
            if both:
                worst = max(worst, float((detector.classify(x[None]) - onnx_detector.classify(x[None])).abs().max()))
    return worst


def sample_test_images(cfg: Config, count: int) -> tuple[list[torch.Tensor], list[str]]:
    """Up to ``count`` test images of the dataset, at their stored size, normalised."""
    from wpcrack.data.datasets import WeakDataset

    manifest = Path(cfg.paths.data) / "prepared" / cfg.dataset / "manifest.csv"
    if not manifest.is_file():
        raise DataError(manifest, f"prepared dataset not found; run `dvc repro prepare@{cfg.dataset}`")
    data = WeakDataset(manifest, "test")
    picks = np.linspace(0, len(data) - 1, num=min(count, len(data))).round().astype(int)
    return [data[int(i)]["image"] for i in picks], [str(data.frame.iloc[int(i)]["image"]) for i in picks]


def export(cfg: Config, model_dir: Path, out: Path, check_images: int = 8) -> dict:
    """Export the trained model of ``model_dir`` to ``out`` and check it; ``<out>.json`` holds the check."""
    detector, resolved = load_model_dir(model_dir)
    detector = detector.cpu().eval()
    start = time.perf_counter()
    export_onnx(detector, resolved, out, size=cfg.benchmark.size)
    seconds = time.perf_counter() - start
    onnx_detector, _ = load_onnx(out)
    images, names = sample_test_images(cfg, check_images) if check_images > 0 else ([], [])
    diff = max_abs_difference(detector, onnx_detector, images) if images else None
    report = {
        "model": str(Path(model_dir).resolve()), "onnx": str(Path(out).resolve()), "opset": OPSET,
        "export_seconds": seconds, "size_mb": Path(out).stat().st_size / 2**20,
        "classifier": str(classifier_path(out).resolve()) if supports_gate(onnx_detector) else None,
        "check_images": names, "max_abs_difference": diff, "tolerance": CHECK_TOLERANCE,
        "passed": None if diff is None else diff <= CHECK_TOLERANCE,
    }
    write_json(Path(f"{out}.json"), report)
    checked = f"max |onnx - torch| = {diff:.2e} on {len(images)} test image(s)" if images else "not checked"
    print(f"wpcrack export: {out} ({report['size_mb']:.1f} MB, {seconds:.0f} s); {checked}")
    if report["passed"] is False:
        raise DataError(out, f"ONNX output differs from torch by {diff:.2e} (> {CHECK_TOLERANCE:g})")
    return report
