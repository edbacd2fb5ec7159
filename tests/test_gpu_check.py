"""The GPU check (``wpcrack.diagnostics.gpu_check``, ``make gpu-check``): its CPU dry run, its budget, its report.

The dry run goes through every phase the GPU run has (environment, the gpu tests, which must skip
here, data, a paper-profile training, benchmark, evaluation, the second benchmark process) at tiny
sizes, so the check cannot rot between the rare sessions that have a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from wpcrack.diagnostics import gpu_check

REPO = Path(__file__).resolve().parents[1]
PHASES = ["env", "gpu_tests", "data", "train", "benchmark", "evaluate", "benchmark_compiled"]


def _run(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "wpcrack.diagnostics.gpu_check", "--out", str(out), "--work", str(tmp_path / "work"),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    report = json.loads((out / gpu_check.JSON_NAME).read_text())
    return proc.returncode, report, (out / gpu_check.MD_NAME).read_text()


def test_dry_run_writes_every_figure(tmp_path):
    start = time.monotonic()
    rc, report, md = _run(tmp_path, "--dry-run")
    assert time.monotonic() - start < 120
    assert rc == 0, json.dumps(report["phases"], indent=1)
    assert report["schema"] == gpu_check.SCHEMA and report["mode"] == "dry-run" and report["status"] == "ok"
    assert list(report["phases"]) == PHASES
    assert all(p["status"] == "ok" for p in report["phases"].values())
    assert report["finished"] and 0 < report["wall_s"] < report["budget_s"]

    env = report["environment"]
    assert env["cuda_available"] is False and env["modules"]["torch"] and env["modules"]["pydensecrf.densecrf"]
    tests = report["tests"]  # collected, and every one skipped without CUDA
    assert tests["total"] >= 6 and tests["skipped"] == tests["total"] and tests["passed"] == tests["failed"] == 0
    assert set(tests["skip_reasons"].values()) <= {"needs a CUDA device", "needs two GPUs"}

    assert report["data"]["dataset"] == "synthetic" and report["data"]["counts"]["train"]["rows"] == 16
    train = report["train"]
    assert train["profile"] == "paper" and train["steps"] == train["requested_steps"] == 4
    for key in ("s_per_step", "images_per_s", "crf_wait_share", "images_per_s_wall", "train_seconds"):
        assert train[key] is not None and train[key] >= 0, key
    assert train["last_epoch"]["epoch"] == 2 and "peak_gpu_memory_mb" in train

    bench = report["benchmark"]
    assert set(bench["fps"]) == {"cpu fp32", "cpu bf16_channels_last"}
    assert all(set(row) == {"1", "2"} and all(v > 0 for v in row.values()) for row in bench["fps"].values())
    assert bench["parameters"]["slim"] > 0 and bench["size"] == 32
    ev = report["evaluate"]
    assert ev["images"] == 3 and set(ev) >= {"detector", "cam", "cam_crf", "seconds"}
    assert 0 <= ev["detector"]["iou"] <= 100

    assert md.startswith("# GPU check (dry-run): ok")
    for heading in ("## Phases", "## GPU tests", "## Training (paper profile)", "## Benchmark", "## Evaluation"):
        assert heading in md
    assert "CRF pool wait share" in md and "| cpu fp32 |" in md
    assert (tmp_path / "out" / gpu_check.LOG_NAME).is_file()


def test_without_cuda_the_gpu_run_says_so_and_stops(tmp_path):
    rc, report, md = _run(tmp_path, "--budget-s", "120", env={"CUDA_VISIBLE_DEVICES": ""})
    assert rc == 1 and report["mode"] == "gpu" and report["status"] == "failed"
    assert report["phases"]["env"]["status"] == "failed" and "no CUDA device" in report["phases"]["env"]["reason"]
    assert all(report["phases"][p]["status"] == "skipped" for p in PHASES[1:])
    assert "needs env" in report["phases"]["gpu_tests"]["reason"]
    assert "| env | failed |" in md


def test_a_short_budget_stops_the_check_with_a_report(tmp_path):
    start = time.monotonic()
    rc, report, _ = _run(tmp_path, "--dry-run", "--budget-s", "14")
    assert time.monotonic() - start < 14 + 20  # its own deadline, plus starting and killing processes
    assert rc == 1 and report["status"] in ("partial", "failed")
    assert list(report["phases"]) == PHASES
    for name, phase in report["phases"].items():
        assert phase["status"] == "ok" or phase.get("reason"), name
    assert any(p["status"] != "ok" for p in report["phases"].values())


def test_train_figures_from_a_run_cut_at_the_budget(tmp_path):
    """A killed training leaves train_metrics.json, history.csv and the memory sidecar of its last epoch."""
    (tmp_path / "train_metrics.json").write_text(json.dumps({
        "steps": 100, "epochs": 2, "train_seconds": 50.0, "hardware": "1x GPU", "val_score": 0.5,
        "timing": {"s_per_iter": 0.4, "data_s": 0.1, "crf_wait_share": 0.25}}))
    (tmp_path / "history.csv").write_text("epoch,s_per_iter,data_s,crf_wait_share,epoch_s\n"
                                          "1,0.5,0.1,0.3,30\n2,0.3,0.1,0.2,20\n")
    (tmp_path / "peak_memory.json").write_text(json.dumps({"allocated_mb": 1234.0, "reserved_mb": 2000.0}))
    (tmp_path / "config.yaml").write_text("# git commit: x\ntrain:\n  batch_size: 4\n")
    figures = gpu_check.train_figures(tmp_path, {})
    assert figures["batch_size"] == 4 and figures["steps"] == 100
    assert figures["images_per_s"] == 4 / 0.5 and figures["images_per_s_wall"] == 100 * 4 / 50.0
    assert figures["crf_wait_share"] == 0.25 and figures["peak_gpu_memory_mb"] == 1234.0
    assert figures["last_epoch"]["images_per_s"] == 4 / 0.4 and figures["last_epoch"]["epoch"] == 2


def test_outcomes_from_a_killed_pytest_log(tmp_path):
    log = tmp_path / "gpu_tests.log"
    log.write_text("tests/test_gpu.py::test_a[tiny] PASSED [ 10%]\ntests/test_gpu.py::test_b SKIPPED (two GPUs)\n"
                   "tests/test_gpu.py::test_c FAILED [ 30%]\n")
    outcomes = gpu_check._log_outcomes(log)
    assert outcomes["cases"] == {"test_a[tiny]": "passed", "test_b": "skipped", "test_c": "failed"}
    assert outcomes["summary"] == "1 passed, 1 failed, 1 skipped"


def test_fps_table_marks_failed_rows():
    runs = {"cuda_bf16_b1": {"device": "cuda", "mode": "bf16", "batch_size": 1, "images_per_s": 812.34},
            "cuda_bf16_b8": {"device": "cuda", "mode": "bf16", "batch_size": 8, "error": "RuntimeError: x"}}
    assert gpu_check.fps_table(runs) == {"cuda bf16": {"1": 812.3, "8": "failed"}}
    md = gpu_check.to_markdown({
        "mode": "gpu", "status": "partial", "started": "t", "wall_s": 1.0, "budget_s": 450.0, "host": {},
        "phases": {}, "benchmark": {"fps": gpu_check.fps_table(runs), "size": 256, "runs": runs}})
    assert "| cuda bf16 | 812.3 | failed |" in md
