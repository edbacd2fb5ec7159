"""Survey flow: a season of road photos through the champion on a Dask cluster, resumable.

The photos of a folder (recursive) or a CSV manifest (column ``path``) are split into shards, one
Prefect task each, run by prefect-dask's ``DaskTaskRunner``: a ``LocalCluster`` sized to this
machine by default (``--workers``), or the Dask cluster a team already runs (``--dask-address``;
its workers need this package and the photos and output folder at the same paths). Each worker
loads the model once; detection runs through ONNX Runtime (exported once per model version into a
cache, ``$WPCRACK_ONNX_CACHE`` or ``~/.cache/wpcrack/onnx``, and placed in ``<out>/.model/`` where every
worker reads it), torch otherwise, and the scale is chosen per photo as ``wpcrack predict``
chooses it. What a worker does with a photo is ``wpcrack.deploy.survey.process_photo``.

Restarting the same command after a kill finishes the rest: a photo whose row exists for the same
model version and settings is not predicted again. Outputs in ``--out``: ``masks/``, ``overlays/``,
``rows/`` (one JSON per photo), ``survey.parquet`` (pandera-checked), ``survey.geojson``,
``summary.md`` + ``summary.png``, and an MLflow run ``survey`` with the counts and throughput.

    python -m pipelines.survey run /surveys/2026 --out /surveys/2026-cracks --workers 2
    python -m pipelines.survey run photos.csv --out out --dask-address tcp://scheduler:8786
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.tasks import temporary_environment
from wpcrack.errors import WpcrackError

@task(name="predict-shard", cache_policy=NO_CACHE, task_run_name="predict {paths[0]} (+{extra})")
def predict_shard(paths: list[str], spec: dict[str, Any], out: str, mm_per_pixel: float | None,
                  max_pixels: int, extra: int = 0) -> list[dict[str, Any]]:
    """One shard of photos on one worker: their rows (and, on disk, their outputs)."""
    import resource

    from wpcrack.deploy.survey import LOADS, process_photo, release_free_memory, worker_model

    model = worker_model(spec)
    rows = []
    for path in paths:
        rows.append(process_photo(Path(path), model, Path(out), mm_per_pixel, max_pixels, spec["settings"]))
        release_free_memory()
    worker = {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pid": os.getpid(),
              "model_loads": LOADS["models"]}
    return [{**r, "worker": worker} for r in rows]


def prepare_model(model: str, dataset: str, params: str | None, out: Path, onnx: bool,
                  mm_per_pixel: float | None, threads: int | None) -> dict[str, Any]:
    """Load the model here once to export it (when ``onnx``) and name its version, configuration and
    settings: the spec every worker loads from (with the export's classifier graph, no torch model)."""
    from wpcrack.deploy.detection import weights_digest
    from wpcrack.deploy.predict import load_detector
    from wpcrack.deploy.survey import ensure_onnx, model_version, settings_digest

    detector, cfg, source = load_detector(model, dataset, params)
    digest = weights_digest(detector)
    path = ensure_onnx(detector, cfg, out / ".model", digest) if onnx else None
    return {"model": model, "dataset": dataset, "params": params, "onnx": str(path) if path else None,
            "threads": threads, "version": model_version(model, source, digest), "cfg": cfg,
            "settings": settings_digest(cfg, mm_per_pixel), "engine": "onnxruntime" if path else "torch"}


def shards(paths: list[Path], size: int, workers: int) -> list[list[str]]:
    """The photos as Prefect tasks, largest files first and shards of at most ``size`` that shrink to
    single photos over the last ``2 * size * workers`` (guided self-scheduling): a worker that finishes
    early picks up small pieces instead of idling while another ends a long shard of 12 MP photos."""
    ordered = sorted(paths, key=lambda p: p.stat().st_size if p.is_file() else 0, reverse=True)
    out, i = [], 0
    while i < len(ordered):
        n = max(1, min(size, -(-(len(ordered) - i) // (2 * max(1, workers)))))
        out.append([str(p) for p in ordered[i:i + n]])
        i += n
    return out


ADDRESS_ENV, WORKERS_ENV = "WPCRACK_DASK_ADDRESS", "WPCRACK_DASK_WORKERS"


def _keep_malloc_defaults() -> None:
    """Spawn the LocalCluster's workers without Dask's ``MALLOC_TRIM_THRESHOLD_=65536``: a fixed trim
    threshold turns off glibc's adaptive mmap threshold, so every tile-sized array is mmapped and unmapped
    again (on 2 cores a worker spent more time in page faults than in the model: 3 s a photo, not 1).
    ``MALLOC_ARENA_MAX=2`` keeps the threads of ONNX Runtime, torch and Dask from each growing a heap
    of their own (a worker's peak on 12 MP photos: 1.7 GB, not 2.5). A variable set in this process's
    environment still wins, as Dask documents."""
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                     "distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", 2)})


def task_runner(workers: int | None = None, address: str | None = None):
    """prefect-dask's runner: the cluster at ``address``, or a LocalCluster of ``workers`` processes
    (default: one per core) with one Dask thread each (torch / ONNX Runtime threads are set inside).
    Without arguments (a deployment's runs): ``$WPCRACK_DASK_ADDRESS`` / ``$WPCRACK_DASK_WORKERS``."""
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get(ADDRESS_ENV) or None
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get(WORKERS_ENV) or 0) or os.cpu_count() or 1
    _keep_malloc_defaults()
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})


@flow(name="wpcrack-survey", log_prints=True, task_runner=task_runner())
def survey(photos: str, out: str, model: str = "champion", dataset: str = "deepcrack",
           params: str | None = "params.yaml", mm_per_pixel: float | None = None, onnx: bool = True,
           shard_size: int = 8, max_megapixels: float = 50.0, threads: int | None = None,
           workers: int | None = None, track: bool = True) -> dict[str, Any]:
    """Predict every photo of ``photos`` not done yet into ``out``; write the table, map and summary."""
    from prefect.futures import as_completed
    from tqdm import tqdm

    from wpcrack.deploy.survey import done_row, list_photos, table, write_outputs

    out_path = Path(out).resolve()
    out_path.mkdir(parents=True, exist_ok=True)
    listed = list_photos(photos)
    params = str(Path(params).resolve()) if params and Path(params).is_file() else None
    spec = prepare_model(model, dataset, params, out_path, onnx, mm_per_pixel, threads)
    rows = {str(p): done_row(out_path, p, spec["version"], spec["settings"]) for p in listed}
    todo = [p for p in listed if rows[str(p)] is None]
    print(f"survey: {len(listed)} photos, {len(listed) - len(todo)} done by an earlier run, {len(todo)} to predict "
          f"with {spec['version']} ({spec['engine']})")
    start, workers_seen = time.perf_counter(), {}
    futures = [predict_shard.submit(shard, spec, str(out_path), mm_per_pixel, int(max_megapixels * 1e6), len(shard) - 1)
               for shard in shards(todo, shard_size, workers or os.cpu_count() or 1)]
    with tqdm(total=len(todo), desc="survey", unit="photo", disable=not todo) as bar:
        for future in as_completed(futures):
            for row in future.result():
                worker = row.pop("worker")
                workers_seen[worker["pid"]] = worker
                rows[row["path"]] = row
                bar.update(1)
    seconds = time.perf_counter() - start
    processed = sum(1 for r in rows.values() if not r.get("skipped", True))
    frame = table([{k: v for k, v in r.items() if k != "skipped"} for r in rows.values()])
    meta = {"model_version": spec["version"], "engine": spec["engine"], "workers": workers or len(workers_seen) or 1,
            "seconds": seconds, "processed": processed, "skipped": len(listed) - len(todo),
            "photos_per_s": processed / seconds if seconds > 0 and processed else 0.0}
    counts = write_outputs(frame, out_path, meta)
    result = {**counts, **meta, "peak_worker_mb": max((w["peak_mb"] for w in workers_seen.values()), default=0.0),
              "model_loads": sum(w["model_loads"] for w in workers_seen.values()), "out": str(out_path)}
    if track and params:
        _track(result, params, dataset)
    print(f"survey: {counts['predicted']} predicted, {counts['errors']} errors, {processed} new in {seconds:.0f} s "
          f"({meta['photos_per_s']:.2f} photos/s) -> {out_path / 'summary.md'}")
    return result


def _track(result: dict[str, Any], params: str, dataset: str) -> None:
    from wpcrack.config import load_config
    from wpcrack.tracking.runs import start_run

    cfg = load_config(params, dataset=dataset)
    with start_run(cfg, stage="survey", tags={"model_version": result["model_version"], "engine": result["engine"]}) as run:
        run.log_params({"survey": {"out": result["out"], "workers": result["workers"]}})
        run.log_metrics({k: float(result[k]) for k in ("photos", "predicted", "errors", "with_gps", "with_cracks",
                                                       "processed", "skipped", "seconds", "photos_per_s",
                                                       "peak_worker_mb", "model_loads")})
        for name in ("summary.md", "summary.png"):
            run.log_artifact(Path(result["out"]) / name, artifact_path="survey")


def run(photos: str, out: str, workers: int | None = None, address: str | None = None, **kwargs) -> dict[str, Any]:
    """``survey`` on the runner these arguments ask for (torch threads per worker: the cores shared out).
    A missing or empty survey is an error before any cluster or Prefect run starts."""
    from wpcrack.deploy.survey import list_photos

    list_photos(photos)
    threads = kwargs.pop("threads", None) or (None if address else max(1, (os.cpu_count() or 1) // (workers or os.cpu_count() or 1)))
    runner = task_runner(workers, address)
    with _one_server(local=not (address or os.environ.get(ADDRESS_ENV))):
        return survey.with_options(task_runner=runner)(photos, out, threads=threads, workers=workers, **kwargs)


@contextlib.contextmanager
def _one_server(local: bool):
    """Without a Prefect server (no ``PREFECT_API_URL``), the flow's temporary server started before its
    LocalCluster, its URL in the environment the workers are spawned with: else each worker starts a
    server of its own (three servers on 2 cores cost the flow a tenth of its time). Prefect stops the
    server at exit, after its last logs are sent, as it does its own temporary server."""
    from prefect.settings import PREFECT_API_URL

    if not local or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one temporary server: the flow's client uses it too
    server.start()
    with temporary_environment(PREFECT_API_URL=server.api_url):
        yield


def bench(photos: int, out: str, work: str, model: str, dataset: str = "deepcrack", params: str = "params.yaml",
          workers: tuple[int, ...] = (1, 2), large_every: int = 40) -> dict[str, Any]:
    """``reports/benchmark/survey.{json,md,png}``: one ``wpcrack predict`` process against this flow at
    each of ``workers``, then a flow killed halfway and finished (``wpcrack.diagnostics.survey_bench``).
    The ONNX export, made once per model version, is made first into the bench's own cache and timed
    on its own: every flow below finds it there, as a team's second survey does."""
    import shutil

    from wpcrack.diagnostics import survey_bench as sb

    work_dir = Path(work).resolve()
    folder = work_dir / "photos"
    made = sb.make_photos(sb.test_photos(params), folder, photos, large_every)
    print(f"survey bench: {made['photos']} photos ({made['large']} of about 12 MP) in {folder}")

    def fresh(name: str) -> Path:
        path = work_dir / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def flow_cmd(target: Path, n: int) -> list[str]:
        return [sys.executable, "-m", "pipelines.survey", "run", str(folder), "--out", str(target), "--workers", str(n),
                "--model", model, "--dataset", dataset, "--params", params]

    with temporary_environment(WPCRACK_ONNX_CACHE=str(fresh("onnx"))):
        start = time.perf_counter()
        prepare_model(model, dataset, str(Path(params).resolve()), fresh("export"), True, None, None)
        export_seconds = time.perf_counter() - start
        print(f"survey bench: ONNX export {export_seconds:.0f} s (once per model version)")
        seconds = sb.timed([sys.executable, "-m", "wpcrack", "predict", str(folder), "--model", model, "--dataset",
                            dataset, "--params", params, "--out", str(fresh("predict"))], work_dir / "predict.log")
        print(f"survey bench: wpcrack predict {photos / seconds:.2f} photos/s")
        per_s, peak = {}, 0.0
        for n in workers:
            log = work_dir / f"flow-{n}.log"
            per_s[str(n)] = photos / sb.timed(flow_cmd(fresh(f"flow-{n}"), n), log)
            peak = max(peak, sb.peak_mb(log))
            print(f"survey bench: flow at {n} worker(s) {per_s[str(n)]:.2f} photos/s, peak {peak:.0f} MB per worker")
        target, n = fresh("killed"), max(workers)
        killed_at = sb.kill_halfway(flow_cmd(target, n), target / "rows", photos, work_dir / "killed.log")
        before = sb.row_stamps(target / "rows")
        sb.timed(flow_cmd(target, n), work_dir / "resumed.log")
    figures = {"photos": photos, "predict_photos_per_s": photos / seconds, "flow_photos_per_s": per_s,
               "resume": sb.resume_check(before, target, photos), "peak_worker_mb": peak}
    details = {"environment": sb.environment_note(), "killed_at": killed_at, "export_seconds": export_seconds,
               "agreement": sb.agreement(work_dir / "predict" / "predictions.csv", work_dir / f"flow-{n}" / "survey.parquet")}
    sb.write(Path(out), figures, made, details)
    print(f"survey bench: killed after {killed_at} rows, resumed: {figures['resume']} -> {Path(out).with_suffix('.json')}")
    return figures


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the workers' start and stop chatter
    parser = argparse.ArgumentParser(prog="python -m pipelines.survey", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="predict a survey's photos on a Dask cluster (resumable)")
    p.add_argument("photos", help="folder of photos (searched recursively) or a CSV with a path column")
    p.add_argument("--out", required=True, help="output folder (a re-run with the same command resumes)")
    p.add_argument("--model", default="champion", help="'champion' of --dataset, models:/..., or a model folder")
    p.add_argument("--dataset", default="deepcrack", help="whose champion (default: deepcrack)")
    p.add_argument("--params", default="params.yaml", help="inference settings (default: params.yaml)")
    p.add_argument("--mm-per-pixel", type=float, help="ground size of a pixel: widths and lengths in mm too")
    p.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    p.add_argument("--dask-address", help="an existing Dask scheduler, e.g. tcp://scheduler:8786")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime threads per worker (default: cores / workers)")
    p.add_argument("--shard-size", type=int, default=8, help="photos per Prefect task (default: 8)")
    p.add_argument("--max-megapixels", type=float, default=50.0, help="larger photos are refused (default: 50)")
    p.add_argument("--torch", action="store_true", help="detect with torch instead of the ONNX export")
    p = sub.add_parser("bench", help="photos/s of one wpcrack predict process and of this flow at 1 and 2 workers, "
                                     "and a kill halfway -> reports/benchmark/survey.{json,md,png}")
    p.add_argument("--photos", type=int, default=1000, help="photos made from the test splits (default: 1000)")
    p.add_argument("--model", default="models/deepcrack/full", help="model folder (default: %(default)s)")
    p.add_argument("--dataset", default="deepcrack")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="flow workers to time (default: 1 2)")
    p.add_argument("--large-every", type=int, default=40, help="every N-th photo enlarged to 12 MP (default: 40)")
    p.add_argument("--work", default=".wpcrack/survey-bench", help="photos and runs (default: %(default)s)")
    p.add_argument("--out", default="reports/benchmark/survey", help="output stem (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            print(bench(args.photos, args.out, args.work, args.model, args.dataset, args.params, tuple(args.workers),
                        args.large_every))
        except WpcrackError as exc:
            print(f"survey bench: error: {exc}", file=sys.stderr)
            return 2
        return 0
    for name in ("workers", "threads", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"survey: error: --{name.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        print(run(args.photos, args.out, args.workers, args.dask_address, model=args.model, dataset=args.dataset,
                  params=args.params, mm_per_pixel=args.mm_per_pixel, onnx=not args.torch, shard_size=args.shard_size,
                  max_megapixels=args.max_megapixels, threads=args.threads))
    except WpcrackError as exc:
        print(f"survey: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
