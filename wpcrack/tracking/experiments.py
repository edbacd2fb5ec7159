"""``wpcrack experiments``: what was tried on a dataset and what each try gave, from MLflow.

Tuning (``dvc exp run -S ...``, ``dvc repro`` after editing params.yaml, a retraining) leaves one
MLflow train run per try, failed ones included. This writes them as one Markdown table so the
record of what worked and what did not is generated, never typed: a row per train run with the
parameters that differ between the listed runs, the monitoring diagnostics (pseudo-label IoU against
the training masks, detector IoU against the val masks: never used for selection) and the test
metrics of the evaluation that followed it (the first evaluate run of the same stage key that
started after the train run ended and before the next train run of that key).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from wpcrack.errors import WpcrackError
from wpcrack.evaluate.tables import to_markdown
from wpcrack.io import atomic_path

# Parameters that describe where or how fast a run went, not what it learnt.
IGNORED_PARAMS = ("paths.", "tracking.", "dist.", "pseudo_labels.workers", "train.num_workers", "train.amp",
                  "train.channels_last", "evaluate.", "benchmark.")


def _history(client, run_id: str, metric: str) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, metric)]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _changed_from(train: pd.DataFrame, columns: list[str], params_file: Path, dataset: str) -> set[str]:
    """Columns where a run's value is not what ``params_file`` now gives its variant (a lone try shows
    what it changed)."""
    from wpcrack.config import load_config
    from wpcrack.errors import WpcrackError
    from wpcrack.tracking.runs import flatten

    changed: set[str] = set()
    for variant in train.get("params.variant", pd.Series(dtype=str)).dropna().unique():
        try:
            now = {f"params.{k}": str(v) for k, v in flatten(load_config(params_file, dataset, variant).to_dict()).items()}
        except WpcrackError:
            continue  # a variant since removed from params.yaml: nothing to compare with
        runs = train[train["params.variant"] == variant]
        changed.update(c for c in columns if (runs[c].notna() & (runs[c].astype(str) != now.get(c, "nan"))).any())
    return changed


def experiment_rows(dataset: str, experiment: str = "wpcrack", params_file: Path | None = None) -> pd.DataFrame:
    """One row per train run of ``dataset`` (oldest first); empty when there is none.

    Shown parameters: those that differ between the rows and, with ``params_file``, those where a row
    differs from what that file now sets.
    """
    from wpcrack.tracking.runs import client, search_runs

    runs = search_runs(experiment, dataset=dataset)
    if runs.empty or "tags.stage" not in runs:
        return pd.DataFrame()
    runs = runs.sort_values("start_time")
    stages = runs["tags.stage"].fillna("")
    train = runs[stages.str.startswith("train@")]
    evaluate = runs[stages.str.startswith("evaluate@")]
    if train.empty:
        return pd.DataFrame()

    from wpcrack.config import DATASET_NAMES

    # another dataset's preparation settings say nothing about this dataset's runs
    others = tuple(f"prepare.{name}." for name in DATASET_NAMES if name != dataset)
    params = [c for c in train.columns if c.startswith("params.")
              and not c.removeprefix("params.").startswith(IGNORED_PARAMS + others)]
    changed = _changed_from(train, params, params_file, dataset) if params_file is not None else set()
    varying = sorted(c for c in params if train[c].astype(str).nunique(dropna=False) > 1 or c in changed)
    mlflow_client = client()
    rows = []
    for i, (_, run) in enumerate(train.iterrows()):
        key = run["tags.stage"].removeprefix("train@")
        val_scores = _history(mlflow_client, run["run_id"], "val_score")
        later = train.iloc[i + 1:]
        next_start = later.loc[later["tags.stage"] == run["tags.stage"], "start_time"].min()
        ended = run["end_time"] if pd.notna(run["end_time"]) else run["start_time"]
        found = evaluate[(evaluate["tags.stage"] == f"evaluate@{key}") & (evaluate["start_time"] >= ended)]
        if pd.notna(next_start):
            found = found[found["start_time"] < next_start]
        test = found.iloc[0] if len(found) else None
        minutes = (ended - run["start_time"]).total_seconds() / 60.0
        rows.append({
            "started (UTC)": run["start_time"].strftime("%Y-%m-%d %H:%M"),
            "run": key,
            "commit": str(run.get("tags.git_commit", ""))[:7],
            "status": run["status"],
            **{c.removeprefix("params."): run[c] for c in varying},
            "epochs done": len(val_scores),
            "minutes": f"{minutes:.1f}",
            "pseudo-label IoU (last)": _number(run.get("metrics.pseudo_label_iou")),
            "best val score": max(val_scores, default=math.nan),
            "val det IoU (best)": max(_history(mlflow_client, run["run_id"], "val_diag_det_iou"), default=math.nan),
            **{f"test {m}": (_number(test.get(f"metrics.detector/{m}")) if test is not None else math.nan)
               for m in ("precision", "recall", "iou")},
            "test ODS F1": _number(test.get("metrics.detector/extra_ods_f1")) if test is not None else math.nan,
        })
    return pd.DataFrame(rows)


def write_experiments(datasets: list[str], pages_dir: Path, index: Path, experiment: str = "wpcrack",
                      params_file: Path | None = None) -> Path:
    """The page of this MLflow store (``MLFLOW_TRACKING_URI`` or mlflow.db) and the index of all pages.

    The page is ``<pages_dir>/<YYYY-MM-DD-HHMM of the store's first training, UTC>.md``: a lasting
    tracking server keeps rewriting one page, while a machine that starts with an empty store (even on
    the same day) adds a page and leaves the pages of earlier stores as they were generated (the index
    lists them all).
    """
    frames = {dataset: experiment_rows(dataset, experiment, params_file) for dataset in datasets}
    starts = [d for df in frames.values() if not df.empty for d in df["started (UTC)"]]
    if not starts:
        from wpcrack.tracking.runs import tracking_uri

        raise WpcrackError(f"the MLflow store {tracking_uri()} holds no training run of {', '.join(datasets)}; "
                           "nothing to write")
    page = pages_dir / f"{min(starts).replace(' ', '-').replace(':', '')}.md"
    parts = [
        f"# Experiments of the tracking store started {page.stem}\n",
        "Generated by `wpcrack experiments` from the MLflow train and evaluate runs; do not edit by hand. "
        "One row per training, oldest first, with the parameters that differ between the rows or from "
        "the current params.yaml. "
        "Pseudo-label IoU (CRF labels vs training masks) and val det IoU (detector vs val masks) are "
        "monitoring only; model selection uses `best val score` (image-level labels only). Test columns "
        "are percent (design.md section 1); IoUs of the diagnostics are fractions.\n",
    ]
    for dataset, df in frames.items():
        parts.append(f"\n## {dataset}\n")
        parts.append("_no training runs recorded_\n" if df.empty else to_markdown(df))
    pages_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(page) as tmp:
        tmp.write_text("\n".join(parts))
    links = [f"- [{p.stem}]({Path(os.path.relpath(p, index.parent)).as_posix()})"
             for p in sorted(pages_dir.glob("*.md"), key=lambda p: p.stem, reverse=True)]
    with atomic_path(index) as tmp:
        tmp.write_text("\n".join([
            "# Experiments\n",
            "Generated by `wpcrack experiments`; do not edit by hand. What was tried and what each try gave, "
            "one page per MLflow tracking store, named after the store's first training (UTC, newest "
            "first):\n",
            "\n".join(links) + "\n",
        ]))
    return page
