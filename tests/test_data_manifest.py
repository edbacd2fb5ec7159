"""Manifest schema: every rule, lazy reporting of every bad row on one line."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from wpcrack.data.manifest import COLUMNS, load_manifest, save_manifest
from wpcrack.errors import DataError


def _write(folder: Path, rel: str, shape=(8, 10), channels=3) -> str:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((*shape, channels) if channels > 1 else shape, np.uint8))
    return rel


def _row(folder: Path, name: str, split="train", label=1, source=None, shape=(8, 10), mask_shape=None) -> dict:
    return {
        "image": _write(folder, f"images/{name}.png", shape),
        "mask": _write(folder, f"masks/{name}.png", mask_shape or shape, channels=1),
        "label": label, "split": split, "dataset": "t", "source_id": source or name,
        "height": shape[0], "width": shape[1],
    }


def _good(folder: Path) -> list[dict]:
    return [_row(folder, "a"), _row(folder, "b", label=0), _row(folder, "c", "val"), _row(folder, "d", "test")]


def _load_error(folder: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(DataError) as err:
        load_manifest(folder / "manifest.csv")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(folder / "manifest.csv"))
    return msg


def test_good_manifest_round_trip(tmp_path):
    save_manifest(_good(tmp_path), tmp_path / "manifest.csv")
    df = load_manifest(tmp_path / "manifest.csv")
    assert list(df.columns) == list(COLUMNS) and len(df) == 4
    assert df.label.dtype == np.int64
    assert len(load_manifest(tmp_path / "manifest.csv", split="val")) == 1


def test_missing_files_are_listed_by_line(tmp_path):
    rows = _good(tmp_path)
    (tmp_path / rows[1]["image"]).unlink()
    (tmp_path / rows[3]["image"]).unlink()
    msg = _load_error(tmp_path, rows)
    assert "image file not found on line(s) 3, 5" in msg and "images/b.png" in msg


def test_mask_of_wrong_size(tmp_path):
    rows = _good(tmp_path) + [_row(tmp_path, "e", mask_shape=(4, 4))]
    assert "mask size differs from image size on line(s) 6" in _load_error(tmp_path, rows)


def test_size_columns_must_match_the_file(tmp_path):
    rows = _good(tmp_path)
    rows[0]["height"] = 99
    assert "image size differs from height/width on line(s) 2" in _load_error(tmp_path, rows)


def test_corrupt_image(tmp_path):
    rows = _good(tmp_path)
    (tmp_path / rows[2]["image"]).write_bytes(b"not a png")
    assert "image file is not a readable image on line(s) 4" in _load_error(tmp_path, rows)


def test_bad_labels_and_splits(tmp_path):
    rows = _good(tmp_path)
    rows[0]["label"], rows[1]["label"], rows[2]["split"] = 2, "x", "holdout"
    msg = _load_error(tmp_path, rows)
    assert "label: failed isin([0, 1]) on line(s) 2" in msg
    assert "label: not an integer on line(s) 3" in msg
    assert "split: failed isin" in msg and "'holdout'" in msg


def test_source_in_two_splits(tmp_path):
    rows = _good(tmp_path) + [_row(tmp_path, "e", "test", source="a")]
    assert "source_id appears in more than one split on line(s) 2, 6" in _load_error(tmp_path, rows)


def test_masks_required_for_test_and_crack_rows(tmp_path):
    rows = _good(tmp_path)
    rows[0]["mask"] = rows[1]["mask"] = rows[3]["mask"] = ""
    msg = _load_error(tmp_path, rows)
    # line 3: a train no-crack row may omit its mask
    assert "val/test and crack rows need a mask (incoming train rows excepted) on line(s) 2, 5" in msg


def _incoming(folder: Path, name: str, split="train", label=1) -> dict:
    """A row as prepare writes it from data/incoming: image-level label only, no mask."""
    return {**_row(folder, name, split, label, source=f"incoming-{name}"), "mask": ""}


def test_incoming_train_rows_need_no_mask(tmp_path):
    rows = _good(tmp_path) + [_incoming(tmp_path, "e"), _incoming(tmp_path, "f", label=0)]
    save_manifest(rows, tmp_path / "manifest.csv")
    df = load_manifest(tmp_path / "manifest.csv", split="train")
    assert df[df.source_id.str.startswith("incoming-")]["mask"].tolist() == ["", ""]


def test_only_incoming_train_rows_may_omit_the_mask(tmp_path):
    rows = _good(tmp_path)
    rows[3]["mask"] = ""  # a crack test row without a mask
    rows += [_incoming(tmp_path, "e", split="val"), _incoming(tmp_path, "f", split="test"),
             {**_row(tmp_path, "g", source="incomingg"), "mask": ""}]  # not the incoming- prefix
    msg = _load_error(tmp_path, rows)
    assert "val/test and crack rows need a mask (incoming train rows excepted) on line(s) 5-8" in msg


def test_duplicate_paths(tmp_path):
    rows = _good(tmp_path)
    assert "image path listed twice on line(s) 2, 6" in _load_error(tmp_path, rows + [dict(rows[0])])


def test_every_problem_in_one_message(tmp_path):
    rows = _good(tmp_path)
    (tmp_path / rows[0]["mask"]).unlink()
    rows[3]["width"] = 1
    msg = _load_error(tmp_path, rows)
    assert "(2 bad row(s))" in msg and "mask file not found on line(s) 2" in msg and "line(s) 5" in msg


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "manifest.csv")
    (tmp_path / "manifest.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(DataError, match="manifest has no rows"):
        load_manifest(tmp_path / "manifest.csv")
    (tmp_path / "manifest.csv").write_text("image,label\nx.png,1\n")
    with pytest.raises(DataError, match="lacks column"):
        load_manifest(tmp_path / "manifest.csv")


def test_save_refuses_a_bad_manifest_and_writes_nothing(tmp_path):
    rows = _good(tmp_path)
    rows[0]["label"] = 7
    with pytest.raises(DataError):
        save_manifest(rows, tmp_path / "manifest.csv")
    assert not (tmp_path / "manifest.csv").exists()
