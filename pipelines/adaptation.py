"""The adaptation experiment as a flow: the retrain flow run for real on a public stand-in for a team.

Each arm copies the project into ``<work>/<mode>/<arm>`` (code, stages, params, dvc.lock, the DeepCrack
model and results; hard links to the raw and prepared data; this project's DVC cache, so its finished
stages stay finished), registers the DeepCrack full model there as the champion of its own registered model, puts a field set of
CRACK500 val photos in ``data/field/`` and runs ``pipelines.retrain`` (intake, DVC, MLflow, the gate)
on a batch made by ``wpcrack.evaluate.adaptation``:

- ``tagged``: ``--photos`` CRACK500 training images tagged from their masks' emptiness;
- ``control``: the same images with shuffled tags, which the gate must reject;
- ``tagged-<n>`` for each ``--sizes`` n: how much tagging buys how much IoU.

Every arm shares one MLflow store (``<work>/mlflow.db``); nothing of this project (its registry, its
models, its dvc.lock) changes. Writes ``docs/results/adaptation.json`` and ``.md``.

    python -m pipelines.adaptation run                 # 200 photos, control, 50 photos; retrain.mode finetune
    python -m pipelines.adaptation run --mode scratch --no-control --sizes   # the 200 photos retrained from
                                                       # scratch: adaptation-scratch.{json,md}, compared on both pages
    python -m pipelines.adaptation arm weekly --photos 50   # one arm set up, not run: for the retrain
                                                       # flow's deployment (docs/operations.md)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.retrain import retrain
from pipelines.tasks import temporary_environment
from wpcrack.dvc import run_dvc, tool_env
from wpcrack.errors import DataError, WpcrackError
from wpcrack.evaluate import adaptation

DATASET = "deepcrack"
# What an arm needs from this project, linked (never written in place: stages replace whole files).
# The data is linked (prepare replaces its folder whole, never writes a file in place); the model and
# results folders, which stages rewrite file by file, are copied.
LINKED = ("data/raw/deepcrack", "data/raw/cfd", "data/raw/crack500", "data/prepared/deepcrack",
          "data/prepared/crack500")
COPIED = ("wpcrack", "pipelines", "dvc.yaml", "dvc.lock", "params.yaml", "data_versions", "pyproject.toml",
          "models/deepcrack/full", "results/deepcrack/full")


def _link_tree(source: Path, dest: Path) -> None:
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link, symlinks=False)


def _git(args: list[str], cwd: Path) -> None:
    cmd = ["git", *args]
    done = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if done.returncode:
        raise WpcrackError(f"`{' '.join(cmd)}` in {cwd} exited with {done.returncode}: {done.stderr[-2000:]}")


@task(name="arm-project", cache_policy=NO_CACHE)
def make_project(source: str, folder: str, arm: str, mode: str, field_photos: list, field: int, seed: int) -> str:
    """A git + DVC copy of ``source`` with its own registered-model prefix, ``retrain.mode`` and the field set."""
    src, root = Path(source), Path(folder)
    missing = [p for p in (*LINKED, *COPIED[-2:]) if not (src / p).exists()]
    if missing:
        raise DataError(src / missing[0], "needed by the adaptation experiment; run `dvc repro evaluate@deepcrack "
                        "calibrate@deepcrack prepare@crack500` first")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for rel in COPIED:
        if (src / rel).is_dir():
            shutil.copytree(src / rel, root / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif (src / rel).is_file():
            shutil.copy2(src / rel, root / rel)
    for rel in LINKED:
        _link_tree(src / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["model_name_prefix"] = f"adaptation-{arm}"
    params.setdefault("field", {})["sets"] = [adaptation.FIELD_SET]
    params.setdefault("retrain", {})["mode"] = mode
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    adaptation.make_field_set(field_photos, field, root / "data" / "field" / adaptation.FIELD_SET, seed)
    (root / ".gitignore").write_text("/data/\n/models/\n/results/\n/reports/\n/.wpcrack/\n/mlflow.db\n/mlartifacts/\n")
    cache = run_dvc(["cache", "dir"], src).strip()
    _git(["init", "-q"], root)
    run_dvc(["init", "-q"], root)
    run_dvc(["cache", "dir", "--local", cache], root)
    _git(["add", "-A"], root)
    _git(["-c", "user.name=adaptation", "-c", "user.email=adaptation@localhost", "commit", "-qm", arm], root)
    return str(root)


@task(name="register-champion", cache_policy=NO_CACHE)
def register_champion(root: str) -> int:
    """The DeepCrack full model of ``root`` registered and aliased ``champion``, with its benchmark
    score and its training crack width (scale.json) on the version."""
    from wpcrack.config import load_config
    from wpcrack.deploy.detection import load_model_dir
    from wpcrack.evaluate.run import load_test_rows
    from wpcrack.io import read_image
    from wpcrack.tracking import runs

    project = Path(root)
    with contextlib.chdir(project):
        cfg = load_config("params.yaml", dataset=DATASET)
        folder = Path(cfg.paths.models) / DATASET / "full"
        detector, _ = load_model_dir(folder)
        data_root, rows = load_test_rows(cfg)
        with runs.start_run(cfg, "adaptation-champion") as run:
            version = run.log_detector(detector, read_image(data_root / rows[0].image))
        name = runs.model_name(cfg.tracking.model_name_prefix, DATASET)
        metrics = json.loads((Path(cfg.paths.results) / DATASET / "full" / "metrics.json").read_text())
        runs.record_score(name, version, float(metrics["detector"]["iou"]))
        runs.client().set_registered_model_alias(name, runs.CHAMPION, str(version))
        runs.tag_crack_width(cfg, json.loads((folder / "scale.json").read_text()))
    return int(version)


@task(name="target-iou", cache_policy=NO_CACHE)
def target_iou(root: str, model: str) -> float:
    """CRACK500 test IoU of ``model`` through predict's default path, in the arm's project."""
    with contextlib.chdir(root):
        return adaptation.target_iou("params.yaml", model)


def _store(uri: str):
    """Every MLflow call of the experiment (and of its ``dvc`` subprocesses) goes to ``uri``."""
    return temporary_environment(MLFLOW_TRACKING_URI=uri)


def prepare_arm(source: Path, work_dir: Path, arm: str, mode: str, count: int, shuffled: bool, train_photos: list,
                field_photos: list, field: int, seed: int) -> tuple[str, int, Path, dict]:
    """An arm's project (``<work>/<mode>/<arm>``) with its champion registered, and its batch
    (``<work>/<mode>/<arm>-batch``): (project, champion version, batch folder, batch composition)."""
    folder = work_dir / mode
    project = make_project(str(source), str(folder / arm), f"{mode}-{arm}", mode, field_photos, field, seed)
    champion = register_champion(project)
    batch_dir = folder / f"{arm}-batch"
    return project, champion, batch_dir, adaptation.make_batch(train_photos, count, batch_dir, seed, shuffled)


def _photos(source: Path) -> tuple[list, list]:
    from wpcrack.config import load_config

    data = Path(load_config(source / "params.yaml", dataset=DATASET).paths.data)
    data = data if data.is_absolute() else source / data
    return adaptation.items(data, "train"), adaptation.items(data, "val")


# The mode a team retrains in weekly, whose figures are the page of record (adaptation.json). It is not
# params.yaml's retrain.mode: that one is also a parameter of the train stages, where scratch keeps
# `dvc repro` training the benchmark models anew.
WEEKLY_MODE = "finetune"


def default_out(mode: str) -> str:
    """The page of an experiment in ``mode``: the weekly mode's is the page of record."""
    return "docs/results/adaptation" if mode == WEEKLY_MODE else f"docs/results/adaptation-{mode}"


@flow(name="wpcrack-adaptation", log_prints=True)
def run_experiment(root: str = ".", work: str = ".wpcrack/adaptation", photos: int = 200, sizes: tuple[int, ...] = (50,),
                   field: int = 20, mode: str = WEEKLY_MODE, out: str | None = None, seed: int = 0,
                   control: bool = True) -> dict:
    """The arms (see the module docstring), their figures, and the page: ``out`` (default
    ``default_out(mode)``)."""
    from wpcrack.train.loop import _hardware

    source, work_dir = Path(root).resolve(), Path(root).resolve() / work
    out = out or default_out(mode)
    train_photos, field_photos = _photos(source)
    plan = [("tagged", photos, False)] + ([("control", photos, True)] if control else [])
    plan += [(f"tagged-{n}", n, False) for n in sizes]
    arms: dict[str, dict] = {}
    before: dict[str, float] | None = None
    work_dir.mkdir(parents=True, exist_ok=True)
    with _store(f"sqlite:///{work_dir / 'mlflow.db'}"):
        for arm, count, shuffled in plan:
            project, champion, batch_dir, batch = prepare_arm(source, work_dir, arm, mode, count, shuffled,
                                                              train_photos, field_photos, field, seed)
            start = time.perf_counter()
            result = retrain(str(batch_dir), dataset=DATASET, root=project, min_side=32)
            minutes = (time.perf_counter() - start) / 60
            if "challenger_version" not in result:
                raise WpcrackError(f"arm {arm}: the retraining registered no challenger ({result['decision']})")
            name = result["model"]
            if before is None:
                before = {"field": result["champion_field"][adaptation.FIELD_SET],
                          "target_test": target_iou(project, f"models:/{name}/{champion}"),
                          "benchmark_test": result["champion_iou"]}
            after = {"field": result["challenger_field"][adaptation.FIELD_SET],
                     "target_test": target_iou(project, f"models:/{name}/{result['challenger_version']}"),
                     "benchmark_test": result["challenger_iou"]}
            arms[arm] = {"batch": batch, "after": after, "decision": result["decision"], "minutes": minutes,
                         "mode": mode}
            if "tagged" in arms:  # written after every arm: a stopped experiment keeps what it measured
                adaptation.write(source / out, {**adaptation.summary(arms, before), "field_photos": field,
                                                "hardware": _hardware()}, arms)
            print(f"adaptation {arm}: {batch['images']} images -> {result['decision']}; field "
                  f"{before['field']:.1f} -> {after['field']:.1f}, CRACK500 test {before['target_test']:.1f} -> "
                  f"{after['target_test']:.1f}, DeepCrack test {before['benchmark_test']:.1f} -> "
                  f"{after['benchmark_test']:.1f} ({minutes:.1f} min)")
    return adaptation.summary(arms, before)


def _arm(args: argparse.Namespace) -> int:
    source = Path(args.root).resolve()
    work_dir = source / args.work
    mode = args.mode
    work_dir.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work_dir / 'mlflow.db'}"
    with _store(store):
        project, champion, batch_dir, batch = prepare_arm(source, work_dir, args.name, mode, args.photos, args.shuffled,
                                                          *_photos(source), args.field, 0)
    print(f"arm {args.name}: project {project} (retrain.mode {mode}, field set {adaptation.FIELD_SET}), champion "
          f"version {champion}; batch {batch_dir}: {batch['crack']} crack, {batch['no_crack']} no_crack\n"
          f"  export MLFLOW_TRACKING_URI={store}\n"
          f"  python -m pipelines.retrain run {batch_dir} --root {project} --min-side 32")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.adaptation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every arm and write docs/results/adaptation.{json,md}")
    p.add_argument("--root", default=".", help="the wpcrack repository (default: .)")
    p.add_argument("--work", default=".wpcrack/adaptation", help="the arms' projects, under --root")
    p.add_argument("--photos", type=int, default=200, help="images in the tagged batch (default: 200)")
    p.add_argument("--sizes", type=int, nargs="*", default=[50], help="other batch sizes to report (default: 50)")
    p.add_argument("--field", type=int, default=20, help="CRACK500 val photos in the field set (default: 20)")
    p.add_argument("--mode", choices=("scratch", "finetune"), default=WEEKLY_MODE,
                   help="retrain.mode (default: %(default)s)")
    p.add_argument("--no-control", action="store_true", help="skip the shuffled-tags control")
    p.add_argument("--out", help=f"output stem (default: {default_out(WEEKLY_MODE)} in {WEEKLY_MODE}, "
                   "docs/results/adaptation-<mode> in another)")
    p = sub.add_parser("arm", help="set up one arm (project, champion, field set, batch) without retraining")
    p.add_argument("name")
    p.add_argument("--root", default=".", help="the wpcrack repository (default: .)")
    p.add_argument("--work", default=".wpcrack/adaptation", help="the arms' projects, under --root")
    p.add_argument("--photos", type=int, default=200, help="images in the tagged batch (default: 200)")
    p.add_argument("--field", type=int, default=20, help="CRACK500 val photos in the field set (default: 20)")
    p.add_argument("--mode", choices=("scratch", "finetune"), default=WEEKLY_MODE,
                   help="retrain.mode (default: %(default)s)")
    p.add_argument("--shuffled", action="store_true", help="shuffle the tags (a batch the gate must reject)")
    args = parser.parse_args(argv)
    try:
        if args.command == "arm":
            return _arm(args)
        print(run_experiment(args.root, args.work, args.photos, tuple(args.sizes), args.field, args.mode, args.out,
                             control=not args.no_control))
    except WpcrackError as exc:
        print(f"adaptation: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
