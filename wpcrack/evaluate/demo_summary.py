"""Print the demo's tables, what `wpcrack predict` found on the survey photo, and where everything is
(run by `make demo` after `dvc repro` and `wpcrack predict`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from wpcrack.config import load_config


def truth_iou(mask_path: Path, truth_path: Path) -> float | None:
    """Crack IoU (percent) of a predicted mask against the generator's true mask, None without one."""
    from wpcrack.io import read_mask

    if not truth_path.is_file():
        return None
    pred = read_mask(mask_path) > 0
    truth = read_mask(truth_path, shape=pred.shape) > 0
    union = (pred | truth).sum()
    return 100.0 * (pred & truth).sum() / union if union else None


def predict_lines(predict_dir: Path) -> list[str]:
    """Where predict put each photo's mask, overlay and crack statistics; for a photo made by
    `wpcrack survey-photo` (``<stem>_truth.png`` beside it), also its IoU against the true mask."""
    summary = predict_dir / "predictions.json"
    if not summary.is_file():
        return []
    lines = [f"wpcrack predict ({summary}, predictions.csv beside it):"]
    for row in json.loads(summary.read_text())["images"]:
        if row["error"]:
            lines.append(f"  {row['image']}: skipped ({row['error']})")
            continue
        image = Path(row["image"])
        lines += [
            f"  photo    {image} ({row['width']}x{row['height']} px, {row['tiles']} tiles)",
            f"  mask     {predict_dir / row['mask']}",
            f"  overlay  {predict_dir / row['overlay']}",
            f"  cracks   {100 * row['crack_share']:.2f} % of the pixels, {row['length_px']:.0f} px long, "
            f"mean width {row['mean_width_px']:.1f} px, max {row['max_width_px']:.1f} px",
        ]
        iou = truth_iou(predict_dir / row["mask"], image.with_name(f"{image.stem}_truth.png"))
        if iou is not None:
            lines.append(f"  truth    crack IoU {iou:.1f} against {image.stem}_truth.png, the generator's mask")
    return lines


def main(params: str = "params.yaml", dataset: str = "synthetic") -> int:
    cfg = load_config(params, dataset=dataset)
    reports = Path(cfg.paths.reports)
    for table in (reports / dataset / "comparison.md", reports / dataset / "ablation.md",
                  reports / "benchmark" / f"{dataset}.md"):
        if table.is_file():
            print(f"\n=== {table}\n{table.read_text()}")
    predicted = predict_lines(reports / dataset / "predict")
    if predicted:
        print("\n".join(["", *predicted, ""]))
    print("Where to look:")
    print(f"  tables     {reports / dataset}/ablation.md, comparison.md")
    print(f"  benchmark  {reports / 'benchmark' / dataset}.md (.json)")
    print(f"  figures    {Path(cfg.paths.results) / dataset}/<variant>/figure.png, curves.png (PR + training curves, offline)")
    print(f"  predict    {reports / dataset / 'predict'}/: <photo>_mask.png, <photo>_overlay.jpg, predictions.csv (.json)")
    print("  metrics    dvc metrics show   |   plots: dvc plots show --json")
    print("  MLflow     .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000")
    print("             then open http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
