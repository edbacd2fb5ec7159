"""The compare stage: ablation (paper Table 1) and comparison (Tables 2-4) tables for one dataset.

Source of truth: the DVC metrics files `results/<dataset>/<variant>/metrics.json` written by the
evaluate stage (the same numbers MLflow holds). Our numbers and the paper's published numbers are
kept in separate, labelled columns. A run's metrics count only while its model is the one
params.yaml would train now (``Results``): tables regenerated across several sittings, or after a
training change that not every run has caught up with, never mix settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wpcrack.config import list_runs, load_config, split_seed
from wpcrack.evaluate import paper
from wpcrack.io import atomic_path

# Table 1 rows: variant -> (Rec.E features, CECCM, PAAM); Cls and Det are always used.
ABLATION_ROWS = {
    "cls_det": (False, False, False),
    "rec": (True, False, False),
    "rec_ceccm": (True, True, False),
    "full": (True, True, True),
}


@dataclass(frozen=True)
class ComparisonRow:
    method: str
    variant: str
    mode: str
    paper_method: str | None


CLASSICAL = "classical"  # results/<dataset>/classical (wpcrack classical): no training run, always listed

COMPARISON_ROWS = (
    ComparisonRow("WP-CrackNet (ours)", "full", "detector", "WP-CrackNet"),
    ComparisonRow("Classical: dark lines by adaptive threshold (no training; 3 parameters chosen on masks)",
                  CLASSICAL, CLASSICAL, None),
    ComparisonRow("CAM + threshold (WS-SCS idea)", "cls_only", "cam", "WS-SCS"),
    ComparisonRow("CAM + denseCRF, no detector", "cls_only", "cam_crf", None),
    ComparisonRow("WP-CrackNet CAM + denseCRF (its pseudo labels)", "full", "cam_crf", None),
    ComparisonRow("No adversarial training", "no_adversarial", "detector", None),
    ComparisonRow("Supervised upper bound (same detector, pixel masks)", "supervised", "detector", None),
)

SPLIT_NOTES = {
    "crack500": "CRACK500: our own test split carved by source photo from the 1,896 official training "
    "crops; it is NOT the paper's official test set, so the paper's numbers are not directly comparable.",
    "synthetic": "Synthetic data (smoke profile): checks the pipeline, not the method; no paper numbers.",
    "cfd": "CFD: our seeded 70/48 split (the paper publishes no list).",
    "deepcrack": "DeepCrack: the official 300/237 split, scored at 256x256 as in the paper.",
}


def read_metrics(results_dir: Path, dataset: str, variant: str) -> dict | None:
    path = results_dir / dataset / variant / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@dataclass
class Results:
    """The evaluated runs of one dataset that count.

    With ``params``, a model's metrics are read only when the configuration fingerprint that evaluate
    recorded (``model.config_sha256``, from the checkpoint's own config) equals the one params.yaml
    resolves for the run now; the others are listed in ``stale`` and read as not evaluated. The
    classical baseline has no model and always counts. ``params`` None reads every file (tests).
    """

    results_dir: Path
    dataset: str
    params: Path | None = None
    stale: list[str] = field(default_factory=list)
    _expected: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def expected_fingerprint(self, variant: str) -> str:
        """The fingerprint params.yaml resolves for ``variant`` now (resolved once per variant)."""
        if variant not in self._expected:
            from wpcrack.train.checkpoint import config_fingerprint

            cfg = load_config(self.params, dataset=self.dataset, variant=variant)
            self._expected[variant] = config_fingerprint(cfg.to_dict())
        return self._expected[variant]

    def get(self, variant: str) -> dict | None:
        metrics = read_metrics(self.results_dir, self.dataset, variant)
        if metrics is None or self.params is None or variant == CLASSICAL:
            return metrics
        if (metrics.get("model") or {}).get("config_sha256") == self.expected_fingerprint(variant):
            return metrics
        if variant not in self.stale:
            self.stale.append(variant)
        return None

    def stale_note(self) -> str:
        """A sentence naming the runs left out, or ''."""
        if not self.stale:
            return ""
        runs = ", ".join(f"`{self.dataset}-{v}`" if v != "full" else f"`{self.dataset}`" for v in sorted(self.stale))
        return (f"Left out as not yet retrained with the current params.yaml (their models were trained with "
                f"another configuration; `dvc repro evaluate@<run>` retrains and scores them): {runs}.")


def _ours(metrics: dict | None, mode: str) -> dict[str, float | None]:
    values = (metrics or {}).get(mode) or {}
    return {f"ours_{k}": values.get(k) for k in paper.PRIMARY}


def _paper(values: tuple[float, ...] | None) -> dict[str, float | None]:
    return {f"paper_{k}": (values[i] if values else None) for i, k in enumerate(paper.PRIMARY)}


def _seed_runs(variant: str, variants: set[str]) -> list[str]:
    """The variant and its repeats with other seeds (``<variant>-seed<N>``) defined for the dataset."""
    repeats = sorted((seed, v) for v in variants for base, seed in [split_seed(v)] if base == variant and seed is not None)
    return [variant, *(v for _, v in repeats)]


def ablation_table(results: Results, variants: set[str]) -> pd.DataFrame:
    """Table 1; with repeats (``<variant>-seed<N>`` runs) ``ours_*`` are the means over the evaluated
    seeds, ``ours_iou_sd`` the sample standard deviation of their IoU."""
    rows = []
    for variant, (rec, ceccm, paam) in ABLATION_ROWS.items():
        if variant not in variants:
            continue
        published = paper.ABLATION_DEEPCRACK.get(variant) if results.dataset == "deepcrack" else None
        runs = _seed_runs(variant, variants)
        scored = [m for m in (results.get(v) for v in runs) if m and m.get("detector")]
        ours = pd.DataFrame([_ours(m, "detector") for m in scored], columns=list(_ours(None, "detector")))
        mean = {k: (None if ours[k].isna().all() else float(ours[k].mean())) for k in ours.columns}
        sd = float(ours["ours_iou"].std(ddof=1)) if len(scored) > 1 else None
        rows.append({
            "variant": variant, "Rec.E": rec, "CECCM": ceccm, "PAAM": paam, **mean,
            "ours_iou_sd": sd, "seeds": f"{len(scored)} of {len(runs)}", **_paper(published),
        })
    return pd.DataFrame(rows)


def comparison_table(results: Results, variants: set[str]) -> pd.DataFrame:
    published = paper.COMPARISON.get(results.dataset, {})
    rows = []
    for row in COMPARISON_ROWS:
        if row.variant not in variants | {CLASSICAL}:
            continue
        paper_values = published[row.paper_method][1] if row.paper_method in published else None
        rows.append({
            "method": row.method, "variant": row.variant, "mode": row.mode,
            **_ours(results.get(row.variant), row.mode),
            "paper_method": row.paper_method or "", **_paper(paper_values),
        })
    return pd.DataFrame(rows)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A plain pipe table (no tabulate dependency); metrics in percent with three decimals."""
    if df.empty:
        return "_no runs of this kind are defined for this dataset in params.yaml_\n"
    header = "| " + " | ".join(df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.astype(object).itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def paper_table(dataset: str) -> str:
    published = paper.COMPARISON.get(dataset)
    if not published:
        return ""
    df = pd.DataFrame(
        [{"method": m, "group": g, **dict(zip(paper.PRIMARY, v))} for m, (g, v) in published.items()]
    )
    return to_markdown(df)


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def compare(params: Path, dataset: str) -> dict[str, Path]:
    """Write reports/<dataset>/{ablation,comparison}.{md,csv} and log them to MLflow."""
    cfg = load_config(params, dataset=dataset)
    variants = {r["variant"] for r in list_runs(params).values() if r["dataset"] == dataset}
    results = Results(Path(cfg.paths.results), dataset, params)
    out = Path(cfg.paths.reports) / dataset
    note = SPLIT_NOTES.get(dataset, "")
    ablation = ablation_table(results, variants)
    comparison = comparison_table(results, variants)
    stale = f"\n\n{results.stale_note()}" if results.stale else ""
    files = {
        "ablation.csv": ablation.to_csv(index=False),
        "comparison.csv": comparison.to_csv(index=False),
        "ablation.md": (
            f"# Ablation on {dataset} (paper Table 1)\n\n{note}\n\n"
            "Metrics in percent (design.md section 1: counts summed over the test set, threshold 0.5). "
            "`ours_*` come from `results/<dataset>/<variant>/metrics.json`, averaged with the variant's "
            "repeats with other seeds (`<variant>-seed<N>` in params.yaml `runs`) that are evaluated: `seeds` "
            "says how many of those defined, `ours_iou_sd` is the IoU's sample standard deviation over them. "
            "`paper_*` are the published numbers (DeepCrack only, one run). A row of dashes has no evaluation "
            f"of the current configuration yet: `dvc repro evaluate@{dataset}-<variant>` trains and scores "
            f"it.{stale}\n\n" + to_markdown(ablation)
        ),
        "comparison.md": (
            f"# Comparison on {dataset} (paper Tables 2-4)\n\n{note}\n\n"
            "Baselines are trained by the same pipeline. `paper_*` columns hold the paper's published "
            f"numbers for the matching method, where one exists.{stale}\n\n" + to_markdown(comparison)
            + (f"\n## The paper's published table for {dataset}\n\n" + paper_table(dataset) if paper_table(dataset) else "")
        ),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = out / name
        _write(paths[name], text)
    _log(cfg, dataset, paths)
    return paths


def _log(cfg, dataset: str, paths: dict[str, Path]) -> None:
    from wpcrack.tracking.runs import start_run

    with start_run(cfg, stage=f"compare@{dataset}") as tracker:
        for path in paths.values():
            tracker.log_artifact(path, artifact_path="tables")
