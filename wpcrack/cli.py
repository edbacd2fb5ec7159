"""The ``wpcrack`` command: one subcommand per DVC stage, plus score and predict.

Heavy libraries (torch, mlflow, cv2) are imported inside each subcommand so that
``wpcrack --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from wpcrack.errors import ConfigError, WpcrackError

MIRROR_ENV = "WPCRACK_MIRROR"
NPROC_ENV = "WPCRACK_NPROC"  # `wpcrack train` with N > 1 re-launches itself under torchrun (N processes)


def _config(args: argparse.Namespace, dataset: str | None, variant: str = "full"):
    from wpcrack.config import load_config

    return load_config(args.params, dataset=dataset, variant=variant, overrides=args.set or [])


def _run_dirs(cfg, dataset: str, variant: str) -> tuple[Path, Path]:
    """Fixed output folders (DVC needs stable paths): models/<ds>/<variant>, results/<ds>/<variant>."""
    return Path(cfg.paths.models) / dataset / variant, Path(cfg.paths.results) / dataset / variant


def cmd_download(args: argparse.Namespace) -> None:
    from wpcrack.data.sources import DATASETS, download

    mirror = args.mirror or os.environ.get(MIRROR_ENV) or None
    names = args.datasets or list(DATASETS)
    download(names, raw_dir=Path(args.data_dir) / "raw", mirror=Path(mirror) if mirror else None, force=args.force)


def cmd_prepare(args: argparse.Namespace) -> None:
    cfg = _config(args, args.dataset)
    from wpcrack.data.prepare import prepare

    prepare(cfg, args.dataset)


def cmd_survey_photo(args: argparse.Namespace) -> None:
    from wpcrack.data.synthetic import write_survey_photo

    write_survey_photo(Path(args.out), args.seed, args.height, args.width)


def cmd_train(args: argparse.Namespace) -> None:
    from wpcrack.config import load_retrain
    from wpcrack.train import continuation
    from wpcrack.train.loop import train

    cfg = _config(args, args.dataset, args.variant)
    retrain = load_retrain(args.params, args.set or [])
    model_dir, _ = _run_dirs(cfg, args.dataset, args.variant)
    out_dir = Path(args.out) if args.out else model_dir
    start = None
    if retrain.mode == "finetune":
        cfg, start = continuation.finetune_config(cfg, retrain), continuation.take_start(out_dir)
        print(f"retrain.mode finetune: continuing {start} for {retrain.epochs} epoch(s) at "
              f"{retrain.lr_scale} x the learning rates", flush=True)
    train(cfg, out_dir=out_dir, resume=args.resume, start=start)


def torchrun_command(nproc: str, argv: list[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node=NPROC -m wpcrack ARGV`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "wpcrack", *argv]


def _nproc_from_env() -> str | None:
    """``$WPCRACK_NPROC`` when it asks for several processes and this is not already one of them:
    an integer > 1, or ``gpu`` (one per visible GPU)."""
    from wpcrack.errors import ConfigError

    value = os.environ.get(NPROC_ENV, "").strip().lower()
    if not value or "WORLD_SIZE" in os.environ:  # unset, or already started by torchrun
        return None
    if value == "gpu":
        return value
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"${NPROC_ENV}={value!r}: expected a number of processes or 'gpu'") from None
    if n < 1:
        raise ConfigError(f"${NPROC_ENV}={value!r}: expected a number of processes >= 1 or 'gpu'")
    return str(n) if n > 1 else None


def cmd_evaluate(args: argparse.Namespace) -> None:
    cfg = _config(args, args.dataset, args.variant)
    from wpcrack.evaluate.run import evaluate

    model_dir, results_dir = _run_dirs(cfg, args.dataset, args.variant)
    evaluate(
        cfg,
        model_dir=Path(args.model_dir) if args.model_dir else model_dir,
        out_dir=Path(args.out) if args.out else results_dir,
    )


def cmd_classical(args: argparse.Namespace) -> None:
    cfg = _config(args, args.dataset)
    from wpcrack.evaluate.classical import VARIANT, run

    run(cfg, Path(args.out) if args.out else Path(cfg.paths.results) / args.dataset / VARIANT)


def cmd_score(args: argparse.Namespace) -> None:
    from wpcrack.evaluate.score import score_folders

    score_folders(Path(args.pred), Path(args.gt), size=args.size, threshold=args.threshold, as_json=args.json)


def cmd_compare(args: argparse.Namespace) -> None:
    from wpcrack.evaluate.tables import compare

    compare(Path(args.params), args.dataset)


def cmd_benchmark(args: argparse.Namespace) -> None:
    cfg = _config(args, args.dataset, args.variant)
    from wpcrack.diagnostics.benchmark import benchmark

    model_dir, _ = _run_dirs(cfg, args.dataset, args.variant)
    benchmark(cfg, model_dir=Path(args.model_dir) if args.model_dir else model_dir,
              out_dir=Path(cfg.paths.reports) / "benchmark")


def cmd_export(args: argparse.Namespace) -> None:
    cfg = _config(args, args.dataset, args.variant)
    from wpcrack.deploy.export import export

    model_dir, _ = _run_dirs(cfg, args.dataset, args.variant)
    export(cfg, Path(args.model_dir) if args.model_dir else model_dir, Path(args.onnx), args.check_images)


def cmd_predict(args: argparse.Namespace) -> None:
    from wpcrack.deploy.predict import predict

    predict(
        [Path(p) for p in args.inputs],
        model=args.model,
        out_dir=Path(args.out),
        dataset=args.dataset,
        mm_per_pixel=args.mm_per_pixel,
        params=Path(args.params),
        gate=args.gate,
        scales=args.scale,
        flip=args.flip,
    )


def cmd_generalise(args: argparse.Namespace) -> None:
    from wpcrack.evaluate.generalise import score_model, table

    if not args.models and not args.table:
        raise ConfigError("wpcrack generalise: name the model(s) to score, or --table to gather the scores")
    wrong = [text for text in args.set or () if not text.startswith("predict.")]
    if wrong:
        raise ConfigError(f"wpcrack generalise --set {wrong[0]}: only predict.KEY=VALUE settings are tried here")
    if args.set and args.split != "val":
        raise ConfigError("wpcrack generalise --set: predict settings are tried on --split val only (never on test)")
    if args.table and args.split != "test":
        raise ConfigError("wpcrack generalise --table gathers the test scores (--split test)")
    for model in args.models:
        score_model(args.params, model, args.limit, args.split, tuple(args.set or ()))
    if args.table:
        table(args.params, Path(args.out))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from wpcrack.deploy.calibrate import calibrate
    from wpcrack.tracking.runs import tag_crack_width

    cfg = _config(args, args.dataset, args.variant)
    model_dir, _ = _run_dirs(cfg, args.dataset, args.variant)
    result = calibrate(cfg, model_dir, args.rows)
    tagged = tag_crack_width(cfg, result)
    print(f"wpcrack calibrate {args.dataset}: crack width {result['crack_width_px']:.2f} px of the training rows ("
          + ", ".join(f"{s} {v['median_px']:.2f} on {v['rows']}" for s, v in result["by_source"].items())
          + f"; {result['seconds']:.0f} s) -> {model_dir / 'scale.json'}"
          + (f"; registered version(s) {', '.join(tagged)} tagged" if tagged else ""))


def cmd_field(args: argparse.Namespace) -> None:
    from wpcrack.evaluate.field import score_field

    score_field(args.params, args.dataset, args.variant, args.model, Path(args.out) if args.out else None)


def cmd_intake(args: argparse.Namespace) -> None:
    from wpcrack.intake import intake, scale_model

    model = args.scale_model or (None if args.check else scale_model(args.root, args.dataset, args.variant))
    result = intake(args.batch, args.root, args.dataset, args.quarantine, args.min_side, args.max_side, args.check,
                    model)
    report = result["report"]
    for row in report[~report["ok"] & ~report["already_ingested"]].itertuples() if len(report) else ():
        print(f"  rejected {row.path}: {row.reason}")
    version = result["data_version"]
    print(f"wpcrack intake {args.batch}: {result['good']} good, {result['rejected']} rejected, "
          f"{result['already_ingested']} already ingested"
          + (" (checked only: nothing moved)" if args.check else
             f"; {result['quarantined']} moved to {result['quarantine']}" if result["quarantined"] else "")
          + (f"; data/incoming/{args.dataset} is now version {version['version']} (+{version['added']}, "
             f"md5 {version['md5']})" if version else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from wpcrack.evaluate.report import REAL_DATASETS, check_dataset, write_dataset_report, write_index

    pages_dir = Path(args.pages)
    datasets = args.datasets if (args.datasets or args.index) else list(REAL_DATASETS)
    for dataset in datasets:
        check_dataset(dataset)
    for dataset in datasets:
        print(f"{dataset}: {write_dataset_report(Path(args.params), dataset, pages_dir)}")
    if args.index or not args.datasets:
        from wpcrack.config import load_config

        survey = Path(load_config(args.params).paths.reports) / "benchmark" / "survey.json"
        print(f"index: {write_index(pages_dir, Path(args.out), survey)}")


def cmd_experiments(args: argparse.Namespace) -> None:
    from wpcrack.config import DATASET_NAMES
    from wpcrack.evaluate.report import REAL_DATASETS
    from wpcrack.tracking.experiments import write_experiments

    datasets = args.datasets or list(REAL_DATASETS)
    unknown = [d for d in datasets if d not in DATASET_NAMES]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {', '.join(unknown)}; expected {', '.join(DATASET_NAMES)}")
    out = write_experiments(datasets, Path(args.pages), Path(args.out), params_file=Path(args.params))
    print(f"wpcrack experiments: {', '.join(datasets)} -> {out}")


def cmd_tune_crf(args: argparse.Namespace) -> None:
    from wpcrack.diagnostics.crf_tuning import parse_grid, tune, write

    cfg = _config(args, args.dataset, args.variant)
    model_dir, _ = _run_dirs(cfg, args.dataset, args.variant)
    model_dir = Path(args.model_dir) if args.model_dir else model_dir
    crop = args.crop if args.crop is not None else (cfg.train.crop_size if args.split == "train" else None)
    frame = tune(cfg, model_dir, parse_grid(args.grid), split=args.split, crop=crop or None, limit=args.limit,
                 workers=args.workers if args.workers is not None else max(cfg.pseudo_labels.workers, 1))
    out = Path(args.out) if args.out else Path(cfg.paths.reports) / args.dataset / "crf_tuning.md"
    write(frame, cfg, model_dir, out)
    print(frame.head(args.show)[["setting", "IoU", "precision", "recall", "non-empty"]].to_string(index=False))
    print(f"wpcrack tune-crf: {len(frame)} rows -> {out} (and .csv)")


def cmd_scale_check(args: argparse.Namespace) -> None:
    from wpcrack.diagnostics.scale_check import check, write

    cfg = _config(args, args.dataset, args.variant)
    model_dir, _ = _run_dirs(cfg, args.dataset, args.variant)
    model_dir = Path(args.model_dir) if args.model_dir else model_dir
    frame = check(cfg, model_dir, split=args.split, limit=args.limit, factor=args.factor)
    out = Path(args.out) if args.out else Path(cfg.paths.reports) / args.dataset / "scale_check.md"
    write(frame, cfg, model_dir, out)
    print(frame.to_string(index=False))
    print(f"wpcrack scale-check: -> {out} (and .csv)")


def cmd_promote(args: argparse.Namespace) -> None:
    from wpcrack.tracking.runs import CHAMPION, client, model_name

    cfg = _config(args, args.dataset)
    name = model_name(cfg.tracking.model_name_prefix, args.dataset)
    if args.force:
        if args.version is None:
            raise ConfigError("--force needs --version (the version to point champion at, e.g. for a rollback)")
        client().set_registered_model_alias(name, CHAMPION, str(args.version))
        print(f"wpcrack promote: {name}@{CHAMPION} -> version {args.version} (forced)")
        return
    from wpcrack.tracking.gate import promote_champion

    decision = promote_champion(cfg, args.version)
    print(f"wpcrack promote: {name} v{decision['challenger_version']}: " + "; ".join(decision["reasons"])
          + f" -> {decision['decision']}")


def _dataset_arg(p: argparse.ArgumentParser, **kw) -> None:
    from wpcrack.config import DATASET_NAMES

    p.add_argument("dataset", choices=DATASET_NAMES, help="dataset name", **kw)


def _model_args(p: argparse.ArgumentParser, whose: str = "variant from params.yaml") -> None:
    """``--variant`` and ``--model-dir``: which trained model a command reads."""
    p.add_argument("--variant", default="full", help=f"{whose} (default: full)")
    p.add_argument("--model-dir", help="trained model folder (default: models/<dataset>/<variant>)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a parameter for this run (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wpcrack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch datasets (or copy from a mirror) into data/raw")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help="datasets to fetch (default: all)")
    p.add_argument("--mirror", help=f"folder holding the source archives (default: ${MIRROR_ENV})")
    p.add_argument("--data-dir", default="data", help="data root (default: data)")
    p.add_argument("--force", action="store_true", help="fetch and unpack again")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prepare", help="build data/prepared/<dataset> with images, masks and a manifest")
    _dataset_arg(p)
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("survey-photo", help="generate a large synthetic road photo (and its true crack mask) "
                                            "at the synthetic training images' pixel scale, to try predict on")
    p.add_argument("out", help="photo to write (.jpg or .png); the mask goes beside it as <stem>_truth.png")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.add_argument("--height", type=int, default=2400, help="height in px (default: 2400)")
    p.add_argument("--width", type=int, default=3200, help="width in px (default: 3200)")
    p.set_defaults(func=cmd_survey_photo)

    p = sub.add_parser("train", help="train WP-CrackNet (or a variant) on a prepared dataset")
    _dataset_arg(p)
    p.add_argument("--variant", default="full", help="variant from params.yaml (default: full)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                        help="continue from checkpoint.pt or fail saying why (default: continue it when its "
                             "config, data and code match, else start over)")
    resume.add_argument("--fresh", dest="resume", action="store_const", const=False,
                        help="start over even if an unfinished checkpoint.pt of the same run is there")
    p.add_argument("--out", help="output folder (default: models/<dataset>/<variant>)")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a trained model on the test split")
    _dataset_arg(p)
    _model_args(p)
    p.add_argument("--out", help="output folder (default: results/<dataset>/<variant>)")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("classical", help="the image-processing baseline: dark-line threshold chosen on val masks, "
                       "scored on test")
    _dataset_arg(p)
    p.add_argument("--out", help="output folder (default: results/<dataset>/classical)")
    _common(p)
    p.set_defaults(func=cmd_classical)

    p = sub.add_parser("score", help="score a folder of predicted masks against ground truth")
    p.add_argument("--pred", required=True, help="folder of predicted masks (PNG)")
    p.add_argument("--gt", required=True, help="folder of ground-truth masks (PNG)")
    p.add_argument("--size", type=int, help="score at SIZE x SIZE: ground truth resized nearest-neighbour, predictions bilinear")
    p.add_argument("--threshold", type=float, default=0.5, help="binarisation threshold (default: 0.5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("compare", help="write the ablation and comparison tables for a dataset")
    _dataset_arg(p)
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("benchmark", help="measure parameters, latency, throughput and memory")
    _dataset_arg(p)
    _model_args(p)
    _common(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("export", help="export the slim detector to ONNX and check it against torch")
    _dataset_arg(p)
    _model_args(p)
    p.add_argument("--onnx", required=True, metavar="PATH", help="ONNX file to write (check report: PATH.json)")
    p.add_argument("--check-images", type=int, default=8, metavar="N",
                   help="test images on which to compare ONNX Runtime with torch (default: 8; 0: no check)")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="detect cracks on your own images or large survey photos")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images or folders")
    p.add_argument("--model", default="champion",
                   help="'champion' (MLflow alias), a models:/ URI, a model folder/checkpoint, or a .onnx export")
    p.add_argument("--dataset", default="deepcrack", help="registered model to use with 'champion'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mm-per-pixel", type=float, help="ground sampling distance for mm statistics")
    p.add_argument("--gate", type=float, nargs="?", const=0.5, default=0.0, metavar="P",
                   help="skip tiles whose classifier crack probability is below P (default: off; "
                        "--gate alone: 0.5). Faster on large photos of familiar imagery")
    p.add_argument("--scale", type=float, nargs="+", default=None, metavar="S",
                   help="resize the image by S before inference, e.g. 0.25 when cracks are 4x wider in pixels "
                        "than in the training images; several scales are averaged (default: chosen per image "
                        "from the model's own evidence, written to predictions.csv; settings: predict in --params)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average the image's four flips, four passes (default: evaluate.flip of --params, "
                        "else of the model)")
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generalise", help="score the full models on every test split through predict's default "
                                          "path (scale chosen per photo), and DeepCrack's photos enlarged 2x-8x")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="full models to score (deepcrack, cfd, crack500, roads): results/<model>/full/generalise.json")
    p.add_argument("--table", action="store_true",
                   help="gather the scored models into <out>.json and <out>.md (absent models stay empty)")
    p.add_argument("--out", default="docs/results/generalisation", help="table's output stem (default: %(default)s)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="val: the photos of the val split at their own size (reports/generalisation/<model>_val.json), "
                        "where predict's settings may be chosen (default: test)")
    p.add_argument("--set", action="append", metavar="predict.KEY=VALUE",
                   help="with --split val: try a predict setting (repeatable)")
    p.add_argument("--limit", type=int, help="score only the first N photos of each split (a quick look)")
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.set_defaults(func=cmd_generalise)

    p = sub.add_parser("calibrate", help="measure the crack width the model learned at (its detector on its crack "
                                         "training rows, scale-space ridges) -> models/<run>/scale.json, for predict's "
                                         "scale choice")
    _dataset_arg(p)
    p.add_argument("--variant", default="full", help="variant from params.yaml (default: full)")
    p.add_argument("--rows", type=int, default=120, help="crack training rows per source (default: 120)")
    _common(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("field", help="score a model on every field check set (field.sets: data/field/<name>/) "
                                     "through predict's default path")
    _dataset_arg(p)
    p.add_argument("--variant", default="full", help="variant from params.yaml (default: full)")
    p.add_argument("--model", help="any model predict takes: a folder, a .onnx file, models:/..., 'champion' "
                                   "(default: models/<dataset>/<variant>)")
    p.add_argument("--out", help="output JSON (default: results/<dataset>/<variant>/field.json)")
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.set_defaults(func=cmd_field)

    p = sub.add_parser("intake", help="check a batch of tagged photos (crack/ + no_crack/, or a path,label CSV), "
                                      "quarantine the bad files, version the good ones in data/incoming/<dataset>")
    _dataset_arg(p)
    p.add_argument("batch", help="batch folder (crack/, no_crack/) or CSV (path,label)")
    p.add_argument("--root", default=".", help="the wpcrack repository (default: .)")
    p.add_argument("--quarantine", help="folder for rejected files (default: data/quarantine/<dataset>/<batch>-<time>)")
    p.add_argument("--min-side", type=int, default=64, help="smallest photo side, px (default: 64)")
    p.add_argument("--max-side", type=int, default=10000, help="largest photo side, px (default: 10000)")
    p.add_argument("--check", action="store_true", help="only validate and list what would be rejected")
    p.add_argument("--variant", default="full", help="the run whose model (models/<dataset>/<variant>) chooses the "
                   "scale the new images are stored at (retrain.incoming_scale: predict; default: full)")
    p.add_argument("--scale-model", help="another trained model folder to choose that scale")
    p.set_defaults(func=cmd_intake)

    p = sub.add_parser("report", help="write the results pages from the pipeline's metrics files "
                       "(no argument: every dataset's page and the index)")
    p.add_argument("datasets", nargs="*", help="write docs/results/<dataset>.md (and .json) for these datasets")
    p.add_argument("--index", action="store_true", help="write the index docs/results.md from the pages' JSON")
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.add_argument("--pages", default="docs/results", help="per-dataset pages folder (default: docs/results)")
    p.add_argument("--out", default="docs/results.md", help="index file (default: docs/results.md)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tune-crf", help="score denseCRF pseudo-label settings against the masks of a train/val split")
    _dataset_arg(p)
    _model_args(p, "whose CAMs: a trained variant")
    p.add_argument("--split", choices=("train", "val"), default="train", help="images to tune on (default: train)")
    p.add_argument("--crop", type=int, help="random training crops of this side, 0 for whole images "
                   "(default: train.crop_size on train, whole images on val)")
    p.add_argument("--limit", type=int, default=64, help="crack images with masks to use (default: 64)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="values to try for a pseudo_labels key (repeatable; 'gaussian' sets sxy and compat); "
                   "default: bg_power 0.5,1,2 x gaussian_sxy 1,3 x bilateral_compat 3,10 x bilateral_srgb 5,13")
    p.add_argument("--workers", type=int, help="CRF processes (default: pseudo_labels.workers)")
    p.add_argument("--show", type=int, default=10, help="rows to print (default: 10)")
    p.add_argument("--out", help="Markdown output (default: reports/<dataset>/crf_tuning.md; CSV beside it)")
    _common(p)
    p.set_defaults(func=cmd_tune_crf)

    p = sub.add_parser("scale-check", help="does the classifier find cracks or tell the classes apart by image scale?")
    _dataset_arg(p)
    _model_args(p, "whose classifier: a trained variant")
    p.add_argument("--split", choices=("train", "val"), default="val", help="images to check (default: val)")
    p.add_argument("--limit", type=int, default=64, help="images per class (default: 64)")
    p.add_argument("--factor", type=float, default=2.0, help="shrink / blur factor (default: 2)")
    p.add_argument("--out", help="Markdown output (default: reports/<dataset>/scale_check.md; CSV beside it)")
    _common(p)
    p.set_defaults(func=cmd_scale_check)

    p = sub.add_parser("promote", help="point the MLflow alias 'champion' at the best evaluated full model if it passes the "
                       "promotion gate (benchmark and field sets, params.yaml promotion)")
    _dataset_arg(p)
    p.add_argument("--version", help="this registered version instead of the best evaluated full model")
    p.add_argument("--force", action="store_true", help="move the alias to --version even if it scores worse (rollback)")
    _common(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("experiments", help="write this MLflow store's page of every training tried and what it "
                       "gave, and the index docs/experiments.md")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help="datasets (default: deepcrack cfd crack500)")
    p.add_argument("--pages", default="docs/experiments", help="pages folder (default: docs/experiments)")
    p.add_argument("--out", default="docs/experiments.md", help="index file (default: docs/experiments.md)")
    p.add_argument("--params", default="params.yaml",
                   help="show where a run differs from this parameter file (default: params.yaml)")
    p.set_defaults(func=cmd_experiments)
    return parser


def _version() -> str:
    from wpcrack import __version__

    return f"wpcrack {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        nproc = _nproc_from_env() if args.command == "train" else None
        if nproc is not None:
            # Replace this process (DVC and Prefect keep waiting on the same pid; torchrun forwards
            # signals to the workers and exits non-zero when one fails).
            command = torchrun_command(nproc, argv)
            print(f"wpcrack train: {NPROC_ENV}={nproc}, running {' '.join(command[1:])}", file=sys.stderr, flush=True)
            os.execv(command[0], command)
        args.func(args)
    except WpcrackError as exc:
        print(f"wpcrack {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wpcrack {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
