"""download: mirror copies and file:// fetches of tiny archives, checksums, pins, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from wpcrack.cli import main
from wpcrack.data import sources
from wpcrack.data.sources import MARKER, DatasetSpec, Source, download, listing_sha256
from wpcrack.errors import DataError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(path: Path, value: int = 0, shape=(8, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))


@pytest.fixture
def tiny_zip(tmp_path: Path) -> Path:
    """A DeepCrack-shaped archive: two folders of one file each, in a mirror folder."""
    src = tmp_path / "src"
    _png(src / "train_img" / "a.png", 10)
    _png(src / "train_lab" / "a.png", 255)
    archive = tmp_path / "mirror" / "Tiny" / "tiny.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f.relative_to(src).as_posix())
    return archive


def _spec(archive: Path, sha: str | None, original_sha: str | None = "unused", **kw) -> DatasetSpec:
    return DatasetSpec(
        name="deepcrack", title="tiny", licence="test", unpack="zip",
        original=Source(archive.parent.as_uri(), {archive.name: original_sha}),
        mirror=Source("Tiny", {archive.name: sha}),
        layout={"train_img": 1, "train_lab": 1}, **kw,
    )


def test_mirror_copy_verifies_unpacks_and_is_idempotent(tiny_zip, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sources.DATASETS, "deepcrack", _spec(tiny_zip, _sha(tiny_zip)))
    raw = tmp_path / "raw"
    download(["deepcrack"], raw, mirror=tmp_path / "mirror")
    assert (raw / "deepcrack" / "train_img" / "a.png").is_file()
    marker = json.loads((raw / "deepcrack" / MARKER).read_text())
    assert marker["source"] == "mirror" and marker["sha256"] == {"tiny.zip": _sha(tiny_zip)}
    stamp = (raw / "deepcrack" / MARKER).stat().st_mtime_ns
    download(["deepcrack"], raw, mirror=tmp_path / "mirror")
    assert "up to date" in capsys.readouterr().out
    assert (raw / "deepcrack" / MARKER).stat().st_mtime_ns == stamp


def test_checksum_mismatch_names_file_and_writes_nothing(tiny_zip, tmp_path, monkeypatch):
    monkeypatch.setitem(sources.DATASETS, "deepcrack", _spec(tiny_zip, "0" * 64))
    raw = tmp_path / "raw"
    with pytest.raises(DataError, match=r"tiny\.zip: checksum mismatch") as err:
        download(["deepcrack"], raw, mirror=tmp_path / "mirror")
    assert "\n" not in str(err.value)
    assert not (raw / "deepcrack").exists()
    assert [p.name for p in raw.iterdir()] == []  # no temporary leftovers either


def test_failed_force_keeps_previous_download(tiny_zip, tmp_path, monkeypatch):
    spec = _spec(tiny_zip, _sha(tiny_zip))
    monkeypatch.setitem(sources.DATASETS, "deepcrack", spec)
    raw = tmp_path / "raw"
    download(["deepcrack"], raw, mirror=tmp_path / "mirror")
    monkeypatch.setitem(sources.DATASETS, "deepcrack", dataclasses.replace(spec, layout={"train_img": 5}))
    with pytest.raises(DataError, match="expected 5 files after unpacking, found 1"):
        download(["deepcrack"], raw, mirror=tmp_path / "mirror", force=True)
    assert (raw / "deepcrack" / "train_lab" / "a.png").is_file()  # old output untouched


def test_content_digest_is_checked(tiny_zip, tmp_path, monkeypatch):
    spec = _spec(tiny_zip, _sha(tiny_zip), content_sha256="f" * 64)
    monkeypatch.setitem(sources.DATASETS, "deepcrack", spec)
    with pytest.raises(DataError, match="listing sha256 mismatch"):
        download(["deepcrack"], tmp_path / "raw", mirror=tmp_path / "mirror")


def test_missing_mirror_file(tmp_path, monkeypatch, tiny_zip):
    monkeypatch.setitem(sources.DATASETS, "deepcrack", _spec(tiny_zip, _sha(tiny_zip)))
    tiny_zip.unlink()
    with pytest.raises(DataError, match=r"tiny\.zip: file not found in the mirror"):
        download(["deepcrack"], tmp_path / "raw", mirror=tmp_path / "mirror")
    assert not (tmp_path / "raw" / "deepcrack").exists()


@pytest.mark.parametrize("member", ["../escaped.txt", "train_img/../../escaped.txt", "ABSOLUTE"])
def test_zip_slip_member_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys, member):
    """A malicious archive (a member escaping the output folder) stops the download with a clear
    error before anything is extracted: no file outside the target, no partial target."""
    if member == "ABSOLUTE":
        member = str(tmp_path / "escaped.txt")
    archive = tmp_path / "mirror" / "Tiny" / "evil.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train_img/a.png", b"harmless member first")
        zf.writestr(zipfile.ZipInfo(member), b"written outside the target")  # ZipInfo keeps the name as is
    with zipfile.ZipFile(archive) as zf:
        assert member in zf.namelist()
    monkeypatch.setitem(sources.DATASETS, "deepcrack", _spec(archive, _sha(archive)))
    raw = tmp_path / "raw"

    with pytest.raises(DataError, match=r"evil\.zip: unsafe member path .* in archive") as err:
        download(["deepcrack"], raw, mirror=tmp_path / "mirror")
    assert repr(member) in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.rglob("escaped.txt")) == []  # nothing escaped, wherever it aimed
    assert list(raw.iterdir()) == []  # no target, no partial or temporary folder
    assert main(["download", "deepcrack", "--mirror", str(tmp_path / "mirror"), "--data-dir", str(tmp_path)]) == 2
    assert "unsafe member path" in capsys.readouterr().err  # the CLI prints it, exit 2
    assert list(tmp_path.rglob("escaped.txt")) == [] and list(raw.iterdir()) == []


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(DataError, match="nope: unknown dataset; valid: deepcrack, cfd, crack500, synthetic"):
        download(["nope"], tmp_path / "raw")


def test_original_fetch_pins_checksum_on_first_download(tiny_zip, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sources.DATASETS, "deepcrack", _spec(tiny_zip, None, original_sha=None))
    raw = tmp_path / "raw"
    download(["deepcrack"], raw)  # file:// URL through the same urllib path as https
    marker = json.loads((raw / "deepcrack" / MARKER).read_text())
    assert marker["source"] == "original"
    assert marker["pins"]["original"] == {"tiny.zip": _sha(tiny_zip)}
    assert "pinned sha256" in capsys.readouterr().err
    with zipfile.ZipFile(tiny_zip, "a") as zf:  # the upstream archive changes
        zf.writestr("extra.txt", "x")
    with pytest.raises(DataError, match="value pinned at first download"):
        download(["deepcrack"], raw, force=True)
    assert (raw / "deepcrack" / "train_img" / "a.png").is_file()


def test_fetch_error_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="download failed"):
        sources.fetch((tmp_path / "absent.zip").as_uri(), tmp_path / "out.zip")


def test_crack500_original_explains_the_mirror_route(tmp_path):
    with pytest.raises(DataError, match="cloud drives.*--mirror"):
        download(["crack500"], tmp_path / "raw")


def test_synthetic_download_is_a_no_op(tmp_path):
    download(["synthetic"], tmp_path / "raw")
    assert not (tmp_path / "raw" / "synthetic").exists()


def test_cfd_mat_is_converted_to_png_masks(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "CFD"
    seg = np.ones((6, 9), np.uint8)
    seg[2, :] = 2
    seg[4, 1:3] = 3  # enclosed background: not crack
    seg[5, 5] = 4
    (mirror / "groundTruth").mkdir(parents=True)
    scipy.io.savemat(mirror / "groundTruth" / "001.mat", {"groundTruth": {"Segmentation": seg, "Boundaries": seg == 2}})
    (mirror / "image").mkdir()
    cv2.imwrite(str(mirror / "image" / "001.jpg"), np.zeros((6, 9, 3), np.uint8))
    files = {rel: _sha(mirror / rel) for rel in ("image/001.jpg", "groundTruth/001.mat")}
    spec = DatasetSpec(name="cfd", title="t", licence="t", unpack="cfd", mirror=Source("CFD", files),
                       layout={"images": 1, "masks": 1})
    monkeypatch.setitem(sources.DATASETS, "cfd", spec)
    download(["cfd"], tmp_path / "raw", mirror=tmp_path / "mirror")
    mask = cv2.imread(str(tmp_path / "raw" / "cfd" / "masks" / "001.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask, (seg == 2).astype(np.uint8) * 255)
    assert (tmp_path / "raw" / "cfd" / "images" / "001.jpg").read_bytes() == (mirror / "image" / "001.jpg").read_bytes()


def test_cfd_corrupt_mat_is_named(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "CFD"
    (mirror / "groundTruth").mkdir(parents=True)
    (mirror / "groundTruth" / "001.mat").write_bytes(b"not a mat file")
    spec = DatasetSpec(name="cfd", title="t", licence="t", unpack="cfd",
                       mirror=Source("CFD", {"groundTruth/001.mat": _sha(mirror / "groundTruth" / "001.mat")}))
    monkeypatch.setitem(sources.DATASETS, "cfd", spec)
    with pytest.raises(DataError, match=r"001\.mat: cannot read CFD ground truth"):
        download(["cfd"], tmp_path / "raw", mirror=tmp_path / "mirror")
    assert not (tmp_path / "raw" / "cfd").exists()


def test_listing_digest_matches_sha256sum_format(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("x")
    (tmp_path / "a.txt").write_text("a")
    lines = "".join(f"{_sha(tmp_path / f)}  {f}\n" for f in ("a.txt", "b/x.txt"))
    assert listing_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()


def test_registry_records_sources_and_mirror_checksums():
    for name in ("deepcrack", "cfd", "crack500"):
        spec = sources.DATASETS[name]
        assert spec.original is not None and spec.original.base.startswith("https://")
        assert spec.mirror is not None and spec.mirror.files
        assert all(s and len(s) == 64 for s in spec.mirror.files.values())
        assert spec.layout
    assert len(sources.DATASETS["cfd"].mirror.files) == 236
    assert "ed57c2d96754e6c7d105805cd29aeeb3a799f267" in sources.DATASETS["cfd"].original.base


def test_cli_download_errors_exit_2(tiny_zip, tmp_path, monkeypatch, capsys):
    assert main(["download", "nope", "--data-dir", str(tmp_path)]) == 2
    capsys.readouterr()
    monkeypatch.setitem(sources.DATASETS, "deepcrack", _spec(tiny_zip, "0" * 64))
    code = main(["download", "deepcrack", "--mirror", str(tmp_path / "mirror"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tiny.zip: checksum mismatch" in err
    assert main(["download", "deepcrack", "--mirror", str(tmp_path / "absent"), "--data-dir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_real_mirror_download(tmp_path):
    mirror = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    if not mirror.is_dir():
        pytest.skip("no dataset mirror")
    download(["deepcrack", "cfd", "crack500"], tmp_path / "raw", mirror=mirror)
    assert len(list((tmp_path / "raw" / "cfd" / "masks").glob("*.png"))) == 118
