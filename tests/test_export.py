"""``wpcrack export --onnx``: the ONNX file matches torch at any size, carries its configuration,
runs through ``wpcrack predict``, and bad input is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wpcrack.cli import main
from wpcrack.config import Config, PathsConfig, PrepareConfig, SyntheticPrepare, dump_config, load_config
from wpcrack.data.prepare import prepare
from wpcrack.deploy.detection import load_model_dir, load_onnx
from wpcrack.errors import DataError
from wpcrack.io import write_image
from wpcrack.models.wpcracknet import build_model

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["model.backbone=tiny", "model.pretrained=false", "model.cam_channels=8", "model.paam_channels=8",
        "model.paam_reduction=2", "model.detector_channels=4", "model.decoder_channels=4", "benchmark.size=64"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A params.yaml with a tiny synthetic dataset, and a trained-model folder as training writes it."""
    root = tmp_path_factory.mktemp("export")
    syn = SyntheticPrepare(size=48, train_crack=2, train_nocrack=2, val_crack=1, val_nocrack=1, test=3, seed=5)
    prepare(Config(paths=PathsConfig(data=str(root / "data")), prepare=PrepareConfig(synthetic=syn)), "synthetic")
    params = (PARAMS.read_text().replace("  data: data\n", f"  data: {root / 'data'}\n")
              .replace("  models: models\n", f"  models: {root / 'models'}\n"))
    (root / "params.yaml").write_text(params)
    cfg = load_config(root / "params.yaml", dataset="synthetic", overrides=TINY)
    folder = root / "models" / "synthetic" / "full"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "best.pt")
    dump_config(cfg, folder / "config.yaml")
    return root


def test_export_checks_against_torch_and_runs_at_other_sizes(project, capsys):
    from wpcrack.deploy.detection import weights_digest

    out = project / "slim.onnx"
    folder = project / "models" / "synthetic" / "full"
    recorded = {"crack_width_px": 5.0, "width_weight": 0.75, "weights_md5": weights_digest(load_model_dir(folder)[0])}
    (folder / "scale.json").write_text(json.dumps(recorded))
    try:
        code = main(["export", "synthetic", "--params", str(project / "params.yaml"), "--onnx", str(out),
                     "--check-images", "2", *[a for o in TINY for a in ("--set", o)]])
    finally:
        (folder / "scale.json").unlink()
    assert code == 0 and "max |onnx - torch|" in capsys.readouterr().out
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["passed"] is True and len(report["check_images"]) == 2
    assert report["max_abs_difference"] < 1e-4

    onnx, cfg = load_onnx(out)
    torch_model, torch_cfg = load_model_dir(project / "models" / "synthetic" / "full")
    assert cfg.to_dict() == torch_cfg.to_dict()  # the resolved configuration travels in the metadata
    assert (onnx.training_crack_width, onnx.training_width_weight) == (5.0, 0.75)  # and what scale.json records
    x = torch.randn(2, 3, 40, 72)  # another batch and a non-square size: the shapes are dynamic
    with torch.inference_mode():
        assert onnx(x).shape == (2, 1, 40, 72)
        assert float((onnx(x) - torch_model.cpu()(x)).abs().max()) < 1e-4
    assert report["classifier"] == str((project / "slim.classifier.onnx").resolve())
    assert onnx.multiple == 1  # both graphs take any side, not only multiples of 8: no padding
    for shape in ((3, 3, 40, 72), (1, 3, 37, 61)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert onnx(x).shape == (shape[0], 1, *shape[2:])
            assert float((onnx(x) - torch_model.cpu()(x)).abs().max()) < 1e-4
            assert onnx.classify(x).shape == (shape[0],)
            assert float((onnx.classify(x) - torch_model.cpu().classify(x)).abs().max()) < 1e-5


def test_predict_runs_an_onnx_export_and_its_gate_only_with_the_classifier_graph(project, tmp_path, capsys):
    out = project / "slim.onnx"
    if not out.is_file():
        pytest.skip("needs the export of the test above")
    photo = tmp_path / "photos" / "road.png"
    write_image(photo, np.full((50, 70, 3), 128, np.uint8))
    assert main(["predict", str(photo.parent), "--model", str(out), "--out", str(tmp_path / "pred"),
                 "--params", str(project / "params.yaml")]) == 0
    assert (tmp_path / "pred" / "road_mask.png").is_file()
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["model"] == str(out.resolve())
    assert main(["predict", str(photo.parent), "--model", str(out), "--out", str(tmp_path / "gated"),
                 "--params", str(project / "params.yaml"), "--gate", "0.5"]) == 0
    assert (tmp_path / "gated" / "road_mask.png").is_file()
    alone = tmp_path / "alone" / "slim.onnx"  # the detector graph without its classifier beside it
    alone.parent.mkdir()
    alone.write_bytes(out.read_bytes())
    capsys.readouterr()
    code = main(["predict", str(photo.parent), "--model", str(alone), "--out", str(tmp_path / "refused"),
                 "--params", str(project / "params.yaml"), "--gate", "0.5"])
    assert code != 0 and "slim.classifier.onnx" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_a_file_that_is_not_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable ONNX model"):
        load_onnx(bad)
    with pytest.raises(DataError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
