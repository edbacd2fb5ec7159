"""``wpcrack score``: any method's predicted masks against ground truth, with our protocol.

This is how published outputs of other methods (or the authors' released predictions) are scored
the same way as ours: files are paired by name stem, binarised at the threshold, optionally both
brought to SIZE x SIZE (ground truth nearest-neighbour, prediction bilinear; see ``metrics``), and
reduced over the whole folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from wpcrack.errors import DataError, WpcrackError
from wpcrack.evaluate.metrics import ConfusionAccumulator, align, format_table
from wpcrack.io import list_images, read_mask, read_probability


def _by_stem(files: list[Path]) -> tuple[dict[str, Path], list[str]]:
    """Stem -> file, and the stems that more than one file claims (``a.png`` and ``a.jpg``)."""
    out: dict[str, Path] = {}
    clashes = []
    for f in files:
        if f.stem in out:
            clashes.append(f"{out[f.stem].name} and {f.name}")
        out[f.stem] = f
    return out, clashes


def pair_files(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, prediction, ground truth) for every stem; any unpaired or ambiguous file is an error."""
    preds, pred_clash = _by_stem(list_images(pred_dir))
    gts, gt_clash = _by_stem(list_images(gt_dir))
    problems = [f"{pred_dir}: two files for one name: {c}" for c in pred_clash]
    problems += [f"{gt_dir}: two files for one name: {c}" for c in gt_clash]
    problems += [f"{preds[s]}: no ground truth named {s}.* in {gt_dir}" for s in sorted(set(preds) - set(gts))]
    problems += [f"{gts[s]}: no prediction named {s}.* in {pred_dir}" for s in sorted(set(gts) - set(preds))]
    if problems:
        raise WpcrackError(f"{len(problems)} file(s) cannot be paired:\n  " + "\n  ".join(problems))
    return [(s, preds[s], gts[s]) for s in sorted(preds)]


def score_folders(
    pred_dir: Path, gt_dir: Path, size: int | None = None, threshold: float = 0.5, as_json: bool = False
) -> dict:
    """Score a folder of predictions (8-bit probabilities or 0/255 masks) against ground-truth masks.

    Every file is read before anything is reported, so all unreadable or mismatched files are
    listed in one error. Returns the summary (percent, see ``ConfusionAccumulator.summary``) and
    prints it as a table, or as JSON with ``as_json``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    acc = ConfusionAccumulator(threshold=threshold)
    problems = []
    for _stem, pred_path, gt_path in pair_files(pred_dir, gt_dir):
        try:
            prob, gt = align(read_probability(pred_path), read_mask(gt_path), size)
        except DataError as exc:
            problems.append(str(exc))
            continue
        except WpcrackError as exc:
            problems.append(f"{pred_path}: {exc}")
            continue
        acc.add(prob, gt)
    if problems:
        raise WpcrackError(f"{len(problems)} file(s) cannot be scored:\n  " + "\n  ".join(problems))

    summary = acc.summary()
    summary["size"] = size
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        where = f"{size}x{size}" if size else "native size"
        print(f"{len(acc)} image pairs, threshold {threshold}, {where}; counts summed over all pixels")
        print(format_table({str(pred_dir): summary}, label="predictions"))
    return summary
