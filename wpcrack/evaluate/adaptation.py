"""The adaptation experiment: does retraining on a team's tagged photos help on that team's roads?

Played with public data (``pipelines.adaptation`` runs it): the DeepCrack champion meets CRACK500's
roads. A *batch* of CRACK500 training photos is tagged crack / no_crack from its masks' emptiness
(the masks stay here: only the tags reach the retraining), a *field set* of CRACK500 val photos with
their masks is the team's yardstick, and CRACK500's test split is the roads the team will meet next.
A *control* batch is the same photos with their tags shuffled: a retraining on it must not pass
the gate. The figures go to ``docs/results/adaptation.json`` and ``.md``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from wpcrack.errors import DataError
from wpcrack.io import read_image, read_mask, write_image, write_json

TARGET = "crack500"       # the team's roads
FIELD_SET = "crack500-val"
SIDES = (2, 3)            # crack-free windows: 1/2, else 1/3 of the photo's sides


def items(data_root: str | Path, split: str) -> list:
    """The raw CRACK500 photos (own size, with masks) of ``split`` of the prepared dataset."""
    from wpcrack.data.prepare import raw_items

    data = Path(data_root)
    listing = data / "prepared" / TARGET / "split.json"
    if not listing.is_file():
        raise DataError(listing, f"not found; run `dvc repro prepare@{TARGET}` first")
    sources = set(json.loads(listing.read_text())[split])
    found = [it for it in raw_items(data / "raw" / TARGET, TARGET) if it.source_id in sources]
    if not found:
        raise DataError(listing, f"no {split} photos")
    return sorted(found, key=lambda it: it.name)


def crack_free_window(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y, x, h, w) of the first window of 1/2 (else 1/3) of the photo's sides with no crack pixel."""
    height, width = mask.shape
    for parts in SIDES:
        h, w = height // parts, width // parts
        for y in range(0, height - h + 1, max(h // 2, 1)):
            for x in range(0, width - w + 1, max(w // 2, 1)):
                if not mask[y:y + h, x:x + w].any():
                    return y, x, h, w
    return None


def make_batch(photos: list, count: int, out: Path, seed: int = 0, shuffled: bool = False) -> dict[str, Any]:
    """A tagged batch (``crack/``, ``no_crack/``) of ``count`` images from ``photos``: half of them
    whole photos whose mask has cracks, half crack-free windows of other photos (a team's crack-free
    shots), each tagged by its mask's emptiness; ``shuffled`` permutes the tags (the control).
    Returns its composition."""
    rng = np.random.default_rng(seed)
    order = [photos[i] for i in rng.permutation(len(photos))]
    want = {1: count - count // 2, 0: count // 2}
    chosen: list[tuple[str, np.ndarray, int]] = []
    for it in order:
        if len(chosen) == count:
            break
        rgb = read_image(it.image)
        mask = read_mask(it.mask, rgb.shape[:2])
        if mask.any() and want[1]:
            chosen.append((it.name, rgb, 1))
            want[1] -= 1
        elif want[0] and (box := crack_free_window(mask)) is not None:
            y, x, h, w = box
            chosen.append((f"{it.name}_free", rgb[y:y + h, x:x + w], 0))
            want[0] -= 1
    if len(chosen) < count:
        raise DataError(out, f"only {len(chosen)} of {count} tagged images could be made from {len(photos)} photos")
    tags = [tag for _, _, tag in chosen]
    if shuffled:
        tags = list(rng.permutation(tags))
    if out.exists():
        shutil.rmtree(out)
    for (name, rgb, _), tag in zip(chosen, tags):
        write_image(out / ("crack" if tag else "no_crack") / f"{name}.png", rgb)
    truth = np.array([t for _, _, t in chosen])
    return {"images": count, "crack": int(np.sum(tags)), "no_crack": count - int(np.sum(tags)),
            "tags_right": float(np.mean(truth == np.array(tags))), "shuffled": shuffled}


def make_field_set(photos: list, count: int, out: Path, seed: int = 0) -> list[str]:
    """``count`` photos with cracks and their masks (0/255 PNG) as a field set folder."""
    rng = np.random.default_rng(seed)
    names = []
    if out.exists():
        shutil.rmtree(out)
    for i in rng.permutation(len(photos)):
        it = photos[int(i)]
        rgb = read_image(it.image)
        mask = read_mask(it.mask, rgb.shape[:2])
        if not mask.any():
            continue
        write_image(out / "images" / f"{it.name}.png", rgb)
        write_image(out / "masks" / f"{it.name}.png", (mask > 0).astype(np.uint8) * 255)
        names.append(it.name)
        if len(names) == count:
            return names
    raise DataError(out, f"only {len(names)} of {count} photos with cracks")


def target_iou(params: str | Path, model: str) -> float:
    """IoU (percent) of ``model`` (any model predict takes) on CRACK500's test split through predict's
    default path, as the generalisation table scores it."""
    from wpcrack.config import load_config
    from wpcrack.deploy.predict import load_detector
    from wpcrack.evaluate.generalise import score_split

    detector, cfg, _ = load_detector(model, TARGET, params)
    return float(score_split(detector, cfg, load_config(params, dataset=TARGET))["iou"])


def summary(arms: dict[str, dict], before: dict[str, float]) -> dict[str, Any]:
    """adaptation.json: the main arm and its control (the other batch sizes are on the page only)."""
    main, control = arms["tagged"], arms.get("control")
    return {"before": before, "after": main["after"], "decision": main["decision"], "batch": main["batch"]["images"],
            "mode": main["mode"], "minutes": round(main["minutes"], 1),
            "control": {"decision": control["decision"], "after": control["after"]} if control else None}


def page(figures: dict[str, Any], arms: dict[str, dict], others: dict[str, dict] | None = None) -> str:
    """docs/results/adaptation.md from the figures (``others``: the same experiment in other modes)."""
    rows = [("champion (before)", figures["before"], "", "", "")]
    for name, arm in arms.items():
        batch = arm["batch"]
        what = (f"{batch['images']} photos, tags shuffled ({100 * batch['tags_right']:.0f} % right)"
                if batch["shuffled"] else f"{batch['images']} tagged photos")
        rows.append((f"after {what}", arm["after"], arm["decision"], f"{arm['minutes']:.1f}", arm["mode"]))
    lines = [
        f"# Adaptation: retraining on a team's tagged photos (`retrain.mode: {figures['mode']}`)",
        "",
        "Generated by `python -m pipelines.adaptation run` (do not edit). The DeepCrack champion meets",
        "CRACK500's roads: a batch of CRACK500 training photos tagged crack / no_crack from their masks'",
        "emptiness goes through the retrain flow (`pipelines.retrain`, Prefect, DVC, MLflow), with a",
        f"field set of {figures.get('field_photos', 20)} CRACK500 val photos with masks. IoU in percent;",
        "`field` and `target test` (CRACK500's test split) through predict's default path, `benchmark",
        "test` DeepCrack's test split by the evaluate protocol (the gate's benchmark). The control is",
        "the same photos with shuffled tags: the gate must keep the champion.",
        "",
        "| model | field | target test (CRACK500) | benchmark test (DeepCrack) | decision | minutes | mode |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for label, s, decision, minutes, mode in rows:
        lines.append(f"| {label} | {s['field']:.1f} | {s['target_test']:.1f} | {s['benchmark_test']:.1f} | "
                     f"{decision} | {minutes} | {mode} |")
    lines += ["", "`minutes`: the retrain flow end to end (intake, prepare, train, evaluate, calibrate, gate), on "
              f"{figures.get('hardware', 'this machine')}.", ""]
    if others:
        lines += _modes_table(figures, others)
    return "\n".join(lines)


def _modes_table(figures: dict[str, Any], others: dict[str, dict]) -> list[str]:
    """The same batch retrained in the other ``retrain.mode``s (their pages' JSON), quality against time."""
    lines = ["## Against the other retraining modes", "",
             f"The main batch ({figures['batch']} tagged photos) retrained in each `retrain.mode` from the same "
             "champion; each row from its own generated page.", "",
             "| mode | batch | field | target test (CRACK500) | benchmark test (DeepCrack) | decision | minutes | page |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for stem, f in {"": figures, **others}.items():
        a = f["after"]
        link = f"[{stem}]({stem}.md)" if stem else "this page"
        lines.append(f"| {f['mode']} | {f['batch']} | {a['field']:.1f} | {a['target_test']:.1f} | "
                     f"{a['benchmark_test']:.1f} | {f['decision']} | {f['minutes']:.1f} | {link} |")
    return lines + [""]


def other_modes(out: Path, mode: str) -> dict[str, dict]:
    """The figures of the experiment's pages beside ``out`` (``adaptation*.json``) made in another mode."""
    found = {}
    for path in sorted(out.parent.glob("adaptation*.json")):
        if path.stem == out.stem:
            continue
        figures = json.loads(path.read_text())
        if isinstance(figures, dict) and figures.get("mode") not in (None, mode) and "after" in figures:
            found[path.stem] = figures
    return found


def write(out: Path, figures: dict[str, Any], arms: dict[str, dict]) -> None:
    """``<out>.json`` (exactly the summary's keys) and ``<out>.md``, which compares itself with the
    pages of the other modes beside it."""
    public = {k: v for k, v in figures.items() if k not in ("field_photos", "hardware")}
    write_json(out.with_suffix(".json"), public)
    out.with_suffix(".md").write_text(page(figures, arms, other_modes(out, figures["mode"])))
