"""prepare: split and patch rules on tiny fake raw folders, and every bad-input case."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from wpcrack.cli import main
from wpcrack.config import (CFDPrepare, Config, Crack500Prepare, DeepCrackPrepare, PathsConfig, PrepareConfig,
                            RoadsPrepare, SyntheticPrepare, load_config)
from wpcrack.data.manifest import load_manifest
from wpcrack.data.prepare import prepare, split_sources
from wpcrack.geometry import grid_cells
from wpcrack.errors import ConfigError, DataError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _cfg(data: Path, **prepare_kw) -> Config:
    small = dict(
        synthetic=SyntheticPrepare(size=32, train_crack=6, train_nocrack=5, val_crack=2, val_nocrack=2, test=3, seed=1),
        deepcrack=DeepCrackPrepare(image_size=24, nocrack_patches=10, nocrack_patch_size=12, val_fraction=0.25),
        cfd=CFDPrepare(train_count=8, test_count=4, grid=3, patch_size=16, val_fraction=0.25),
        crack500=Crack500Prepare(val_fraction=0.2, test_fraction=0.2, image_size=24, nocrack_crops=8,
                                 nocrack_crop_size=12),
    )
    return Config(paths=PathsConfig(data=str(data)), prepare=PrepareConfig(**{**small, **prepare_kw}))


def _photo(path: Path, mask_path: Path, rng: np.random.Generator, hw=(30, 40), crack=True, ext=".jpg") -> None:
    """Noise image; a crack is a vertical line in the left third, so the right side is crack-free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path.with_suffix(ext)), rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
    mask = np.zeros(hw, np.uint8)
    if crack:
        mask[:, int(rng.integers(1, hw[1] // 3))] = 255
    cv2.imwrite(str(mask_path.with_suffix(".png")), mask)


def _fake_deepcrack(raw: Path) -> None:
    rng = np.random.default_rng(0)
    names = ["100-1", "100-2", "101", "102-1", "102-2", "103", "104", "105-1", "106", "107", "108-1", "108-2"]
    for n in names:
        _photo(raw / "train_img" / n, raw / "train_lab" / n, rng)
    for n in ["200", "201-1", "108-3"]:  # 108 is a scene shared with the training set
        _photo(raw / "test_img" / n, raw / "test_lab" / n, rng, hw=(40, 30))


def _fake_cfd(raw: Path, n: int = 12) -> None:
    rng = np.random.default_rng(1)
    for i in range(1, n + 1):
        _photo(raw / "images" / f"{i:03d}", raw / "masks" / f"{i:03d}", rng, hw=(32, 48))


def _fake_crack500(raw: Path) -> None:
    rng = np.random.default_rng(2)
    root = raw / "crack500"
    for p in range(10):
        for k in range(3):
            folder, labels = ("train", "label") if p < 7 else ("val", "val_label")
            name = f"2016022{p}_08101{p}_{k * 10}_{k}"
            _photo(root / folder / name, root / labels / name, rng, hw=(30, 50))


def _sources_disjoint(df: pd.DataFrame) -> bool:
    return bool((df.groupby("source_id")["split"].nunique() == 1).all())


def test_synthetic_counts_and_rules(tmp_path):
    cfg = _cfg(tmp_path)
    path = prepare(cfg, "synthetic")
    df = load_manifest(path)
    counts = json.loads((path.parent / "counts.json").read_text())
    s = cfg.prepare.synthetic
    expected = {"train": (s.train_crack, s.train_nocrack), "val": (s.val_crack, s.val_nocrack), "test": (s.test, 0)}
    for split, (crack, free) in expected.items():
        rows = df[df.split == split]
        assert (int(rows.label.sum()), int((rows.label == 0).sum())) == (crack, free)
        assert (counts[split]["crack"], counts[split]["nocrack"]) == (crack, free)
    assert _sources_disjoint(df)
    assert set(df.height) == set(df.width) == {32}
    for _, row in df.iterrows():  # labels agree with the pixel masks
        mask = cv2.imread(str(path.parent / row["mask"]), cv2.IMREAD_GRAYSCALE)
        assert int(mask.max() > 0) == row.label


def test_prepare_is_deterministic(tmp_path):
    a = prepare(_cfg(tmp_path / "a"), "synthetic")
    b = prepare(_cfg(tmp_path / "b"), "synthetic")
    assert a.read_bytes() == b.read_bytes()
    first = pd.read_csv(a).image[0]
    assert (a.parent / first).read_bytes() == (b.parent / first).read_bytes()


def test_deepcrack_rules(tmp_path):
    _fake_deepcrack(tmp_path / "raw" / "deepcrack")
    cfg = _cfg(tmp_path)
    path = prepare(cfg, "deepcrack")
    df = load_manifest(path)
    counts = json.loads((path.parent / "counts.json").read_text())
    assert counts["dropped_test_overlap"] == 2  # 108-1, 108-2 share a scene with test 108-3
    assert set(df[df.source_id == "108"].split) == {"test"}
    assert _sources_disjoint(df)
    train = df[df.split != "test"]
    assert train.label.sum() == 10 and (train.label == 0).sum() == 10  # nocrack_patches in total
    assert set(train.height) == {24} and set(train.width) == {24}
    assert set(df[df.split == "val"].label) == {0, 1}
    test = df[df.split == "test"]
    assert len(test) == 3 and set(zip(test.height, test.width)) == {(40, 30)}  # original resolution
    src = tmp_path / "raw" / "deepcrack" / "test_img" / "200.jpg"
    assert (path.parent / test[test.source_id == "200"].image.iloc[0]).read_bytes() == src.read_bytes()
    for _, row in df[df.label == 0].iterrows():  # crack-free patches really are crack-free
        assert cv2.imread(str(path.parent / row["mask"]), cv2.IMREAD_GRAYSCALE).max() == 0


def test_matched_nocrack_patches_share_the_crack_images_scale(tmp_path):
    """nocrack_scale=matched: squares of the photo rescaled like the crack images, not enlarged."""
    _fake_deepcrack(tmp_path / "raw" / "deepcrack")
    matched = DeepCrackPrepare(image_size=24, nocrack_patches=10, nocrack_patch_size=12, val_fraction=0.25,
                               nocrack_scale="matched")
    path = prepare(_cfg(tmp_path, deepcrack=matched), "deepcrack")
    df = load_manifest(path)
    nocrack, crack = df[(df.label == 0) & (df.split != "test")], df[(df.label == 1) & (df.split != "test")]
    assert len(nocrack) == 10 and set(nocrack.height) == {12} and set(nocrack.width) == {12}
    assert set(crack.height) == {24}
    row = nocrack.iloc[0]  # <photo>_nc<y>_<x>: the window of the photo rescaled to image_size
    photo, y, x = row["image"].rsplit("/", 1)[1].removesuffix(".png").rsplit("_", 2)
    y, x = int(y.removeprefix("nc")), int(x)
    rescaled = cv2.resize(cv2.imread(str(tmp_path / "raw" / "deepcrack" / "train_img" / f"{photo}.jpg")), (24, 24),
                          interpolation=cv2.INTER_AREA)
    assert np.array_equal(cv2.imread(str(path.parent / row["image"])), rescaled[y:y + 12, x:x + 12])
    with pytest.raises(ConfigError, match="nocrack_scale"):
        load_config(PARAMS, dataset="deepcrack", overrides=["prepare.deepcrack.nocrack_scale=bigger"])


def test_cfd_grid_and_split(tmp_path):
    _fake_cfd(tmp_path / "raw" / "cfd")
    cfg = _cfg(tmp_path)
    df = load_manifest(prepare(cfg, "cfd"))
    test = df[df.split == "test"]
    assert len(test) == 4 and set(zip(test.height, test.width)) == {(32, 48)}
    trainval = df[df.split != "test"]
    assert len(trainval) == 8 * 9 and trainval.source_id.nunique() == 8
    assert df[df.split == "val"].source_id.nunique() == 2
    assert set(trainval.height) == {16}
    # the crack is a vertical line in the left third of each image: only grid column 0 is crack
    col = trainval.image.str.extract(r"_g(\d)\.png$")[0].astype(int) % 3
    assert (trainval.label == (col == 0).astype(int)).all()
    assert _sources_disjoint(df)


def test_grid_cells_cover_the_image():
    cells = grid_cells(320, 480, 3)
    assert cells[0] == (0, 107, 0, 160) and cells[-1] == (213, 320, 320, 480)
    assert sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in cells) == 320 * 480


def test_crack500_split_by_source_photo(tmp_path):
    _fake_crack500(tmp_path / "raw" / "crack500")
    df = load_manifest(prepare(_cfg(tmp_path), "crack500"))
    assert _sources_disjoint(df)
    assert df.groupby("split").source_id.nunique().to_dict() == {"test": 2, "train": 6, "val": 2}
    assert (df.label == 0).sum() == 8 and set(df[df.label == 0].split) <= {"train", "val"}
    assert set(zip(df[df.split == "test"].height, df[df.split == "test"].width)) == {(30, 50)}


def test_split_sources_is_seeded_and_complete():
    ids = [f"s{i}" for i in range(20)]
    a = split_sources(ids, {"val": 0.1, "test": 0.2}, np.random.default_rng(3))
    b = split_sources(reversed(ids), {"val": 0.1, "test": 0.2}, np.random.default_rng(3))
    assert a == b and sorted(a) == sorted(ids)
    assert list(a.values()).count("val") == 2 and list(a.values()).count("test") == 4


# ---- bad inputs: one-line error naming the file; previous output untouched, nothing half-written


def _assert_clean_failure(tmp_path: Path, dataset: str, match: str) -> None:
    prepared = tmp_path / "prepared"
    before = sorted(p.name for p in prepared.iterdir()) if prepared.exists() else []
    with pytest.raises(DataError, match=match) as err:
        prepare(_cfg(tmp_path), dataset)
    assert "\n" not in str(err.value)
    after = sorted(p.name for p in prepared.iterdir()) if prepared.exists() else []
    assert after == before  # no temporary folder left, nothing new


@pytest.fixture
def deepcrack_raw(tmp_path) -> Path:
    raw = tmp_path / "raw" / "deepcrack"
    _fake_deepcrack(raw)
    return raw


def test_corrupt_image(tmp_path, deepcrack_raw):
    (deepcrack_raw / "train_img" / "103.jpg").write_bytes(b"\xff\xd8 garbage")
    _assert_clean_failure(tmp_path, "deepcrack", r"train_img/103\.jpg: cannot be decoded as an image")


def test_mask_of_wrong_size(tmp_path, deepcrack_raw):
    cv2.imwrite(str(deepcrack_raw / "train_lab" / "104.png"), np.zeros((5, 5), np.uint8))
    _assert_clean_failure(tmp_path, "deepcrack", r"train_lab/104\.png: mask is 5x5 but its image is 40x30")


def test_missing_mask_file(tmp_path, deepcrack_raw):
    (deepcrack_raw / "test_lab" / "200.png").unlink()
    _assert_clean_failure(tmp_path, "deepcrack", r"test_lab/200\.png: mask not found for image 200\.jpg")


def test_empty_folder(tmp_path, deepcrack_raw):
    for f in (deepcrack_raw / "test_img").iterdir():
        f.unlink()
    _assert_clean_failure(tmp_path, "deepcrack", r"test_img: no images")


def test_missing_raw_folder(tmp_path):
    _assert_clean_failure(tmp_path, "cfd", r"raw/cfd: raw data not found; run `wpcrack download cfd` first")


def test_wrong_image_count_for_cfd(tmp_path):
    _fake_cfd(tmp_path / "raw" / "cfd", n=5)
    _assert_clean_failure(tmp_path, "cfd", r"expected 12 images \(train_count \+ test_count\), found 5")


def test_bad_crack500_name(tmp_path):
    _fake_crack500(tmp_path / "raw" / "crack500")
    rng = np.random.default_rng(0)
    _photo(tmp_path / "raw/crack500/crack500/train/oddname", tmp_path / "raw/crack500/crack500/label/oddname", rng)
    _assert_clean_failure(tmp_path, "crack500", r"oddname\.jpg: file name is not")


def test_failure_keeps_previous_output(tmp_path, deepcrack_raw):
    good = prepare(_cfg(tmp_path), "deepcrack").read_bytes()
    (deepcrack_raw / "train_img" / "103.jpg").write_bytes(b"")
    _assert_clean_failure(tmp_path, "deepcrack", "file is empty")
    assert (tmp_path / "prepared" / "deepcrack" / "manifest.csv").read_bytes() == good


def test_cli_prepare_errors_exit_2(tmp_path, deepcrack_raw, capsys):
    (deepcrack_raw / "train_img" / "103.jpg").write_bytes(b"junk")
    code = main(["prepare", "deepcrack", "--params", str(PARAMS), "--set", f"paths.data={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "103.jpg: cannot be decoded" in err[0]
    assert main(["prepare", "cfd", "--params", str(PARAMS), "--set", f"paths.data={tmp_path}"]) == 2


def test_cli_prepare_synthetic(tmp_path):
    assert main(["prepare", "synthetic", "--params", str(PARAMS), "--set", f"paths.data={tmp_path}"]) == 0
    assert (tmp_path / "prepared" / "synthetic" / "counts.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["deepcrack", "cfd", "crack500"])
def test_real_prepare(dataset, tmp_path):
    from wpcrack.config import load_config
    from wpcrack.data.sources import download

    mirror = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    if not mirror.is_dir():
        pytest.skip("no dataset mirror")
    download([dataset], tmp_path / "raw", mirror=mirror)
    cfg = load_config(PARAMS, dataset=dataset, overrides=[f"paths.data={tmp_path}"])
    path = prepare(cfg, dataset)
    counts = json.loads((path.parent / "counts.json").read_text())
    assert _sources_disjoint(load_manifest(path))
    if dataset != "crack500":
        assert counts["test"]["rows"] == {"deepcrack": 237, "cfd": 48}[dataset]


# ---- incoming images (retraining flow): train split only, rescaled, label kept, no mask

INCOMING_COLUMNS = ("image", "mask", "label", "split", "dataset", "source_id", "height", "width",
                    "sha256", "batch", "original", "added", "version")  # as pipelines/retrain.py writes them


def _incoming(data: Path, dataset: str, shapes=((50, 70), (90, 64), (64, 64)), labels=(1, 0, 1)) -> list[dict]:
    """``data/incoming/<dataset>`` as the retraining flow's ingest leaves it (content-addressed names)."""
    import hashlib

    folder = data / "incoming" / dataset
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rows = []
    for i, ((h, w), label) in enumerate(zip(shapes, labels)):
        ext = ".jpg" if i % 2 else ".png"
        data_bytes = cv2.imencode(ext, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes()
        sha = hashlib.sha256(data_bytes).hexdigest()
        (folder / "images" / f"{sha[:20]}{ext}").write_bytes(data_bytes)
        rows.append({"image": f"images/{sha[:20]}{ext}", "mask": "", "label": label, "split": "train",
                     "dataset": dataset, "source_id": f"incoming-{sha[:20]}", "height": h, "width": w,
                     "sha256": sha, "batch": "/srv/batch", "original": f"/srv/batch/x{i}{ext}",
                     "added": "2025-01-01T00:00:00+00:00", "version": 1})
    pd.DataFrame(rows, columns=list(INCOMING_COLUMNS)).to_csv(folder / "manifest.csv", index=False)
    return rows


def _version_log(data: Path, dataset: str, versions: int) -> Path:
    """``data_versions/<dataset>.csv`` beside the data folder, with ``versions`` rows."""
    log = data.parent / "data_versions" / f"{dataset}.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    lines = ["version,created,batch,added,quarantined,md5,nfiles,size"]
    lines += [f"{v},2025-01-0{v}T00:00:00+00:00,/srv/batch,3,0,abc{v}.dir,3,1000" for v in range(1, versions + 1)]
    log.write_text("\n".join(lines) + "\n")
    return log


def test_incoming_rows_join_the_training_split_only(tmp_path):
    from wpcrack.data.datasets import WeakDataset

    base = prepare(_cfg(tmp_path / "base" / "data"), "synthetic")
    data = tmp_path / "repo" / "data"
    _version_log(data, "synthetic", 1)
    rows = _incoming(data, "synthetic")
    path = prepare(_cfg(data), "synthetic")
    df = load_manifest(path)
    new = df[df.source_id.str.startswith("incoming-")]
    assert len(new) == 3 and set(new.split) == {"train"}
    assert new.source_id.tolist() == [r["source_id"] for r in rows]
    assert new.label.tolist() == [1, 0, 1]  # image-level labels kept
    assert (new["mask"] == "").all()  # no pixel labels
    assert set(new.height) == set(new.width) == {32}  # rescaled like the synthetic training rows
    for rel in new.image:
        assert cv2.imread(str(path.parent / rel)).shape == (32, 32, 3)
    # everything else is exactly what prepare makes without incoming data: val and test untouched
    old = load_manifest(base)
    assert df[~df.index.isin(new.index)].reset_index(drop=True).equals(old)
    for rel in old[old.split != "train"].image:
        assert (path.parent / rel).read_bytes() == (base.parent / rel).read_bytes()
    counts = json.loads((path.parent / "counts.json").read_text())
    assert counts["incoming"] == {"rows": 3, "crack": 2, "nocrack": 1}
    assert json.loads((base.parent / "counts.json").read_text())["incoming"]["rows"] == 0
    s = _cfg(data).prepare.synthetic
    assert (counts["train"]["crack"], counts["train"]["nocrack"]) == (s.train_crack + 2, s.train_nocrack + 1)
    # the training dataset yields them with an all-zero mask and has_mask False
    ds = WeakDataset(path, "train", crop_size=24, augment=True, seed=0)
    for i in np.flatnonzero(ds.frame.source_id.str.startswith("incoming-").to_numpy()):
        item = ds[int(i)]
        assert item["has_mask"] is False and item["mask"].shape == (1, 24, 24) and not item["mask"].any()
        assert item["label"].item() == rows[int(i) - (len(ds) - 3)]["label"]


@pytest.mark.parametrize("dataset,make,size", [("deepcrack", _fake_deepcrack, 24), ("cfd", _fake_cfd, 16),
                                               ("crack500", _fake_crack500, 24)])
def test_incoming_rows_are_rescaled_like_the_training_rows(tmp_path, dataset, make, size):
    data = tmp_path / "data"
    make(data / "raw" / dataset)
    _incoming(data, dataset)
    df = load_manifest(prepare(_cfg(data), dataset))
    new = df[df.source_id.str.startswith("incoming-")]
    assert len(new) == 3 and set(new.split) == {"train"} and (new["mask"] == "").all()
    assert set(zip(new.height, new.width)) == {(size, size)}
    assert set(zip(df[df.split == "train"].height, df[df.split == "train"].width)) == {(size, size)}


def test_incoming_rows_keep_the_scale_predict_chose_for_them(tmp_path):
    """Rows ingested with the champion's scale choice are stored at it, aspect kept (predict sees the
    photo so); rows without one are squashed as before; a bad scale names the manifest and the row."""
    data = tmp_path / "data"
    _fake_deepcrack(data / "raw" / "deepcrack")
    _incoming(data, "deepcrack", shapes=((50, 70), (90, 64), (64, 64)))
    manifest = data / "incoming" / "deepcrack" / "manifest.csv"
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame["scale"], frame["scale_model"] = ["0.5", "", "2"], ["abc", "", "abc"]
    frame.to_csv(manifest, index=False)
    df = load_manifest(prepare(_cfg(data), "deepcrack"))
    new = df[df.source_id.str.startswith("incoming-")]
    assert list(zip(new.height, new.width)) == [(25, 35), (24, 24), (128, 128)]
    frame["scale"] = ["0.5", "wide", ""]
    frame.to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"incoming/deepcrack/manifest\.csv: images/.*: scale 'wide' must be"):
        prepare(_cfg(data), "deepcrack")


def test_no_incoming_data_with_an_empty_version_log(tmp_path):
    data = tmp_path / "data"
    _version_log(data, "synthetic", 0)  # header only, as committed for every dataset
    path = prepare(_cfg(data), "synthetic")
    assert not load_manifest(path).source_id.str.startswith("incoming-").any()


def test_missing_incoming_folder_with_versions_logged(tmp_path):
    data = tmp_path / "data"
    _version_log(data, "synthetic", 2)
    with pytest.raises(DataError, match=r"incoming/synthetic: missing, but .*data_versions/synthetic\.csv lists "
                                        r"2 version\(s\).*run `dvc checkout data_versions/synthetic\.dvc`") as err:
        prepare(_cfg(data), "synthetic")
    assert "\n" not in str(err.value)
    assert not (data / "prepared" / "synthetic").exists()


def test_corrupt_incoming_image(tmp_path):
    data = tmp_path / "data"
    rows = _incoming(data, "synthetic")
    bad = data / "incoming" / "synthetic" / rows[1]["image"]
    bad.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DataError, match=rf"{bad.name}: cannot be decoded as an image.*dvc checkout") as err:
        prepare(_cfg(data), "synthetic")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not (data / "prepared" / "synthetic").exists()


def test_incoming_image_that_differs_from_its_checksum(tmp_path):
    data = tmp_path / "data"
    rows = _incoming(data, "synthetic")
    bad = data / "incoming" / "synthetic" / rows[0]["image"]
    bad.write_bytes(cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))[1].tobytes())  # decodes, wrong bytes
    with pytest.raises(DataError, match=rf"{bad.name}: content differs from its sha256"):
        prepare(_cfg(data), "synthetic")


@pytest.mark.parametrize("column,value,problem", [
    ("split", "test", r"incoming rows are training data only \(split must be train\)"),
    ("label", "2", "label must be 0 or 1"),
    ("source_id", "x", "source_id must start with 'incoming-'"), ("dataset", "cfd", "dataset must be synthetic"),
])
def test_bad_incoming_manifest(tmp_path, column, value, problem):
    data = tmp_path / "data"
    rows = _incoming(data, "synthetic")
    rows[2][column] = value
    pd.DataFrame(rows).to_csv(data / "incoming" / "synthetic" / "manifest.csv", index=False)
    with pytest.raises(DataError, match=rf"incoming/synthetic/manifest\.csv: {problem}.*line\(s\) 4"):
        prepare(_cfg(data), "synthetic")


def test_roads_links_the_sources_rows_unchanged_and_names_their_source(tmp_path):
    cfg = _cfg(tmp_path)
    own = load_manifest(prepare(cfg, "synthetic"))
    roads_cfg = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, roads=RoadsPrepare(("synthetic",))))
    roads = load_manifest(prepare(roads_cfg, "roads"))
    assert len(roads) == len(own) and set(roads["dataset"]) == {"synthetic"}
    assert (roads["source_id"] == "synthetic/" + own["source_id"]).all()
    assert (roads[["split", "label", "height", "width"]].to_numpy() == own[["split", "label", "height", "width"]].to_numpy()).all()
    for (_, a), (_, b) in zip(roads.iterrows(), own.iterrows()):
        assert (tmp_path / "prepared/roads" / a["image"]).read_bytes() == (tmp_path / "prepared/synthetic" / b["image"]).read_bytes()
    counts = json.loads((tmp_path / "prepared/roads/counts.json").read_text())
    assert counts["sources"]["synthetic"]["train"] == int((own["split"] == "train").sum())


def test_roads_without_a_prepared_source_says_which_stage_to_run(tmp_path):
    cfg = _cfg(tmp_path)
    prepare(cfg, "synthetic")
    with pytest.raises(DataError, match=r"deepcrack/manifest.csv: .*deepcrack, cfd, crack500; run `dvc repro "
                                        r"prepare@deepcrack` `dvc repro prepare@cfd` `dvc repro prepare@crack500`"):
        prepare(cfg, "roads")
    assert not (tmp_path / "prepared" / "roads").exists()


@pytest.mark.parametrize("dataset, fake", [("deepcrack", _fake_deepcrack), ("cfd", _fake_cfd), ("crack500", _fake_crack500)])
def test_val_photos_are_the_raw_photos_of_the_val_rows_at_their_own_size(tmp_path, dataset, fake):
    from wpcrack.evaluate.generalise import photos

    fake(tmp_path / "raw" / dataset)
    cfg = dataclasses.replace(_cfg(tmp_path), dataset=dataset)
    df = load_manifest(prepare(cfg, dataset))
    val = photos(cfg, "val")
    sources = set(df[df.split == "val"].source_id)
    names = {image.stem for image, _ in val}
    assert val and all(image.is_file() and mask.stem == image.stem for image, mask in val)
    assert {df[df.image.str.contains(n, regex=False)].split.iloc[0] for n in names} == {"val"}
    assert len({n for n in names}) == len(val) and sources  # one entry per photo, none of train or test
    h, w = cv2.imread(str(val[0][0])).shape[:2]
    assert (h, w) == cv2.imread(str(val[0][1]), cv2.IMREAD_GRAYSCALE).shape and h not in (16, 24)  # not the rows' size
