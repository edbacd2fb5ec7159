"""The benchmark stage: parameters, latency, throughput and peak memory of the inference model.

The paper's Table 5 reports parameters and FPS at 256x256 on an RTX 3090; this stage measures the
same quantities for the slim inference model (``model.slim()``: only what prediction needs, plus
the whole classifier on CFD, whose inference is patch-gated) on the CPU, and on the GPU when there
is one (fp32, bf16 autocast, bf16 + channels_last, and that under torch.compile). It records, and
does not enforce, the cpu profile's goal.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from wpcrack.config import Config
from wpcrack.io import atomic_path, write_json
from wpcrack.models.wpcracknet import count_parameters

ONNX_MODE = "onnxruntime_fp32"  # the slim model exported to ONNX, run by ONNX Runtime on the CPU

# The cpu profile's goal: the slim model at most this many ms per 256x256 image on 2 CPU cores.
CPU_GOAL_MS = 60.0
CPU_GOAL_SIZE = 256


def _infer(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's prediction entry point (``predict`` where it has one)."""
    return getattr(model, "predict", None) or model


class PeakRSS:
    """Peak resident memory of this process during a block, minus the resident memory before it.

    On Linux the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, so each
    block is measured on its own; elsewhere ``ru_maxrss`` only grows, so the delta is a lower bound.
    Memory the allocator kept from an earlier block is not counted again.
    """

    def __init__(self):
        self.resettable = self._reset()
        self.method = "VmHWM reset" if self.resettable else "ru_maxrss delta (lower bound)"

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if match is None:
            raise OSError(f"/proc/self/status has no {key}")
        return int(match.group(1))

    def _now_kb(self) -> int:
        return self._status_kb("VmRSS") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _peak_kb(self) -> int:
        return self._status_kb("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def __enter__(self) -> PeakRSS:
        self.resettable = self.resettable and self._reset()
        self.before_kb = self._now_kb()
        return self

    def __exit__(self, *exc) -> None:
        self.delta_mb = max(self._peak_kb() - self.before_kb, 0) / 1024.0


def _prepare(model: torch.nn.Module, device: str, mode: str) -> tuple[Callable, Callable]:
    """(input maker, forward) for one precision / layout mode of a copy of ``model`` on ``device``
    (an ONNX Runtime model for ``ONNX_MODE``: run as it is)."""
    if mode == ONNX_MODE:
        return (lambda batch, size: torch.randn(batch, 3, size, size)), model
    model = copy.deepcopy(model).to(device).eval()
    layout = torch.channels_last if "channels_last" in mode else torch.contiguous_format
    model = model.to(memory_format=layout)
    forward = _infer(model)
    if mode.endswith("compile"):
        forward = torch.compile(forward, dynamic=False)  # specialised to each batch size, as served
    autocast = "bf16" in mode

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            return forward(x)

    def make(batch: int, size: int) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)

    return make, run


def measure(
    model: torch.nn.Module, device: str, mode: str, batch: int, size: int, warmup: int, iterations: int
) -> dict:
    """Latency (per batch and per image), throughput and peak memory of one configuration."""
    make, run = _prepare(model, device, mode)
    x = make(batch, size)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for i in range(warmup + iterations):
            sync()
            start = time.perf_counter()
            run(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    median_ms = 1000.0 * statistics.median(times)
    out = {
        "device": device,
        "mode": mode,
        "batch_size": batch,
        "latency_ms_median": median_ms,
        "latency_ms_mean": 1000.0 * statistics.fmean(times),
        "latency_ms_min": 1000.0 * min(times),
        "ms_per_image": median_ms / batch,
        "images_per_s": 1000.0 * batch / median_ms,
        "iterations": iterations,
    }
    if cuda:
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_memory_mb"] = rss.delta_mb
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import torchvision

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {
        "cpu": _cpu_name(),
        "cpu_cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine slows every row: the CPUs' busy share while this process waits
        "cpu_busy_share_before": _busy_share(),
    }
    return env


def _busy_share(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent busy during ``seconds`` in which this process only sleeps
    (``/proc/stat``; None elsewhere): other work that will slow the measurement."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _load_note(env: dict) -> str:
    """A warning when the machine was busy as the measurement began (its times are too slow)."""
    busy = env.get("cpu_busy_share_before")
    if busy is None or busy < 0.25:
        return ""
    return (f" **The machine was busy** ({100 * busy:.0f} % of its CPU time used by other work as the "
            "measurement began): the times below are slower than on an idle machine; rerun "
            "`dvc repro -f -s benchmark@<dataset>` alone.")


def device_modes() -> list[tuple[str, str]]:
    """(device, mode) pairs to measure: fp32 and ONNX Runtime on the CPU; on a GPU also bf16,
    channels_last, compile."""
    pairs = [("cpu", "fp32"), ("cpu", ONNX_MODE)]
    if torch.cuda.is_available():
        pairs += [("cuda", m) for m in ("fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile")]
    return pairs


def _onnx_copy(slim: torch.nn.Module, cfg: Config, folder: Path) -> torch.nn.Module:
    """The slim model exported to ONNX (``wpcrack export``) and loaded into ONNX Runtime."""
    from wpcrack.deploy.detection import load_onnx
    from wpcrack.deploy.export import export_onnx

    path = export_onnx(slim, cfg, folder / "slim.onnx", size=cfg.benchmark.size)
    return load_onnx(path)[0]


def _slim_agreement(model: torch.nn.Module, slim: torch.nn.Module, size: int) -> float:
    """Largest difference between the full model's and the slim model's probabilities (should be ~0)."""
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return float((_infer(model)(x) - _infer(slim)(x)).abs().max())


def _measure_all(slim: torch.nn.Module, cfg: Config, modes: Sequence[tuple[str, str]] | None, runs: dict,
                 scratch: Path) -> tuple[torch.nn.Module | None, float | None]:
    """Measure every (device, mode) and batch size into ``runs``; the ONNX rows export ``slim`` into
    ``scratch`` once. Returns (the ONNX Runtime model or None, its largest difference from torch)."""
    bc = cfg.benchmark
    onnx, onnx_diff = None, None
    for device, mode in (device_modes() if modes is None else modes):
        for batch in bc.batch_sizes:
            key = f"{device}_{mode}_b{batch}"
            try:
                if mode == ONNX_MODE and onnx is None:
                    onnx = _onnx_copy(slim, cfg, scratch)
                    onnx_diff = _slim_agreement(slim, onnx, bc.size)
                subject = onnx if mode == ONNX_MODE else slim
                runs[key] = measure(subject, device, mode, batch, bc.size, bc.warmup, bc.iterations)
            except Exception as exc:  # compile or bf16 may be unsupported; record, measure the rest
                if device == "cpu" and mode == "fp32":
                    raise
                error = f"{exc.__class__.__name__}: {exc}"[:300]
                runs[key] = {"device": device, "mode": mode, "batch_size": batch, "error": error}
    return onnx, onnx_diff


def benchmark(cfg: Config, model_dir: Path, out_dir: Path, model: torch.nn.Module | None = None,
              modes: Sequence[tuple[str, str]] | None = None) -> dict:
    """Measure the trained model of ``model_dir`` (or ``model``); write ``<dataset>.json`` and ``.md``.

    ``modes``: the (device, mode) pairs to measure (default ``device_modes()``); the GPU check
    (``wpcrack.diagnostics.gpu_check``) measures the eager and the compiled GPU rows in separate processes.
    """
    if model is None:
        from wpcrack.inference.loading import load_trained

        model = load_trained(model_dir, cfg, "cpu")
    model = model.cpu().eval()
    gating = cfg.dataset == "cfd"  # CFD inference also runs the whole classifier (patch gating)
    slim = model.slim(gating=gating).cpu().eval() if hasattr(model, "slim") else model
    bc = cfg.benchmark
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="wpcrack-onnx-") as scratch:
        _, onnx_diff = _measure_all(slim, cfg, modes, runs, Path(scratch))
    cpu_b1 = runs.get("cpu_fp32_b1", {}).get("ms_per_image")
    onnx_b1 = runs.get(f"cpu_{ONNX_MODE}_b1", {}).get("ms_per_image")
    applicable = cfg.profile == "cpu" and bc.size == CPU_GOAL_SIZE and cpu_b1 is not None
    result = {
        "dataset": cfg.dataset,
        "variant": cfg.variant,
        "profile": cfg.profile,
        "backbone": cfg.model.backbone,
        "size": bc.size,
        "slim_includes_gating_classifier": gating,
        "parameters": {
            "all": count_parameters(model),
            "slim": count_parameters(slim),
            "all_m": count_parameters(model) / 1e6,
            "slim_m": count_parameters(slim) / 1e6,
        },
        "slim_max_abs_diff": _slim_agreement(model, slim, bc.size),
        "onnx": {"max_abs_diff": onnx_diff, "ms_per_image_b1": onnx_b1,
                 "ratio_to_torch_fp32_b1": onnx_b1 / cpu_b1 if onnx_b1 and cpu_b1 else None},
        "memory_method": {"cpu": PeakRSS().method, "cuda": "torch.cuda.max_memory_allocated"},
        "environment": environment(),
        "runs": runs,
        "goal": {
            "description": f"cpu profile: slim model <= {CPU_GOAL_MS:g} ms per {CPU_GOAL_SIZE}x{CPU_GOAL_SIZE} "
            "image at batch 1 on 2 CPU cores",
            "limit_ms": CPU_GOAL_MS,
            "measured_ms": cpu_b1,
            "applicable": applicable,
            "passed": bool(cpu_b1 <= CPU_GOAL_MS) if applicable else None,
        },
    }
    out_dir = Path(out_dir)
    write_json(out_dir / f"{cfg.dataset}.json", result)
    # what `dvc metrics show` compares (the ONNX Runtime figure stays in the JSON: one column fewer)
    write_json(out_dir / f"{cfg.dataset}.summary.json", {"ms_img": round(cpu_b1, 1) if cpu_b1 is not None else None})
    markdown = to_markdown(result)
    with atomic_path(out_dir / f"{cfg.dataset}.md") as tmp:
        tmp.write_text(markdown)
    print(markdown)
    return result


def to_markdown(result: dict) -> str:
    p, env, goal = result["parameters"], result["environment"], result["goal"]
    lines = [
        f"# Benchmark: {result['dataset']}",
        "",
        f"Slim inference model of `{result['variant']}` ({result['profile']} profile, {result['backbone']}), "
        f"{result['size']}x{result['size']} inputs. Parameters: {p['slim_m']:.3f} M for inference "
        f"({p['all_m']:.3f} M with the training-only parts).",
        "",
        f"CPU: {env['cpu']}, {env['cpu_cores_available']} cores, {env['torch_threads']} torch threads; "
        f"GPU: {env['gpu'] or 'none'}; torch {env['torch']}, torchvision {env['torchvision']}."
        + _load_note(env),
        "",
        "| device | mode | batch | ms/batch (median) | ms/image | images/s | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"].values():
        if "error" in run:
            failed = "failed: " + run["error"][:80].replace("|", "/")
            lines.append(f"| {run['device']} | {run['mode']} | {run['batch_size']} | {failed} | | | |")
            continue
        lines.append(
            f"| {run['device']} | {run['mode']} | {run['batch_size']} | {run['latency_ms_median']:.1f} | "
            f"{run['ms_per_image']:.1f} | {run['images_per_s']:.1f} | {run['peak_memory_mb']:.0f} |"
        )
    onnx = result.get("onnx") or {}
    if onnx.get("ratio_to_torch_fp32_b1") is not None:
        lines += ["", f"ONNX Runtime ({ONNX_MODE}, `wpcrack export --onnx`) at batch 1: {onnx['ms_per_image_b1']:.1f} "
                  f"ms per image, {onnx['ratio_to_torch_fp32_b1']:.2f} x the time of torch fp32; largest "
                  f"|onnx - torch| crack probability {onnx['max_abs_diff']:.1e}."]
    status = {True: "met", False: "not met", None: "not applicable to this profile"}[goal["passed"]]
    measured = f"{goal['measured_ms']:.1f} ms" if goal["measured_ms"] is not None else "n/a"
    lines += ["", f"Goal ({goal['description']}): {status} ({measured}).",
              "CPU peak memory is the resident-set growth during the timed runs; GPU peak is allocated memory.", ""]
    return "\n".join(lines)
