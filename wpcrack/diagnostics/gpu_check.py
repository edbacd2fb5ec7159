"""The GPU check: one command that a GPU machine runs from a fresh copy of the repository.

``python -m wpcrack.diagnostics.gpu_check --out DIR [--dry-run] [--budget-s N]`` (``make gpu-check OUT=DIR``)
runs, in this order and each in a process of its own with a timeout:

1. ``env``: Python, torch, CUDA, the GPU, and the packages wpcrack needs; missing ones are installed
   from the wheel folder ``.whl/`` (``make gpu-wheels`` fills it where PyPI is reachable) when it
   exists, without any index;
2. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (every CUDA path of the project);
3. ``data``: DeepCrack from a mirror folder (``--mirror``, ``$WPCRACK_MIRROR``, ``../shared/datasets``
   or ``shared/datasets``) through ``wpcrack.data.sources.download`` and ``wpcrack.data.prepare``,
   or a prepared data root (``--data``); where DeepCrack is unavailable, the synthetic dataset at
   256 px, and the report says so;
4. ``train``: the ``paper`` profile (ResNet38d, 256 px crops, batch 4, bf16 autocast, channels_last,
   the CRF pool) for a few hundred steps through ``wpcrack.train.loop.train``: images/s, time per
   step, the CRF pool's wait share, peak GPU memory;
5. ``benchmark``: ``wpcrack.diagnostics.benchmark.benchmark`` on the trained model at 256x256 for batch 1/8/32 in
   fp32, bf16 and bf16 + channels_last (eager);
6. ``evaluate``: ``wpcrack.evaluate.run.evaluate`` on the test split (MLflow tracking off);
7. ``benchmark_compiled``: the bf16 + channels_last rows under ``torch.compile``, last and in a
   process of its own: its cost is the least predictable, and a compile that overruns loses only
   the batch sizes it had not finished.

The driver keeps a deadline (``--budget-s``, default 450 s), gives each phase what its successors
leave it, kills a phase's whole process group at its timeout, and writes ``gpu_check.json`` and
``gpu_check.md`` into ``--out`` after every phase (and on SIGTERM / Ctrl-C), so a check stopped at
any point still reports what it measured; phases it could not run are recorded with the reason.
``gpu_check.log`` beside them holds the tail of every phase's output.

``--dry-run`` runs the same phases on the CPU at tiny sizes (CUDA hidden: the GPU tests skip), in
well under two minutes on two cores; CI runs it (``tests/test_gpu_check.py``) so the check cannot rot.

The driver imports only the standard library (it can start on a machine where torch is not yet
importable); the phases (``--step NAME``) import wpcrack and torch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
JSON_NAME, MD_NAME, LOG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.log"
SCHEMA = 1
DEFAULT_BUDGET_S = 450.0  # 7.5 minutes: under the 8 the issue allows, with room to start and copy
DRY_BUDGET_S = 240.0
MIRROR_ENV = "WPCRACK_MIRROR"
DATASET = "deepcrack"
REQUIRED_MODULES = {  # import name -> distribution to install from the wheel folder
    "torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "cv2": "opencv-python-headless",
    "pandas": "pandas", "pandera": "pandera", "pydensecrf.densecrf": "pydensecrf2", "scipy": "scipy", "yaml": "pyyaml",
    "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest",
}
BENCH_BATCHES = (1, 8, 32)
EAGER_MODES = ("fp32", "bf16", "bf16_channels_last")
COMPILED_MODES = ("bf16_channels_last_compile",)
# Tiny sizes of the dry run (CPU): the paper profile's code path with a tiny network and data set.
DRY_MODEL = ["model.backbone=tiny", "model.cam_channels=16", "model.paam_channels=8", "model.paam_reduction=4",
             "model.detector_channels=8", "model.decoder_channels=8"]
DRY_RUN = ["train.batch_size=4", "train.crop_size=32", "train.num_workers=0", "pseudo_labels.workers=0",
           "pseudo_labels.iterations=2", "evaluate.figure_images=1", "benchmark.size=32", "benchmark.batch_sizes=[1, 2]",
           "benchmark.warmup=1", "benchmark.iterations=2"]
DRY_DATA = ["prepare.synthetic.size=64", "prepare.synthetic.train_crack=8", "prepare.synthetic.train_nocrack=8",
            "prepare.synthetic.val_crack=2", "prepare.synthetic.val_nocrack=2", "prepare.synthetic.test=3"]
# The stand-in for DeepCrack when no mirror has it: synthetic images at the paper's 256 px.
SYNTHETIC_256 = ["prepare.synthetic.size=256", "prepare.synthetic.train_crack=160", "prepare.synthetic.train_nocrack=160",
                 "prepare.synthetic.val_crack=16", "prepare.synthetic.val_nocrack=16", "prepare.synthetic.test=48"]
GPU_BENCH = ["benchmark.size=256", f"benchmark.batch_sizes=[{', '.join(map(str, BENCH_BATCHES))}]",
             "benchmark.warmup=3", "benchmark.iterations=10"]


class PhaseError(Exception):
    """A phase failed; the message goes into the report."""


class PhaseTimeout(PhaseError):
    """A phase ran out of its time and was killed."""


class Cut(Exception):
    """A phase was stopped at its share of the budget after measuring part of what it measures."""


class Skip(Exception):
    """A phase was not run (no time left, or what it needs is missing); the message says why."""


class Stop(BaseException):
    """SIGTERM: stop the phase in flight, write the report, exit."""


# --- the driver --------------------------------------------------------------------------------------


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out).resolve()
        self.start = time.monotonic()
        budget = args.budget_s if args.budget_s is not None else (DRY_BUDGET_S if self.dry else DEFAULT_BUDGET_S)
        self.budget = float(budget)
        self.deadline = self.start + self.budget
        self.own_work = args.work is None
        self.work = Path(args.work or tempfile.mkdtemp(prefix="wpcrack-gpu-check-")).resolve()
        self.python = args.python or sys.executable
        self.proc: subprocess.Popen | None = None
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": "dry-run" if self.dry else "gpu",
            "status": "running",
            "started": _now(),
            "finished": None,
            "wall_s": 0.0,
            "budget_s": self.budget,
            "command": " ".join([Path(sys.executable).name, "-m", "wpcrack.diagnostics.gpu_check", *sys.argv[1:]]),
            "git_commit": _git_commit(),
            "host": {"machine": platform.node(), "cpu_cores": os.cpu_count()},
            "environment": {},
            "data": {},
            "phases": {},
            "tests": {},
            "train": {},
            "benchmark": {},
            "evaluate": {},
            "notes": [],
        }

    # -- time ------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def allowance(self, cap: float, reserve: float = 0.0) -> float:
        """Seconds a phase may take: ``cap`` at most, leaving ``reserve`` for the phases after it."""
        return min(cap, self.remaining() - reserve - self._margin())

    def _margin(self) -> float:
        return 5.0 if self.dry else 10.0  # writing the report, killing a process group

    # -- phases ----------------------------------------------------------------------------------

    def phase(self, name: str, body: Callable[[float], dict | None], *, cap: float, minimum: float,
              reserve: float = 0.0, needs: tuple[str, ...] = ()) -> bool:
        """Run ``body(timeout)`` if its prerequisites passed and time allows; record the outcome."""
        record: dict[str, Any] = {"status": "skipped", "seconds": 0.0}
        self.report["phases"][name] = record
        failed = [n for n in needs if self.report["phases"].get(n, {}).get("status") not in ("ok", "cut")]
        timeout = self.allowance(cap, reserve)
        t0 = time.monotonic()
        try:
            if failed:
                raise Skip(f"needs {', '.join(failed)}, which did not pass")
            if timeout < minimum:
                raise Skip(f"budget: {max(self.remaining(), 0):.0f} s left, this phase needs about {minimum:.0f} s "
                           f"plus {reserve:.0f} s kept for the phases after it")
            record["timeout_s"] = round(timeout, 1)
            note = body(timeout)
            record["status"] = "ok"
            if note:
                record.update(note)
        except Skip as exc:
            record.update(status="skipped", reason=str(exc))
        except Cut as exc:
            record.update(status="cut", reason=str(exc))
        except PhaseTimeout as exc:
            record.update(status="timeout", reason=str(exc))
        except PhaseError as exc:
            record.update(status="failed", reason=str(exc))
        except Stop:
            record.update(status="stopped", reason="the check was stopped (SIGTERM or Ctrl-C) during this phase")
            raise
        except Exception as exc:  # a bug in the driver must not lose the report
            record.update(status="failed", reason=f"driver error: {exc.__class__.__name__}: {exc}")
        finally:
            record["seconds"] = round(time.monotonic() - t0, 2)
            print(f"gpu-check: {name}: {record['status']} ({record['seconds']:.1f} s)"
                  + (f": {record['reason']}" if record.get("reason") else ""), flush=True)
            self.write()
        return record["status"] == "ok"

    def spawn(self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Path:
        """Run ``argv`` in the repository root in a new process group, output to ``logs/<name>.log``;
        at ``timeout`` the whole group is killed (CRF workers, DataLoader workers, torchrun ranks)."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env(env))
            try:
                rc = self.proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                self.kill()
                raise PhaseTimeout(f"still running after {timeout:.0f} s, stopped; {_tail(log, 6)}") from None
            finally:
                self.proc = None
        if rc != 0:
            raise PhaseError(f"exit status {rc}; {_tail(log, 12)}")
        return log

    def kill(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", MLFLOW_DISABLE_TELEMETRY="true",
                   MLFLOW_TRACKING_URI=f"sqlite:///{self.work / 'mlflow.db'}", DVC_NO_ANALYTICS="1")
        env.pop("WPCRACK_NPROC", None)  # one process: the two-GPU path is the gpu tests' NCCL test
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, even on a GPU machine
        env.update(extra or {})
        return env

    def step(self, name: str, spec: dict, timeout: float) -> dict:
        """One ``--step`` process: ``spec`` in, its JSON result out."""
        spec_path = self.work / "specs" / f"{name}.json"
        result_path = self.work / "specs" / f"{name}.result.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=1))
        result_path.unlink(missing_ok=True)
        self.spawn(name, [self.python, "-m", "wpcrack.diagnostics.gpu_check", "--step", spec["step"], "--spec", str(spec_path),
                          "--result", str(result_path)], timeout)
        return json.loads(result_path.read_text())

    # -- the report --------------------------------------------------------------------------------

    def write(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / JSON_NAME, json.dumps(_json_safe(self.report), indent=2) + "\n")
        _atomic_write(self.out / MD_NAME, to_markdown(self.report))
        logs = self.work / "logs"
        if logs.is_dir():
            parts = [f"===== {p.stem} =====\n{_tail(p, 200, joined=False)}\n" for p in sorted(logs.glob("*.log"),
                                                                                            key=os.path.getmtime)]
            _atomic_write(self.out / LOG_NAME, "".join(parts))

    def finish(self) -> int:
        statuses = [p["status"] for p in self.report["phases"].values()]
        bad = any(s in ("failed", "timeout", "stopped") for s in statuses)
        if bad:
            self.report["status"] = "failed"
        elif "skipped" in statuses or "cut" in statuses:
            self.report["status"] = "partial"
        else:
            self.report["status"] = "ok"
        self.report["finished"] = _now()
        self.write()
        if self.own_work and not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        print(f"gpu-check: {self.report['status']} in {self.elapsed():.0f} s -> {self.out / JSON_NAME}, "
              f"{self.out / MD_NAME}", flush=True)
        return 0 if self.report["status"] == "ok" else 1

    # -- what the check does -------------------------------------------------------------------------

    def run(self) -> int:
        dry = self.dry
        # Each phase gets at most what the phases after it leave (``reserve``: what they are expected
        # to need on an H100/H200 with the defaults, estimated from 2-core CPU runs: evaluate on
        # DeepCrack is mostly 237 serial CRFs, about 2 minutes). The compiled benchmark is last: its
        # cost is the least predictable, and it keeps the batch sizes it finished.
        try:
            self.phase("env", self.do_env, cap=240.0 if not dry else 60.0, minimum=5.0)
            self.phase("gpu_tests", self.do_tests, cap=200.0 if not dry else 60.0, minimum=10.0,
                       reserve=0.0 if dry else 300.0, needs=("env",))
            self.phase("data", self.do_data, cap=150.0 if not dry else 60.0, minimum=5.0,
                       reserve=0.0 if dry else 270.0, needs=("env",))
            # Training takes what the benchmark and the evaluation leave; cut at the budget, what
            # its completed epochs (50 steps each) did is measured.
            self.phase("train", self.do_train, cap=1e9, minimum=10.0 if dry else 60.0,
                       reserve=20.0 if dry else 230.0, needs=("data",))
            self.phase("benchmark", self.do_benchmark, cap=60.0 if not dry else 40.0, minimum=5.0 if dry else 20.0,
                       reserve=10.0 if dry else 180.0, needs=("train",))
            self.phase("evaluate", self.do_evaluate, cap=1e9, minimum=5.0 if dry else 20.0,
                       reserve=5.0 if dry else 60.0, needs=("train",))
            self.phase("benchmark_compiled", self.do_benchmark_compiled, cap=1e9, minimum=5.0 if dry else 30.0,
                       needs=("train",))
        except Stop:
            self.report["notes"].append(f"stopped by a signal (SIGTERM or Ctrl-C) after {self.elapsed():.0f} s")
        return self.finish()

    def do_env(self, timeout: float) -> dict:
        env = self.step("env", {"step": "env", "modules": REQUIRED_MODULES}, timeout)
        missing = [m for m, v in env["modules"].items() if v is None]
        installed: list[str] = []
        if missing:
            wheels = Path(self.args.wheels) if self.args.wheels else REPO / ".whl"
            if not wheels.is_dir():
                raise PhaseError(f"missing Python packages {', '.join(missing)} and no wheel folder {wheels} "
                                 "(`make setup` where PyPI is reachable, or `make gpu-wheels` there and carry .whl/)")
            dists = [REQUIRED_MODULES[m] for m in missing]
            self.spawn("env_install", [self.python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                                       "--no-build-isolation", "--quiet", *dists], self.allowance(timeout - 10))
            installed = dists
            env = self.step("env_probe", {"step": "env", "modules": REQUIRED_MODULES}, self.allowance(60.0))
            missing = [m for m, v in env["modules"].items() if v is None]
            if missing:
                raise PhaseError(f"still missing after installing from {wheels}: {', '.join(missing)}")
        env["installed_from_wheels"] = installed
        self.report["environment"] = env
        if not self.dry and not env.get("cuda_available"):
            raise PhaseError("no CUDA device visible to torch: run the check on a GPU machine, or use --dry-run")
        if not self.dry and not env.get("bf16_supported"):
            self.report["notes"].append("this GPU does not support bf16: the bf16 rows measure emulation or fail")
        return {"python": env["python"], "torch": env["modules"].get("torch"), "gpu": env.get("gpu")}

    def do_tests(self, timeout: float) -> dict:
        junit = self.work / "junit.xml"
        argv = [self.python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-rA", "-p", "no:cacheprovider",
                f"--junitxml={junit}"]
        log_error = None
        try:
            log = self.spawn("gpu_tests", argv, timeout)
        except PhaseError as exc:
            log, log_error = self.work / "logs" / "gpu_tests.log", exc
        tests = _junit_outcomes(junit) if junit.is_file() else _log_outcomes(log)
        self.report["tests"] = tests
        if log_error is not None:
            raise log_error.__class__(f"{tests['summary']}; {log_error}")
        if self.dry and tests["passed"]:
            raise PhaseError("the GPU tests ran with CUDA hidden: they must skip on a CPU")
        if tests["failed"] or tests["errors"] or not tests["total"]:
            raise PhaseError(tests["summary"])
        return {"summary": tests["summary"]}

    def do_data(self, timeout: float) -> dict:
        data_root = self.work / "data"
        if self.dry:
            result = self.step("data", {"step": "prepare", "dataset": "synthetic", "data_root": str(data_root),
                                        "overrides": DRY_DATA}, timeout)
            self.report["data"] = {"dataset": "synthetic", "data_root": str(data_root), "source": "generated",
                                   "note": "dry run: tiny synthetic data set (64 px)", "counts": result["counts"]}
            return {"dataset": "synthetic"}
        if self.args.data:
            manifest = Path(self.args.data) / "prepared" / DATASET / "manifest.csv"
            if manifest.is_file():
                self.report["data"] = {"dataset": DATASET, "data_root": str(Path(self.args.data).resolve()),
                                       "source": f"prepared data given with --data {self.args.data}",
                                       "counts": _read_json(manifest.parent / "counts.json")}
                return {"dataset": DATASET}
            self.report["notes"].append(f"--data {self.args.data} has no prepared/{DATASET}/manifest.csv")
        mirror = self.mirror()
        reason = None
        if mirror is not None:
            t0 = time.monotonic()
            try:
                result = self.step("data", {"step": "prepare", "dataset": DATASET, "data_root": str(data_root),
                                            "mirror": str(mirror), "overrides": []}, self.allowance(timeout - 30.0))
                self.report["data"] = {"dataset": DATASET, "data_root": str(data_root), "source": f"mirror {mirror}",
                                       "seconds": round(time.monotonic() - t0, 1), "counts": result["counts"]}
                return {"dataset": DATASET}
            except PhaseError as exc:
                reason = f"DeepCrack from the mirror {mirror} failed ({exc})"
        else:
            reason = (f"no mirror with DeepCrack/DeepCrack.zip (--mirror, ${MIRROR_ENV}, ../shared/datasets, "
                      "shared/datasets)")
        result = self.step("data_synthetic", {"step": "prepare", "dataset": "synthetic", "data_root": str(data_root),
                                              "overrides": SYNTHETIC_256}, self.allowance(timeout))
        note = (f"DeepCrack unavailable: {reason}; trained and evaluated on the synthetic data set at 256 px "
                "instead (same model, crop and batch: the speed figures hold, the quality figures do not)")
        self.report["data"] = {"dataset": "synthetic", "data_root": str(data_root), "source": "generated",
                               "note": note, "counts": result["counts"]}
        self.report["notes"].append(note)
        return {"dataset": "synthetic", "note": note}

    def mirror(self) -> Path | None:
        candidates = [self.args.mirror, os.environ.get(MIRROR_ENV), REPO.parent / "shared" / "datasets",
                      REPO / "shared" / "datasets"]
        for c in candidates:
            if c and (Path(c) / "DeepCrack" / "DeepCrack.zip").is_file():
                return Path(c).resolve()
        return None

    def overrides(self) -> list[str]:
        """The configuration of training, evaluation and benchmark: paper profile + these."""
        data = self.report["data"]
        out = [f"paths.data={data['data_root']}"]
        if self.dry:
            return out + DRY_MODEL + DRY_RUN + DRY_DATA
        if data["dataset"] == "synthetic":
            out += SYNTHETIC_256
        return out + GPU_BENCH

    def do_train(self, timeout: float) -> dict:
        steps, per_epoch = self.args.steps, self.args.steps_per_epoch
        if steps is None:
            steps = 4 if self.dry else 300
        if per_epoch is None:
            per_epoch = 2 if self.dry else 50
        epochs = max(1, math.ceil(steps / per_epoch))
        model_dir = self.work / "model"
        overrides = [*self.overrides(), f"train.epochs={epochs}", f"train.max_steps_per_epoch={per_epoch}",
                     "train.val_every=1"]
        spec = {"step": "train", "dataset": self.report["data"]["dataset"], "overrides": overrides,
                "out": str(model_dir)}
        self.report["train"] = {"requested_steps": epochs * per_epoch, "epochs_requested": epochs,
                                "steps_per_epoch": per_epoch, "overrides": overrides}
        error: PhaseError | None = None
        result: dict = {}
        try:
            result = self.step("train", spec, timeout)
        except PhaseError as exc:
            error = exc
        self.report["train"].update(train_figures(model_dir, result))
        if error is not None:
            if isinstance(error, PhaseTimeout) and (model_dir / "best.pt").is_file():
                # Cut at the budget: the completed epochs are measured and their best model goes on.
                done = self.report["train"].get("steps", 0)
                raise Cut(f"stopped at its share of the budget after {done} steps (the completed epochs "
                          "are measured and their best model is evaluated and benchmarked)") from None
            raise error
        return {}

    def _bench(self, name: str, modes: list[tuple[str, str]], timeout: float) -> dict:
        """One benchmark process: ``benchmark()`` once per batch size (each writes its JSON), so a
        process stopped at its timeout keeps the batch sizes it finished."""
        out = self.work / name
        spec = {"step": "benchmark", "dataset": self.report["data"]["dataset"], "overrides": self.overrides(),
                "model_dir": str(self.work / "model"), "out": str(out), "modes": modes}
        error: PhaseError | None = None
        try:
            self.step(name, spec, timeout)
        except PhaseError as exc:
            error = exc
        bench = self.report["benchmark"]
        runs: dict[str, dict] = {}
        dataset = self.report["data"]["dataset"]
        for path in sorted(out.glob(f"b*/{dataset}.json"), key=lambda p: int(p.parent.name[1:])):
            result = _read_json(path) or {}
            for key in ("size", "parameters", "slim_max_abs_diff", "environment", "backbone", "profile"):
                bench.setdefault(key, result.get(key))
            runs.update(result.get("runs") or {})
        bench.setdefault("runs", {}).update(runs)
        bench["fps"] = fps_table(bench["runs"])
        if error is not None:
            if isinstance(error, PhaseTimeout) and runs:
                raise Cut(f"stopped at its share of the budget; measured {', '.join(runs)}") from None
            raise error
        errors = {k: r["error"] for k, r in runs.items() if "error" in r}
        if errors:
            raise PhaseError("; ".join(f"{k}: {e[:160]}" for k, e in errors.items()))
        if not runs:
            raise PhaseError("the benchmark wrote no rows")
        return {"rows": len(runs)}

    def do_benchmark(self, timeout: float) -> dict:
        modes = [("cpu", "fp32")] if self.dry else [("cuda", m) for m in EAGER_MODES]
        return self._bench("benchmark", modes, timeout)

    def do_benchmark_compiled(self, timeout: float) -> dict:
        # The dry run has no GPU and compiling on two cores takes minutes: bf16 + channels_last on
        # the CPU stands in, so the second benchmark process and its merge are exercised.
        modes = [("cpu", "bf16_channels_last")] if self.dry else [("cuda", m) for m in COMPILED_MODES]
        return self._bench("benchmark_compiled", modes, timeout)

    def do_evaluate(self, timeout: float) -> dict:
        spec = {"step": "evaluate", "dataset": self.report["data"]["dataset"], "overrides": self.overrides(),
                "model_dir": str(self.work / "model"), "out": str(self.work / "results")}
        result = self.step("evaluate", spec, timeout)
        self.report["evaluate"] = result
        return {"images": result.get("images")}


# --- figures from the phases' files ------------------------------------------------------------------


def train_figures(model_dir: Path, result: dict) -> dict:
    """Training speed from ``train_metrics.json`` and ``history.csv`` (written at every epoch end,
    so a run cut at the budget still has them) and the step process's peak GPU memory."""
    out: dict[str, Any] = {}
    metrics = _read_json(model_dir / "train_metrics.json") or result.get("metrics") or {}
    peak = result.get("peak") or _read_json(model_dir / "peak_memory.json") or {}
    out.update({k: result[k] for k in ("profile", "backbone", "crop_size", "batch_size", "amp", "channels_last",
                                        "crf_workers", "loader_workers", "device") if k in result})
    out["peak_gpu_memory_mb"] = peak.get("allocated_mb")  # None on the CPU
    out["peak_gpu_reserved_mb"] = peak.get("reserved_mb")
    if not metrics:
        return out
    timing = metrics.get("timing") or {}
    batch = out.get("batch_size") or _config_batch(model_dir)
    out.update(steps=metrics.get("steps"), epochs=metrics.get("epochs"), train_seconds=metrics.get("train_seconds"),
               hardware=metrics.get("hardware"), val_score=metrics.get("val_score"),
               pseudo_label_iou=metrics.get("pseudo_label_iou"), timing=timing)
    out["batch_size"] = batch
    step = _num(timing.get("s_per_iter"))
    data = _num(timing.get("data_s")) or 0.0
    if step:
        out["s_per_step"] = step
        out["crf_wait_share"] = _num(timing.get("crf_wait_share"))
        out["images_per_s"] = batch / (step + data) if batch else None
    rows = _read_csv(model_dir / "history.csv")
    if rows:
        last = rows[-1]
        step_last = _num(last.get("s_per_iter"))
        data_last = _num(last.get("data_s")) or 0.0
        out["last_epoch"] = {"epoch": _num(last.get("epoch")), "s_per_step": step_last,
                             "crf_wait_share": _num(last.get("crf_wait_share")), "data_s_per_step": data_last,
                             "images_per_s": batch / (step_last + data_last) if batch and step_last else None,
                             "epoch_s": _num(last.get("epoch_s"))}
    if out.get("steps") and out.get("train_seconds") and batch:
        out["images_per_s_wall"] = out["steps"] * batch / out["train_seconds"]  # validation included
    return out


def fps_table(runs: dict) -> dict:
    """images/s per ``<device> <mode>`` and batch size."""
    table: dict[str, dict[str, float | str]] = {}
    for run in runs.values():
        label = f"{run['device']} {run['mode']}"
        table.setdefault(label, {})[str(run["batch_size"])] = (
            "failed" if "error" in run else round(float(run["images_per_s"]), 1))
    return table


# --- the markdown report -------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def to_markdown(report: dict) -> str:
    env, data, train = report.get("environment") or {}, report.get("data") or {}, report.get("train") or {}
    bench, ev, tests = report.get("benchmark") or {}, report.get("evaluate") or {}, report.get("tests") or {}
    modules = env.get("modules") or {}
    lines = [
        f"# GPU check ({report['mode']}): {report['status']}",
        "",
        f"Started {report['started']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
        f"git commit {report.get('git_commit') or 'unknown'}.",
        "",
        f"GPU: {env.get('gpu') or 'none'}"
        + (f" ({_fmt(env.get('gpu_memory_gb'))} GB, compute capability {env.get('gpu_capability')})" if env.get('gpu') else "")
        + f"; {env.get('gpu_count', 0)} visible. torch {modules.get('torch') or 'n/a'} (CUDA {env.get('cuda_version') or 'n/a'}), "
        f"Python {env.get('python') or 'n/a'}, {env.get('cpu_cores') or report['host'].get('cpu_cores')} CPU cores"
        + (f"; installed from wheels: {', '.join(env['installed_from_wheels'])}" if env.get("installed_from_wheels") else "")
        + ".",
        "",
        "## Phases",
        "",
        "| phase | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, phase in report["phases"].items():
        note = str(phase.get("reason") or phase.get("summary") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {phase['status']} | {phase['seconds']:.1f} | {note[:300]} |")
    if tests:
        lines += ["", "## GPU tests", "", f"{tests.get('summary', '')}."]
        bad = [n for n, o in (tests.get("cases") or {}).items() if o in ("failed", "error")]
        skipped = {n: r for n, r in (tests.get("skip_reasons") or {}).items()}
        if bad:
            lines.append("Failed: " + ", ".join(f"`{n}`" for n in bad) + ".")
        if skipped:
            lines.append("Skipped: " + "; ".join(f"`{n}` ({r})" for n, r in list(skipped.items())[:12]) + ".")
    lines += ["", "## Data", "", f"{data.get('dataset', 'n/a')} ({data.get('source', 'n/a')})."]
    if data.get("note"):
        lines.append(f"**Note:** {data['note']}.")
    if train:
        lines += [
            "", "## Training (paper profile)", "",
            f"{train.get('backbone', 'n/a')}, {train.get('crop_size', 'n/a')} px crops, batch {train.get('batch_size', 'n/a')}, "
            f"bf16 autocast {train.get('amp', 'n/a')}, channels_last {train.get('channels_last', 'n/a')}, "
            f"{train.get('crf_workers', 'n/a')} CRF workers, {train.get('loader_workers', 'n/a')} loader workers, "
            f"on {train.get('hardware') or train.get('device') or 'n/a'}.",
            "",
            "| figure | whole run | last epoch |",
            "|---|---|---|",
        ]
        last = train.get("last_epoch") or {}
        share, last_share = train.get("crf_wait_share"), last.get("crf_wait_share")
        lines += [
            f"| steps done (of {train.get('requested_steps', 'n/a')}) | {_fmt(train.get('steps'))} | |",
            f"| images/s (steps and data loading) | {_fmt(train.get('images_per_s'))} | {_fmt(last.get('images_per_s'))} |",
            f"| images/s (wall clock, validation included) | {_fmt(train.get('images_per_s_wall'))} | |",
            f"| time per step (s) | {_fmt(train.get('s_per_step'), 3)} | {_fmt(last.get('s_per_step'), 3)} |",
            f"| CRF pool wait share of a step | {_fmt(100 * share if share is not None else None, 0, ' %')} | "
            f"{_fmt(100 * last_share if last_share is not None else None, 0, ' %')} |",
            f"| peak GPU memory allocated (MB) | {_fmt(train.get('peak_gpu_memory_mb'), 0)} | |",
            f"| training wall time (s) | {_fmt(train.get('train_seconds'))} | {_fmt(last.get('epoch_s'))} |",
        ]
    if bench.get("fps"):
        batches = sorted({b for row in bench["fps"].values() for b in row}, key=int)
        params = bench.get("parameters") or {}
        lines += ["", f"## Benchmark: images/s at {bench.get('size')}x{bench.get('size')}", "",
                  f"Slim inference model, {_fmt(params.get('slim_m'), 2)} M parameters "
                  f"({_fmt(params.get('all_m'), 2)} M with the training-only parts).", "",
                  "| device, mode | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for label, row in bench["fps"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(row.get(b)) for b in batches) + " |")
        mems = {k: r.get("peak_memory_mb") for k, r in (bench.get("runs") or {}).items() if "peak_memory_mb" in r}
        if mems:
            top = max(mems, key=lambda k: mems[k] or 0)
            lines += ["", f"Largest peak memory: {_fmt(mems[top], 0)} MB ({top})."]
    if ev.get("detector"):
        lines += ["", "## Evaluation (test split, percent)", "",
                  "| mode | precision | recall | F1 | IoU |", "|---|---|---|---|---|"]
        for mode in ("detector", "cam", "cam_crf"):
            m = ev.get(mode) or {}
            lines.append(f"| {mode} | {_fmt(m.get('precision'), 2)} | {_fmt(m.get('recall'), 2)} | "
                         f"{_fmt(m.get('f1'), 2)} | {_fmt(m.get('iou'), 2)} |")
        lines += ["", f"{ev.get('images')} test images in {_fmt(ev.get('seconds'))} s "
                  f"({_fmt(ev.get('images_per_s'), 2)} images/s including the CRF of the cam_crf mode). "
                  "A few hundred steps measure speed, not quality."]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"Full figures: `{JSON_NAME}`; phase output tails: `{LOG_NAME}`.", ""]
    return "\n".join(lines)


# --- the phase processes (--step) ------------------------------------------------------------------------


def _config(spec: dict):
    from wpcrack.config import load_config

    return load_config(PARAMS, dataset=spec["dataset"], profile="paper", overrides=spec.get("overrides", []))


def step_env(spec: dict) -> dict:
    import importlib

    modules: dict[str, str | None] = {}
    for name in spec["modules"]:
        try:
            module = importlib.import_module(name)
            modules[name] = str(getattr(module, "__version__", "present"))
        except Exception:  # absent, or broken (a wrong binary): either way not usable
            modules[name] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable, "cpu_cores": cores,
                           "modules": modules, "cuda_available": False, "gpu_count": 0, "gpu": None}
    if modules.get("torch"):
        import torch

        out["cuda_version"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if out["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            out.update(gpu_count=torch.cuda.device_count(), gpu=props.name,
                       gpu_memory_gb=props.total_memory / 2**30, gpu_capability=f"{props.major}.{props.minor}",
                       bf16_supported=torch.cuda.is_bf16_supported(),
                       cudnn=torch.backends.cudnn.version())
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                out["nvidia_smi"] = smi.stdout.strip()
    return out


def step_prepare(spec: dict) -> dict:
    from wpcrack.data.prepare import prepare

    overrides = [f"paths.data={spec['data_root']}", *spec.get("overrides", [])]
    cfg = _config({**spec, "overrides": overrides})
    if spec.get("mirror"):
        from wpcrack.data.sources import download

        download([spec["dataset"]], raw_dir=Path(spec["data_root"]) / "raw", mirror=Path(spec["mirror"]))
    manifest = prepare(cfg, spec["dataset"])
    return {"manifest": str(manifest), "counts": _read_json(manifest.parent / "counts.json")}


@contextlib.contextmanager
def _peak_memory_file(path: Path, every_s: float = 5.0) -> Iterator[Callable[[], dict]]:
    """Peak CUDA memory of this process, also written to ``path`` every few seconds (a training
    killed at the budget leaves its last reading)."""
    import threading

    import torch

    def read() -> dict:
        if not torch.cuda.is_available():
            return {}
        return {"allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                "reserved_mb": torch.cuda.max_memory_reserved() / 2**20}

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):
                _atomic_write(path, json.dumps(read()))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield read
    finally:
        stop.set()
        thread.join(timeout=every_s + 1)
        with contextlib.suppress(Exception):
            _atomic_write(path, json.dumps(read()))


def step_train(spec: dict) -> dict:
    import torch

    from wpcrack.train.loop import train
    from wpcrack.train.phases import Runtime

    cfg = _config(spec)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.for_config(cfg)
    with _peak_memory_file(out / "peak_memory.json") as peak:
        metrics = train(cfg, out, track=False)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        reading = peak()
    return {"metrics": metrics, "peak": reading, "profile": cfg.profile, "backbone": cfg.model.backbone,
            "crop_size": cfg.train.crop_size, "batch_size": cfg.train.batch_size, "amp": runtime.amp,
            "channels_last": runtime.channels_last, "crf_workers": cfg.pseudo_labels.workers,
            "loader_workers": cfg.train.num_workers, "device": str(runtime.device)}


def step_benchmark(spec: dict) -> dict:
    """``benchmark()`` of the trained model for each batch size in turn, into ``<out>/b<batch>/``."""
    import dataclasses

    from wpcrack.diagnostics.benchmark import benchmark
    from wpcrack.inference.loading import load_trained

    cfg = _config(spec)
    model = load_trained(Path(spec["model_dir"]), cfg, "cpu")
    modes = [tuple(m) for m in spec["modes"]]
    done = []
    for batch in cfg.benchmark.batch_sizes:
        one = dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, batch_sizes=(batch,)))
        benchmark(one, Path(spec["model_dir"]), Path(spec["out"]) / f"b{batch}", model=model, modes=modes)
        done.append(batch)
    return {"batch_sizes": done}


def step_evaluate(spec: dict) -> dict:
    # MLflow tracking off, as `train(track=False)`: evaluate() skips it when wpcrack.tracking.runs cannot be
    # imported (no MLflow), and the check must not write runs into anyone's store.
    sys.modules["wpcrack.tracking.runs"] = None  # type: ignore[assignment]
    from wpcrack.evaluate.run import evaluate

    t0 = time.perf_counter()
    metrics = evaluate(_config(spec), Path(spec["model_dir"]), Path(spec["out"]))
    seconds = time.perf_counter() - t0
    images = int(metrics["detector"].get("images", 0))
    keep = ("precision", "recall", "f1", "iou", "accuracy", "extra_ods_f1")
    out = {mode: {k: metrics[mode][k] for k in keep if k in metrics[mode]} for mode in ("detector", "cam", "cam_crf")}
    return {**out, "images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else None,
            "protocol": metrics.get("protocol")}


STEPS: dict[str, Callable[[dict], dict]] = {
    "env": step_env, "prepare": step_prepare, "train": step_train, "benchmark": step_benchmark,
    "evaluate": step_evaluate,
}


# --- small helpers ---------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_csv(path: Path) -> list[dict]:
    try:
        with Path(path).open(newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _config_batch(model_dir: Path) -> int | None:
    try:
        import yaml

        return int(yaml.safe_load((model_dir / "config.yaml").read_text())["train"]["batch_size"])
    except Exception:
        return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _tail(path: Path, lines: int, joined: bool = True) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "no output"
    # progress bars write carriage returns: keep each line's last state
    tail = [line.rsplit("\r", 1)[-1] for line in text if line.strip()][-lines:]
    return ("last output: " + " / ".join(t.strip()[:300] for t in tail)) if joined else "\n".join(tail)


def _junit_outcomes(path: Path) -> dict:
    cases: dict[str, str] = {}
    reasons: dict[str, str] = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return _summary(cases, reasons)
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if outcome == "skipped":
                    reasons[name] = (child.get("message") or "").strip()[:200]
                break
        cases[name] = outcome
    return _summary(cases, reasons)


def _log_outcomes(path: Path) -> dict:
    """Outcomes from ``pytest -v`` lines when no junit XML was written (the run was killed)."""
    cases: dict[str, str] = {}
    for line in Path(path).read_text(errors="replace").splitlines() if Path(path).is_file() else []:
        if "::" in line:
            for word, outcome in (("PASSED", "passed"), ("FAILED", "failed"), ("SKIPPED", "skipped"),
                                  ("ERROR", "error")):
                if f" {word}" in line:
                    cases[line.split("::", 1)[1].split(" ", 1)[0]] = outcome
                    break
    return _summary(cases, {})


def _summary(cases: dict[str, str], reasons: dict[str, str]) -> dict:
    count = {o: sum(1 for v in cases.values() if v == o) for o in ("passed", "failed", "skipped", "error")}
    summary = (f"{count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped"
               + (f", {count['error']} errors" if count["error"] else ""))
    return {"total": len(cases), "passed": count["passed"], "failed": count["failed"], "skipped": count["skipped"],
            "errors": count["error"], "summary": summary, "cases": cases, "skip_reasons": reasons}


# --- entry point -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wpcrack.diagnostics.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and gpu_check.log (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI): every phase, no GPU")
    p.add_argument("--budget-s", type=float, help=f"stop by itself within this many seconds (default "
                   f"{DEFAULT_BUDGET_S:g}; dry run {DRY_BUDGET_S:g})")
    p.add_argument("--mirror", help=f"folder holding DeepCrack/DeepCrack.zip (default: ${MIRROR_ENV}, "
                   "../shared/datasets, shared/datasets)")
    p.add_argument("--data", help="a data root that already holds prepared/deepcrack (skips download and prepare)")
    p.add_argument("--steps", type=int, help="training steps (default 300; dry run 4)")
    p.add_argument("--steps-per-epoch", type=int, help="steps per epoch: the run can be cut at any epoch end "
                   "(default 50; dry run 2)")
    p.add_argument("--wheels", help="wheel folder to install missing packages from, without an index (default: .whl)")
    p.add_argument("--python", help="interpreter for the phases (default: this one)")
    p.add_argument("--work", help="working folder for data, model and logs (default: a temporary folder, removed)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary working folder")
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.step:  # a phase process
        spec = json.loads(Path(args.spec).read_text())
        result = STEPS[args.step](spec)
        _atomic_write(Path(args.result), json.dumps(_json_safe(result), indent=1, default=str))
        return 0
    if not args.out:
        build_parser().error("--out is required")
    check = Check(args)

    def stop(signum, frame):
        check.kill()
        raise Stop

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return check.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

if __name__ == "__main__":
    sys.exit(main())
