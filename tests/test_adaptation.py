"""The adaptation experiment's pieces: tagged batches, the control, the field set and the figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wpcrack.data.field import field_photos
from wpcrack.data.prepare import Item
from wpcrack.errors import DataError
from wpcrack.evaluate import adaptation
from wpcrack.io import list_images, read_image, write_image
from test_pipelines import prefect_server  # noqa: F401


def _photos(folder: Path, n: int = 8, h: int = 60, w: int = 90) -> list[Item]:
    """Photos whose crack (a dark vertical band) sits in the left third; every third one has none."""
    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        rgb = rng.integers(100, 160, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if i % 3:
            mask[:, 10 + i:13 + i] = 255
            rgb[mask > 0] = 30
        write_image(folder / "img" / f"p{i}.jpg", rgb)
        write_image(folder / "lab" / f"p{i}.png", mask)
        items.append(Item(f"p{i}", folder / "img" / f"p{i}.jpg", folder / "lab" / f"p{i}.png", f"s{i}"))
    return items


def test_a_crack_free_window_has_no_crack_pixel():
    mask = np.zeros((60, 90), bool)
    mask[:, 5:8] = True
    y, x, h, w = adaptation.crack_free_window(mask)
    assert (h, w) == (30, 45) and not mask[y:y + h, x:x + w].any()
    mask[:, 44:47] = True  # no half-size window is free; a third-size one is
    y, x, h, w = adaptation.crack_free_window(mask)
    assert (h, w) == (20, 30) and not mask[y:y + h, x:x + w].any()
    assert adaptation.crack_free_window(np.ones((60, 90), bool)) is None


def test_batch_tags_follow_the_masks_and_the_control_shuffles_them(tmp_path):
    photos = _photos(tmp_path / "src")
    batch = adaptation.make_batch(photos, 6, tmp_path / "batch", seed=1)
    assert batch == {"images": 6, "crack": 3, "no_crack": 3, "tags_right": 1.0, "shuffled": False}
    for path in list_images(tmp_path / "batch" / "no_crack"):
        assert path.stem.endswith("_free") and read_image(path).shape[:2] in ((30, 45), (20, 30))
    for path in list_images(tmp_path / "batch" / "crack"):
        assert read_image(path).shape[:2] == (60, 90)
    control = adaptation.make_batch(photos, 6, tmp_path / "control", seed=1, shuffled=True)
    assert (control["crack"], control["no_crack"]) == (3, 3) and control["tags_right"] < 1
    names = {p.name for p in (tmp_path / "batch").rglob("*.png")}
    assert {p.name for p in (tmp_path / "control").rglob("*.png")} == names and len(names) == 6  # the same images
    with pytest.raises(DataError, match="only 8 of 20 tagged images"):
        adaptation.make_batch(photos, 20, tmp_path / "big")


def test_the_field_set_is_one_the_gate_accepts(tmp_path):
    out = tmp_path / "data" / "field" / adaptation.FIELD_SET
    names = adaptation.make_field_set(_photos(tmp_path / "src"), 4, out, seed=0)
    pairs = field_photos(tmp_path / "data", adaptation.FIELD_SET)  # checked: masks present, same size, 0/255
    assert len(names) == len(pairs) == 4 and all(int(n[1:]) % 3 for n in names)  # photos with cracks only
    with pytest.raises(DataError, match="only 5 of 9 photos with cracks"):
        adaptation.make_field_set(_photos(tmp_path / "src"), 9, tmp_path / "f2")


def test_items_need_the_prepared_split(tmp_path):
    with pytest.raises(DataError, match=r"prepared/crack500/split\.json: not found; run `dvc repro prepare@crack500`"):
        adaptation.items(tmp_path / "data", "train")


def test_the_figures_have_exactly_the_issue_keys_and_the_page_every_arm(tmp_path):
    scores = lambda f, t, b: {"field": f, "target_test": t, "benchmark_test": b}  # noqa: E731
    arms = {
        "tagged": {"batch": {"images": 200, "shuffled": False, "tags_right": 1.0}, "after": scores(50, 44, 69),
                   "decision": "promoted", "minutes": 31.26, "mode": "finetune"},
        "control": {"batch": {"images": 200, "shuffled": True, "tags_right": 0.5}, "after": scores(20, 21, 60),
                    "decision": "kept_champion", "minutes": 30.0, "mode": "finetune"},
        "tagged-50": {"batch": {"images": 50, "shuffled": False, "tags_right": 1.0}, "after": scores(40, 35, 69.2),
                      "decision": "promoted", "minutes": 20.0, "mode": "finetune"},
    }
    figures = adaptation.summary(arms, scores(30, 36, 69.3))
    adaptation.write(tmp_path / "adaptation", {**figures, "field_photos": 20, "hardware": "CPU"}, arms)
    data = json.loads((tmp_path / "adaptation.json").read_text())
    assert set(data) == {"before", "after", "decision", "batch", "mode", "minutes", "control"}
    assert data["after"] == scores(50, 44, 69) and data["control"] == {"decision": "kept_champion",
                                                                         "after": scores(20, 21, 60)}
    assert (data["batch"], data["minutes"], data["decision"]) == (200, 31.3, "promoted")
    page = (tmp_path / "adaptation.md").read_text()
    assert "| after 50 tagged photos | 40.0 | 35.0 | 69.2 | promoted | 20.0 | finetune |" in page
    assert "tags shuffled (50 % right)" in page and "| champion (before) | 30.0 | 36.0 | 69.3 |" in page



def test_the_weekly_mode_writes_the_page_of_record_and_another_mode_its_own():
    from pipelines.adaptation import WEEKLY_MODE, default_out

    assert WEEKLY_MODE == "finetune" and default_out("finetune") == "docs/results/adaptation"
    assert default_out("scratch") == "docs/results/adaptation-scratch"


def test_each_mode_has_its_own_page_and_both_pages_compare_the_modes(tmp_path):
    scores = lambda f, t, b: {"field": f, "target_test": t, "benchmark_test": b}  # noqa: E731
    before = scores(30, 36, 69.3)

    def arm(mode, after, minutes):
        return {"tagged": {"batch": {"images": 200, "shuffled": False, "tags_right": 1.0}, "after": after,
                           "decision": "promoted", "minutes": minutes, "mode": mode}}

    finetune, scratch = arm("finetune", scores(42, 46, 69.6), 12.8), arm("scratch", scores(45, 47, 69.4), 58.04)
    adaptation.write(tmp_path / "adaptation", adaptation.summary(finetune, before), finetune)
    assert "Against the other" not in (tmp_path / "adaptation.md").read_text()  # nothing to compare with yet
    main_json = (tmp_path / "adaptation.json").read_text()
    adaptation.write(tmp_path / "adaptation-scratch", adaptation.summary(scratch, before), scratch)
    assert (tmp_path / "adaptation.json").read_text() == main_json
    page = (tmp_path / "adaptation-scratch.md").read_text()
    assert "`retrain.mode: scratch`" in page
    assert "| scratch | 200 | 45.0 | 47.0 | 69.4 | promoted | 58.0 | this page |" in page
    assert "| finetune | 200 | 42.0 | 46.0 | 69.6 | promoted | 12.8 | [adaptation](adaptation.md) |" in page
    adaptation.write(tmp_path / "adaptation", adaptation.summary(finetune, before), finetune)
    assert "| scratch | 200 | 45.0 | 47.0 | 69.4 | promoted | 58.0 | [adaptation-scratch](adaptation-scratch.md) |" \
        in (tmp_path / "adaptation.md").read_text()

# --- the flow for real (slow: a source project trained, then two retrain flows) ----------------------


def _fake_raw(data: Path) -> None:
    """DeepCrack-, CFD- and CRACK500-shaped raw folders of synthetic crack photos."""
    from wpcrack.data.synthetic import make_image

    def put(image: Path, mask: Path, seed: int, i: int, crack: bool = True) -> None:
        rgb, m = make_image(seed, "train", i, 96, crack)
        write_image(image, rgb)
        write_image(mask, m)

    raw = data / "raw"
    for i in range(12):
        put(raw / "deepcrack" / "train_img" / f"{100 + i}.jpg", raw / "deepcrack" / "train_lab" / f"{100 + i}.png", 1, i,
            crack=i % 4 != 3)
    for i in range(3):
        put(raw / "deepcrack" / "test_img" / f"{300 + i}.jpg", raw / "deepcrack" / "test_lab" / f"{300 + i}.png", 2, i)
    for i in range(1, 4):
        put(raw / "cfd" / "images" / f"{i:03d}.jpg", raw / "cfd" / "masks" / f"{i:03d}.png", 3, i)
    for p in range(10):
        for k in range(3):
            folder, labels = ("train", "label") if p < 7 else ("val", "val_label")
            name = f"2016022{p}_08101{p}_{k * 10}_{k}"
            put(raw / "crack500" / "crack500" / folder / f"{name}.jpg",
                raw / "crack500" / "crack500" / labels / f"{name}.png", 4, 10 * p + k)


@pytest.mark.slow
def test_the_experiment_runs_the_retrain_flow_per_arm_and_leaves_the_project_alone(tmp_path, prefect_server):  # noqa: F811
    import shutil
    import subprocess

    import yaml

    from test_pipelines import REPO, _git_env

    root = tmp_path / "project"
    for rel in ("wpcrack", "pipelines", "data_versions"):
        shutil.copytree(REPO / rel, root / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = {"smoke": {"train": {"epochs": 2, "max_steps_per_epoch": 3, "detector_warmup_epochs": 1}}}
    params["datasets"]["deepcrack"] = {"profile": "smoke", "overrides": tiny}
    params["datasets"]["crack500"] = {"profile": "smoke"}
    params["prepare"]["deepcrack"].update(image_size=64, nocrack_patches=6, nocrack_patch_size=32, val_fraction=0.25)
    params["prepare"]["crack500"].update(image_size=64, nocrack_crops=6, nocrack_crop_size=32)
    params["tracking"]["model_name_prefix"] = "adaptsource"
    params["retrain"].update(mode="scratch", epochs=1)  # the champion from scratch; the arms fine-tune it
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/models/\n/results/\n/.wpcrack/\n/docs/\n")
    _fake_raw(root / "data")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"],
                ["dvc", "commit", "-f", "download"],
                ["dvc", "repro", "prepare@crack500", "evaluate@deepcrack", "calibrate@deepcrack"]):
        done = subprocess.run(cmd, cwd=root, env=_git_env(), capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]} {done.stderr[-3000:]}"
    kept = {p: p.read_bytes() for p in [root / "dvc.lock", *sorted((root / "models").rglob("*"))] if p.is_file()}

    flow = __import__("pipelines.adaptation", fromlist=["run_experiment"])
    figures = flow.run_experiment(str(root), photos=4, sizes=(2,), field=2, mode="finetune", out=str(tmp_path / "out" / "adaptation"))

    data = json.loads((tmp_path / "out" / "adaptation.json").read_text())
    assert data == json.loads(json.dumps(figures))
    assert set(data) == {"before", "after", "decision", "batch", "mode", "minutes", "control"}
    assert (data["batch"], data["mode"]) == (4, "finetune") and data["minutes"] > 0
    for scores in (data["before"], data["after"], data["control"]["after"]):
        assert set(scores) == {"field", "target_test", "benchmark_test"}
        assert all(0 <= v <= 100 for v in scores.values())
    assert {data["decision"], data["control"]["decision"]} <= {"promoted", "kept_champion"}
    assert "| after 2 tagged photos |" in (tmp_path / "out" / "adaptation.md").read_text()
    import mlflow

    from wpcrack.train.continuation import md5

    work = root / ".wpcrack" / "adaptation"
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    champion_md5 = md5(root / "models" / "deepcrack" / "full" / "best.pt")
    for arm in ("tagged", "control", "tagged-2"):  # each arm: its own project and registered model
        versions = client.search_model_versions(f"name = 'adaptation-finetune-{arm}-deepcrack'")
        champion, challenger = sorted(versions, key=lambda v: int(v.version))
        assert challenger.tags["gate_decision"] in ("promoted", "kept_champion")
        assert challenger.tags["weights_md5"] != champion.tags["weights_md5"]  # a new model...
        trained = client.get_run(challenger.run_id).data.params
        assert trained["start.init_md5"] == champion_md5 and trained["train.epochs"] == "1"  # ...continued from it
        manifest = (work / "finetune" / arm / "data" / "incoming" / "deepcrack" / "manifest.csv").read_text().splitlines()
        assert len(manifest) == 1 + {"tagged": 4, "control": 4, "tagged-2": 2}[arm]
        assert all(row.split(",")[13] for row in manifest[1:])  # each stored at the scale predict chose
    assert {p: p.read_bytes() for p in kept} == kept  # the project's own lock and models untouched
