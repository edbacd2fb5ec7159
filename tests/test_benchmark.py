"""The benchmark stage on tiny models: valid JSON and Markdown, goal recorded, nothing enforced."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from wpcrack.diagnostics.benchmark import PeakRSS, benchmark
from wpcrack.config import load_config

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
FAST = ["benchmark.size=32", "benchmark.batch_sizes=[1, 2]", "benchmark.warmup=1", "benchmark.iterations=2"]


class TinyNet(nn.Module):
    """A stand-in with ``predict`` and a ``slim`` that drops a training-only part."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.training_only = nn.Linear(10, 10)

    @torch.inference_mode()
    def predict(self, x):
        return torch.sigmoid(self.conv(x))

    def slim(self, gating: bool = True):
        return nn.Sequential(self.conv, nn.Sigmoid())


def test_benchmark_writes_metrics_and_table(tmp_path):
    cfg = load_config(PARAMS, dataset="deepcrack", overrides=FAST)
    result = benchmark(cfg, tmp_path / "unused", tmp_path / "out", model=TinyNet())
    data = json.loads((tmp_path / "out" / "deepcrack.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["parameters"]["all"] == 28 + 110 and data["parameters"]["slim"] == 28
    assert data["slim_max_abs_diff"] == 0.0
    run = data["runs"]["cpu_fp32_b2"]
    assert run["batch_size"] == 2 and run["latency_ms_median"] > 0
    assert run["images_per_s"] > 0 and run["peak_memory_mb"] >= 0
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["torch_threads"] >= 1
    assert data["goal"]["applicable"] is False and data["goal"]["passed"] is None  # 32 px, not the goal's 256
    md = (tmp_path / "out" / "deepcrack.md").read_text()
    assert md.startswith("# Benchmark: deepcrack") and "| cpu | fp32 | 2 |" in md


def test_benchmark_loads_the_trained_model(tmp_path):
    from wpcrack.models.wpcracknet import build_model

    tiny = ["model.pretrained=false", "model.cam_channels=16", "model.paam_channels=16", "model.paam_reduction=4",
            "model.detector_channels=8", "model.decoder_channels=8"]
    cfg = load_config(PARAMS, dataset="cfd", overrides=[*FAST, *tiny, "benchmark.batch_sizes=[1]"])
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "best.pt")
    data = benchmark(cfg, tmp_path, tmp_path / "out", modes=[("cpu", "fp32")])  # ONNX: the test above
    assert data["slim_includes_gating_classifier"] is True
    assert 0 < data["parameters"]["slim"] < data["parameters"]["all"]
    assert data["slim_max_abs_diff"] < 1e-5
    assert data["goal"]["measured_ms"] == data["runs"]["cpu_fp32_b1"]["ms_per_image"]


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as rss:
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
    assert rss.delta_mb > (50 if rss.method == "VmHWM reset" else -1)


def test_gpu_modes_code_path_runs_on_cpu():
    """bf16 autocast + channels_last, as measured on a GPU, exercised on the CPU."""
    from wpcrack.diagnostics.benchmark import measure

    run = measure(TinyNet().slim(), "cpu", "bf16_channels_last", batch=2, size=16, warmup=0, iterations=1)
    assert run["mode"] == "bf16_channels_last" and run["ms_per_image"] > 0
