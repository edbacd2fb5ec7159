"""Reproduce flow: prepare -> train -> evaluate -> compare -> benchmark -> report per dataset, through DVC.

Each step is one ``dvc repro <stage>`` task, so DVC decides what is up to date and the flow adds
ordering, retries of transient failures, one GPU stage at a time (the ``gpu`` concurrency limit,
see ``pipelines.tasks``) and a record in Prefect. Runs come from ``runs:`` in params.yaml.
``compare@<dataset>`` reads every variant's results, so it runs only when no variant filter is
given (otherwise DVC would train the missing variants for it); so do the diagnoses (``tune_crf@`` and
``scale_check@<dataset>``) and the results page ``report@<dataset>``. The index ``report_index`` is
rewritten at the end. After a dataset's full model is evaluated, its newest version becomes
``champion`` unless the champion has a better test IoU.

    python -m pipelines.reproduce --datasets synthetic
    python -m pipelines.reproduce --datasets deepcrack cfd --variants full supervised
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from prefect import flow

from pipelines.tasks import dvc_repro, promote_challenger
from wpcrack.errors import ConfigError, WpcrackError
from wpcrack.evaluate.report import REAL_DATASETS


def plan(runs: dict[str, dict[str, str]], datasets: list[str] | None,
         variants: list[str] | None) -> list[tuple[str, list[str], bool]]:
    """[(dataset, run keys, compare?)] in params.yaml order; unknown names are errors."""
    known = list(dict.fromkeys(r["dataset"] for r in runs.values()))
    unknown = sorted(set(datasets or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown dataset(s) {', '.join(unknown)}; params.yaml runs: has {', '.join(known)}")
    out = []
    for dataset in datasets or known:
        keys = [k for k, r in runs.items() if r["dataset"] == dataset and (not variants or r["variant"] in variants)]
        if not keys:
            raise ConfigError(f"no run of {dataset} with variant(s) {', '.join(variants or [])} in params.yaml runs:")
        out.append((dataset, keys, not variants))
    return out


@flow(name="wpcrack-reproduce", log_prints=True)
def reproduce(
    datasets: list[str] | None = None,
    variants: list[str] | None = None,
    root: str = ".",
    benchmark: bool = True,
    promote: bool = True,
) -> dict[str, dict]:
    """Reproduce the given datasets (default: all in params.yaml ``runs:``) and variants (default: all)."""
    from wpcrack.config import list_runs

    root_path = Path(root).resolve()
    cwd = str(root_path)
    summary: dict[str, dict] = {}
    reported = False
    with contextlib.chdir(root_path):
        runs = list_runs(root_path / "params.yaml")
        for dataset, keys, compare in plan(runs, datasets, variants):
            dvc_repro([f"prepare@{dataset}"], cwd=cwd)
            for key in keys:
                dvc_repro([f"train@{key}"], cwd=cwd, gpu=True)
                dvc_repro([f"evaluate@{key}"], cwd=cwd, gpu=True)
            if compare:
                dvc_repro([f"compare@{dataset}"], cwd=cwd)
            has_full = any(runs[k]["variant"] == "full" for k in keys)
            if benchmark and has_full:
                dvc_repro([f"benchmark@{dataset}"], cwd=cwd, gpu=True)
            if compare and dataset in REAL_DATASETS:
                dvc_repro([f"tune_crf@{dataset}", f"scale_check@{dataset}"], cwd=cwd, gpu=True)
                dvc_repro([f"report@{dataset}"], cwd=cwd, single=True)
                reported = True
            summary[dataset] = {"runs": keys}
            if promote and has_full:
                summary[dataset].update(promote_challenger(cwd, dataset, "full"))
        if reported:
            dvc_repro(["report_index"], cwd=cwd, single=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", help="datasets (default: all in params.yaml runs:)")
    parser.add_argument("--variants", nargs="+", help="variants (default: all; compare then runs too)")
    parser.add_argument("--root", default=".", help="the wpcrack repository (default: .)")
    parser.add_argument("--no-benchmark", action="store_true")
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(reproduce(args.datasets, args.variants, args.root, not args.no_benchmark, not args.no_promote))
    except WpcrackError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
