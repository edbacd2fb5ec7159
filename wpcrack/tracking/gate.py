"""The promotion gate: whether a challenger becomes ``champion``, judged on the benchmark and on the team's roads.

A model retrained on a team's newly tagged photos is used on that team's roads, so the gate weighs
both: each field check set (``field.sets``, scored through predict's default path) and the
benchmark's test split (the evaluate protocol). The challenger replaces the champion when it loses
at most ``promotion.field_tolerance`` IoU points on every field set and at most
``promotion.benchmark_tolerance`` on the benchmark, and gains on at least one of them. Without field
sets the gate is what it always was: not worse on the benchmark.

``decide`` is the rule alone. ``judge`` gathers the scores (a field score is measured once per model
version and field set, then read from the version's tags while the set's files are unchanged),
moves the alias and tags the challenger's version with the decision; a rejected challenger stays
registered, so ``models:/<name>/<version>`` can still be inspected. ``promote_challenger`` (the
flows) and ``promote_champion`` (``wpcrack promote``) find the challenger and record an MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wpcrack.errors import WpcrackError
from wpcrack.tracking import runs as registry

if TYPE_CHECKING:
    import pandas as pd

    from wpcrack.config import Config, PromotionConfig

_EPS = 1e-9  # IoUs are sums of counts: a tie is a tie, not a rounding loss


@dataclass(frozen=True)
class Scores:
    """One model version's IoU (percent) on the benchmark's test split and on each field set."""

    benchmark: float | None
    field: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reasons: tuple[str, ...]


def decide(champion: Scores | None, challenger: Scores, tolerances: PromotionConfig) -> Verdict:
    """The gate's rule (module docstring); ``reasons`` says, per criterion, why."""
    if champion is None:
        return Verdict(True, ("no champion yet",))
    if champion.benchmark is None:
        return Verdict(False, ("the champion has no recorded test score, so nothing can be compared "
                               "(tag it test_iou, or `wpcrack promote --force`)",))
    if challenger.benchmark is None:
        raise WpcrackError("the challenger has no test score: evaluate it first")
    missing = sorted(set(challenger.field) - set(champion.field))
    if missing:
        raise WpcrackError(f"the champion has no score on field set(s) {', '.join(missing)}")
    delta = challenger.benchmark - champion.benchmark
    bench = f"benchmark {challenger.benchmark:.2f} vs {champion.benchmark:.2f} ({delta:+.2f})"
    if not challenger.field:
        ok = delta >= -_EPS
        return Verdict(ok, (f"{bench}: {'not worse' if ok else 'worse'} (no field sets)",))
    reasons, losses, gains = [], 0, delta > _EPS
    for name in sorted(challenger.field):
        d = challenger.field[name] - champion.field[name]
        lost = d < -tolerances.field_tolerance - _EPS
        losses += lost
        gains |= d > _EPS
        reasons.append(f"field {name} {challenger.field[name]:.2f} vs {champion.field[name]:.2f} ({d:+.2f})"
                       + (f": loses more than {tolerances.field_tolerance:g}" if lost else ""))
    lost = delta < -tolerances.benchmark_tolerance - _EPS
    losses += lost
    reasons.append(bench + (f": loses more than {tolerances.benchmark_tolerance:g}" if lost else ""))
    if not losses and not gains:
        reasons.append("no gain on any field set or the benchmark")
    return Verdict(not losses and gains, tuple(reasons))


# --- scores of registered versions ---------------------------------------------------------------


def field_tag(name: str, what: str) -> str:
    """Version tag of a field score (``iou``) and of the set's digest it was measured on (``md5``)."""
    return f"field/{name}/{what}"


def field_scores(cfg: Config, model: str, version: str, measured: dict[str, dict] | None = None) -> dict[str, float]:
    """IoU of registered ``model`` ``version`` on every field set of ``cfg``: from the version's tags
    while the set is unchanged, from ``measured`` (``wpcrack field``'s figures on these very weights),
    else scored now through predict's default path; recorded on the version either way."""
    from wpcrack.data.field import field_digest, field_photos

    c = registry.client()
    tags = c.get_model_version(model, version).tags
    scores: dict[str, float] = {}
    detector = None
    for name in cfg.field.sets:
        pairs = field_photos(cfg.paths.data, name)
        digest = field_digest(pairs)
        if tags.get(field_tag(name, "md5")) == digest:
            scores[name] = float(tags[field_tag(name, "iou")])
            continue
        known = (measured or {}).get(name)
        if known is not None and known.get("digest") == digest:
            scores[name] = float(known["iou"])
        else:
            from wpcrack.deploy.predict import load_registered
            from wpcrack.evaluate.generalise import score_files

            if detector is None:
                detector, model_cfg = load_registered(f"models:/{model}/{version}")
                model_cfg = dataclasses.replace(model_cfg, evaluate=cfg.evaluate, predict=cfg.predict)
            scores[name] = float(score_files(detector, model_cfg, pairs)["iou"])
        c.set_model_version_tag(model, version, field_tag(name, "iou"), repr(scores[name]))
        c.set_model_version_tag(model, version, field_tag(name, "md5"), digest)
    return scores


def measured_field(path: Path, weights_md5: str | None) -> dict[str, dict] | None:
    """``wpcrack field``'s per-set figures in ``path`` if they were measured on these weights."""
    if not path.is_file() or weights_md5 is None:
        return None
    figures = json.loads(path.read_text())
    return figures["sets"] if figures.get("weights_md5") == weights_md5 else None


def judge(cfg: Config, model: str, challenger: str, benchmark_iou: float, promote: bool = True,
          measured: dict[str, dict] | None = None) -> dict[str, Any]:
    """Score champion and ``challenger`` (benchmark IoU given, field sets per ``field_scores``),
    decide, move the alias if promoted and ``promote``; the decision goes on the challenger's tags."""
    c = registry.client()
    registry.record_score(model, challenger, benchmark_iou)
    current = registry.champion_version(model)
    same = current is not None and str(current.version) == str(challenger)
    theirs = ours = Scores(benchmark_iou, field_scores(cfg, model, challenger, measured))
    if current is not None and not same:
        theirs = Scores(registry.version_score(model, current.version),
                        field_scores(cfg, model, str(current.version)))
    verdict = Verdict(False, ("already the champion",)) if same else decide(
        None if current is None else theirs, ours, cfg.promotion)
    if verdict.promoted and promote:
        c.set_registered_model_alias(model, registry.CHAMPION, str(challenger))
    decision = ("already_champion" if same else "promoted" if verdict.promoted and promote
                else "passed_gate" if verdict.promoted else "kept_champion")
    c.set_model_version_tag(model, challenger, "gate_decision", decision)
    c.set_model_version_tag(model, challenger, "gate_reasons", "; ".join(verdict.reasons))
    return {
        "model": model, "decision": decision, "promoted": decision == "promoted", "reasons": list(verdict.reasons),
        "champion_version": int(current.version) if current is not None else None,
        "challenger_version": int(challenger),
        "champion_iou": theirs.benchmark if current is not None else None, "challenger_iou": benchmark_iou,
        "champion_field": theirs.field if current is not None else {}, "challenger_field": ours.field,
    }


# --- the two ways in -----------------------------------------------------------------------------


def _metric(path: Path) -> float:
    from wpcrack.errors import DataError

    if not path.is_file():
        raise DataError(path, "no evaluation metrics (did evaluate run?)")
    return float(json.loads(path.read_text())["detector"]["iou"])


def _evaluated(path: Path, weights_md5: str | None) -> bool:
    """Whether ``metrics.json`` scored the weights with this digest (evaluate writes it)."""
    if not path.is_file() or weights_md5 is None:
        return False
    return json.loads(path.read_text()).get("model", {}).get("weights_md5") == weights_md5


def record(cfg: Config, decision: dict[str, Any], stage: str, tags: dict[str, Any] | None = None,
           report: pd.DataFrame | None = None) -> str:
    """An MLflow run with the decision, every score, ``tags`` (the batch and its data version) and the
    batch's validation ``report``; the tags also go on the challenger's version. Returns the run id."""
    flat = {k: v for k, v in decision.items() if not isinstance(v, dict | list)}
    extra = {k: str(v) for k, v in (tags or {}).items()}
    if decision.get("challenger_version") is not None:
        for key, value in extra.items():
            registry.client().set_model_version_tag(decision["model"], str(decision["challenger_version"]), key, value)
    metrics = {k: decision[k] for k in ("challenger_iou", "champion_iou") if decision.get(k) is not None}
    for who in ("champion", "challenger"):
        metrics.update({f"{who}_field/{n}": v for n, v in (decision.get(f"{who}_field") or {}).items()})
    with registry.start_run(cfg, stage, tags={**{k: str(v) for k, v in flat.items()}, **extra,
                                              "reasons": "; ".join(decision.get("reasons", []))}) as run:
        run.log_metrics(metrics)
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                report.to_csv(Path(tmp) / "validation_report.csv", index=False)
                run.log_artifact(Path(tmp) / "validation_report.csv", artifact_path="batch")
        return run.run_id


def promote_challenger(root: str | Path, dataset: str, variant: str = "full", since_ms: int | None = None,
                       stage: str | None = None, promote: bool = True, tags: dict[str, Any] | None = None,
                       report: pd.DataFrame | None = None) -> dict[str, Any]:
    """The flows' gate: the newest registered version of the run (registered after ``since_ms``, if
    given) against the champion, on ``results/<dataset>/<variant>/metrics.json`` (which must have been
    measured on that version's weights) and the field sets; recorded in an MLflow run."""
    from wpcrack.config import load_config

    root = Path(root)
    cfg = load_config(root / "params.yaml", dataset=dataset, variant=variant)
    cfg = _rooted(cfg, root)
    name = registry.model_name(cfg.tracking.model_name_prefix, dataset)
    challenger = registry.latest_version(name, variant)
    results = Path(cfg.paths.results) / dataset / variant
    if challenger is None or (since_ms is not None and challenger.creation_timestamp < since_ms):
        decision = {"model": name, "decision": "no_new_model", "promoted": False,
                    "reasons": ["no new model version (training up to date, or tracking.log_models is off)"]}
    elif not _evaluated(results / "metrics.json", digest := challenger.tags.get(registry.WEIGHTS_TAG)):
        decision = {"model": name, "decision": "metrics_not_of_challenger", "promoted": False,
                    "challenger_version": int(challenger.version),
                    "reasons": [f"{results / 'metrics.json'} was not measured on v{challenger.version} (weights "
                                "digest differs): run `dvc repro evaluate@<run>` for this model first"]}
    else:
        from wpcrack.evaluate.field import field_path

        measured = measured_field(field_path(cfg.paths.results, dataset, variant), digest)
        decision = judge(cfg, name, str(challenger.version), _metric(results / "metrics.json"), promote, measured)
    print(f"{name}: " + "; ".join(decision["reasons"]) + f" -> {decision['decision']}")
    decision["mlflow_run_id"] = record(cfg, decision, stage or f"promote@{dataset}", tags, report)
    return decision


def promote_champion(cfg: Config, version: str | None = None) -> dict[str, Any]:
    """``wpcrack promote``: ``version`` (default: the best-scoring evaluated version of the full
    variant) through the gate against the champion."""
    name = registry.model_name(cfg.tracking.model_name_prefix, cfg.dataset)
    c = registry.client()
    if version is None:
        scored = [(registry.version_score(name, v.version), v.version)
                  for v in c.search_model_versions(f"name = '{name}'") if v.tags.get("variant", "full") == "full"]
        scored = [(s, v) for s, v in scored if s is not None]
        if not scored:
            raise WpcrackError(f"model {name} has no evaluated version of the full variant to promote")
        version = max(scored, key=lambda sv: (sv[0], int(sv[1])))[1]
    score = registry.version_score(name, version)
    if score is None:
        raise WpcrackError(f"{name} version {version} has no test iou: evaluate it first")
    decision = judge(cfg, name, str(version), score)
    decision["mlflow_run_id"] = record(cfg, decision, f"promote@{cfg.dataset}")
    return decision


def _rooted(cfg: Config, root: Path) -> Config:
    """``cfg`` with its relative paths read from ``root`` (the flows pass the repository)."""
    paths = {k: str(root / v) if not Path(v).is_absolute() else v for k, v in vars(cfg.paths).items()}
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, **paths))
