"""Retraining flow for newly collected imagery: intake, retrain, and the promotion gate.

1. The batch goes through intake (``wpcrack.intake``: probing, pandera validation, quarantine of bad
   files, a new DVC data version of ``data/incoming/<dataset>``), each step a Prefect task.
2. ``dvc repro`` runs ``prepare@<dataset>`` (which picks up the incoming manifest, each new image at
   the scale the champion's predict chose for it at intake), checks that the test split did not
   change, then ``train@<key>`` (``retrain.mode``: anew, or continuing the champion's weights for a
   few epochs), ``evaluate@<key>`` and, for a full model, ``calibrate@<key>`` (the crack width its
   scale choice matches, tagged on the new version before the field sets score it).
3. The promotion gate (``wpcrack.tracking.gate``) weighs the challenger against the champion on the
   benchmark's test split and on each field set of params.yaml (scored there through predict's
   default path, the champion once per set version); the decision, every score and the batch's data
   version go to an MLflow run and the challenger's version tags.
4. The champion's files are copied aside before step 2 and put back byte for byte when the
   challenger is not promoted or a stage fails (``pipelines.snapshot``). The ingested images and
   their data version stay: ``dvc status`` then shows ``prepare@<dataset>`` stale, i.e. new data
   that no served model has seen yet.

    python -m pipelines.retrain run BATCH --dataset deepcrack
    python -m pipelines.retrain restore deepcrack 3
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.snapshot import Snapshot, champion_paths
from pipelines.tasks import dvc_repro, has_stage, promote_challenger, run_key
from wpcrack import intake
from wpcrack.config import load_retrain
from wpcrack.errors import DataError, WpcrackError
from wpcrack.intake import BatchRejected, fingerprint_test_split, restore

__all__ = ["BatchRejected", "restore", "retrain"]


@task(name="validate-batch", cache_policy=NO_CACHE)
def validate_batch(batch: str, root: str, dataset: str, min_side: int = 64, max_side: int = 10000) -> pd.DataFrame:
    """The validation report of a batch: one row per listed file with ``ok`` and ``reason``."""
    return intake.validate_batch(batch, root, dataset, min_side, max_side)


@task(name="quarantine", cache_policy=NO_CACHE)
def quarantine(report: pd.DataFrame, batch: str, folder: str) -> list[str]:
    """Move the rejected files of the batch into ``folder``, each with its reason."""
    return intake.quarantine(report, batch, folder)


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(report: pd.DataFrame, root: str, dataset: str, batch: str, quarantined: int,
           scale_model: str | None = None) -> dict:
    """Copy the good files into the incoming set (each with the scale ``scale_model``'s predict
    chooses for it) and commit a new DVC data version."""
    return intake.ingest(report, root, dataset, batch, quarantined, scale_model)


@flow(name="wpcrack-retrain", log_prints=True)
def retrain(
    batch: str | None = None,
    dataset: str = "deepcrack",
    variant: str = "full",
    root: str = ".",
    quarantine_dir: str | None = None,
    min_side: int = 64,
    max_side: int = 10000,
    promote: bool = True,
) -> dict:
    """Ingest ``batch`` (None: retrain on the data as it is), retrain ``variant`` of ``dataset``,
    evaluate on the fixed test split and move ``champion`` to the new model if it passes the gate."""
    root_path = Path(root).resolve()
    key = run_key(root_path, dataset, variant)
    mode = load_retrain(root_path / "params.yaml").mode
    result: dict = {"dataset": dataset, "variant": variant, "batch": batch, "mode": mode}
    print(f"retrain.mode {mode}: " + ("continuing the champion's weights on old + new data" if mode == "finetune"
                                      else "training anew on old + new data"))
    with contextlib.chdir(root_path):
        report = None
        if batch:
            batch_path = Path(batch).resolve()
            report = validate_batch(str(batch_path), str(root_path), dataset, min_side, max_side)
            folder = Path(quarantine_dir or intake.quarantine_folder(root_path, dataset, batch_path))
            moved = quarantine(report, str(batch_path), str(folder))
            good, skipped = int(report["ok"].sum()), int(report["already_ingested"].sum())
            result.update(quarantined=len(moved), good=good, already_ingested=skipped, quarantine=str(folder))
            rejected = len(report) - good - skipped
            print(f"batch {batch_path}: {good} good, {rejected} rejected, {skipped} already ingested")
            if good == 0:
                if len(report) == skipped:
                    print("nothing new in the batch: no retraining")
                    return {**result, "decision": "nothing_new"}
                raise BatchRejected(f"{batch_path}: no usable image ({rejected} rejected; "
                                    f"reasons in {folder / 'report.csv'})")
            model = intake.scale_model(root_path, dataset, variant)
            result["data_version"] = ingest(report, str(root_path), dataset, str(batch_path), len(moved),
                                            str(model) if model else None)
        before = fingerprint_test_split(root_path, dataset)
        snapshot = Snapshot(root_path, champion_paths(root_path, dataset, variant))
        try:
            dvc_repro([f"prepare@{dataset}"], cwd=str(root_path))
            after = fingerprint_test_split(root_path, dataset)
            if before is not None and after != before:
                raise DataError(root_path / "data" / "prepared" / dataset / "manifest.csv",
                                "the test split changed while preparing: scores would not be comparable, "
                                "nothing promoted")
            since_ms = int(time.time() * 1000)
            dvc_repro([f"train@{key}"], cwd=str(root_path), gpu=True)
            dvc_repro([f"evaluate@{key}"], cwd=str(root_path), gpu=True)
            if has_stage(root_path, f"calibrate@{key}"):  # the new weights' crack width: predict's scale choice
                dvc_repro([f"calibrate@{key}"], cwd=str(root_path))
            data_version = result.get("data_version") or {}
            decision = promote_challenger(
                str(root_path), dataset, variant, since_ms=since_ms, stage=f"retrain@{dataset}", promote=promote,
                tags={"batch": batch or "", "data_version": data_version.get("version", ""),
                      "data_md5": data_version.get("md5", "")},
                report=report,
            )
        except BaseException:
            snapshot.restore()  # a failed challenger leaves the champion's files as they were
            raise
        if decision["decision"] in ("promoted", "already_champion", "no_new_model"):
            snapshot.discard()
        else:
            snapshot.restore()
            print(f"restored the champion's files ({', '.join(str(p.relative_to(root_path)) for p in snapshot.paths)}); "
                  f"`dvc status` shows prepare@{dataset} stale until a retraining is promoted")
    return {**result, **decision}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="validate and ingest a batch, retrain, promote if it passes the gate")
    p.add_argument("batch", nargs="?",
                   help="batch folder (crack/, no_crack/) or CSV (path,label); omit to retrain as is")
    p.add_argument("--dataset", default="deepcrack")
    p.add_argument("--variant", default="full")
    p.add_argument("--root", default=".", help="the wpcrack repository (default: .)")
    p.add_argument("--quarantine", help="folder for rejected files (default: data/quarantine/<dataset>/<batch>-<time>)")
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-side", type=int, default=10000)
    p.add_argument("--no-promote", action="store_true", help="evaluate and record, but never move the alias")
    p = sub.add_parser("restore", help="check out the incoming images of an earlier data version")
    p.add_argument("dataset")
    p.add_argument("version", type=int)
    p.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    try:
        if args.command == "restore":
            entry = restore(Path(args.root).resolve(), args.dataset, args.version)
            print(f"data/incoming/{args.dataset} is now version {entry['version']} (md5 {entry['md5']})")
        else:
            print(retrain(args.batch, args.dataset, args.variant, args.root, args.quarantine,
                          args.min_side, args.max_side, not args.no_promote))
    except WpcrackError as exc:
        print(f"retrain: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
