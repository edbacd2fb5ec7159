"""The typed view of params.yaml: resolution order and loud failures."""

import dataclasses
from pathlib import Path

import pytest

from wpcrack.cli import main
from wpcrack.config import ConfigError, deep_merge, list_runs, load_config, parse_override, read_params, resolve

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_every_run_and_profile_in_params_resolves():
    raw = read_params(PARAMS)
    for key, run in list_runs(PARAMS).items():
        cfg = resolve(raw, run["dataset"], run["variant"])
        assert cfg.dataset == run["dataset"] and cfg.variant == run["variant"], key
    for profile in raw["profiles"]:
        assert resolve(raw, "deepcrack", profile=profile).profile == profile


def test_resolution_order_base_profile_variant_override():
    raw = {
        "datasets": {"deepcrack": {"profile": "p"}},
        "train": {"epochs": 1, "lr": 0.1},
        "profiles": {"p": {"train": {"epochs": 2}}},
        "variants": {"full": {}, "v": {"train": {"epochs": 3, "adversarial": False}}},
    }
    assert resolve(raw, "deepcrack").train.epochs == 2
    cfg = resolve(raw, "deepcrack", "v", overrides=["train.epochs=4"])
    assert (cfg.train.epochs, cfg.train.adversarial, cfg.train.lr) == (4, False, 0.1)


def test_dataset_overrides_apply_under_their_profile_only():
    raw = {
        "datasets": {"cfd": {"profile": "p", "overrides": {"p": {"train": {"epochs": 5}}, "q": {"train": {"lr": 9.0}}}},
                     "deepcrack": {"profile": "p"}},
        "train": {"epochs": 1, "lr": 0.1},
        "profiles": {"p": {"train": {"epochs": 2}}, "q": {}},
        "variants": {"full": {}, "v": {"train": {"adversarial": False}}, "w": {"train": {"epochs": 7}}},
    }
    assert resolve(raw, "cfd").train.epochs == 5 and resolve(raw, "cfd").train.lr == 0.1
    assert resolve(raw, "deepcrack").train.epochs == 2
    assert resolve(raw, "cfd", "v").train.epochs == 5  # dataset < variant < command line
    assert resolve(raw, "cfd", "w").train.epochs == 7
    assert resolve(raw, "cfd", overrides=["train.epochs=6"]).train.epochs == 6
    other = resolve(raw, "cfd", profile="q")
    assert other.train.epochs == 1 and other.train.lr == 9.0
    raw["datasets"]["cfd"]["overrides"]["p"] = {"train": {"epoch": 5}}
    with pytest.raises(ConfigError, match="unknown key"):
        resolve(raw, "cfd")
    raw["datasets"]["cfd"]["overrides"]["p"] = {"profiles": {}}
    with pytest.raises(ConfigError, match="cannot be overridden per dataset"):
        resolve(raw, "cfd")


def test_paper_profile_is_resnet38d_256_batch4_200_epochs():
    cfg = load_config(PARAMS, "deepcrack", profile="paper")
    assert (cfg.model.backbone, cfg.train.crop_size, cfg.train.batch_size, cfg.train.epochs) == (
        "resnet38d", 256, 4, 200)


def test_ablation_variants_match_table1_switches():
    rows = {v: load_config(PARAMS, "deepcrack", v) for v in ("cls_det", "rec", "rec_ceccm", "full")}
    switches = {v: (c.model.detector_inputs, c.ceccm.enabled, c.model.paam) for v, c in rows.items()}
    assert switches == {
        "cls_det": ("cls", False, False),
        "rec": ("cls+rec", False, False),
        "rec_ceccm": ("cls+rec", True, False),
        "full": ("cls+rec", True, True),
    }


def test_seed_suffix_repeats_a_variant_with_another_train_seed():
    rec, repeat = load_config(PARAMS, "deepcrack", "rec"), load_config(PARAMS, "deepcrack", "rec-seed2")
    assert repeat.variant == "rec-seed2" and repeat.train.seed == 2 and rec.train.seed != 2
    assert dataclasses.replace(repeat, variant="rec", train=rec.train) == rec  # nothing else differs
    assert load_config(PARAMS, "deepcrack", "full-seed1", overrides=["train.seed=5"]).train.seed == 5
    with pytest.raises(ConfigError, match="unknown variant 'nope-seed1'.*<variant>-seed<N>"):
        load_config(PARAMS, "deepcrack", "nope-seed1")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key(s) epoch"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.lr=true", "train.lr: expected a number"),
        ("model.backbone=vgg", "model.backbone: 'vgg' is not one of"),
        ("ceccm.mode=other", "ceccm.mode"),
        ("nosection.x=1", "unknown key(s) nosection"),
        ("train.epochs", "expected section.key=value"),
        ("train.lr=0", "params.yaml: train.lr: 0.0 must be > 0"),
        ("train.epochs=0", "train.epochs: 0 (fine-tuning alone, from ImageNet) needs train.finetune_epochs > 0"),
        ("train.epochs=-1", "train.epochs: -1 must be >= 0"),
        ("evaluate.threshold=1.5", "evaluate.threshold: 1.5 must be in (0, 1)"),
        ("pseudo_labels.cam_scales=[1.0,0]", "pseudo_labels.cam_scales: (1.0, 0.0) must be > 0"),
        ("pseudo_labels.darkness.block=1", "pseudo_labels.darkness.block: 1 must be >= 3"),
        ("train.ema_decay=1", "train.ema_decay: 1.0 must be in "),
        ("evaluate.tile_overlap=256", "evaluate.tile_overlap: 256 must be smaller than evaluate.tile_size (256)"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(PARAMS, "deepcrack", overrides=[override])


def test_unknown_dataset_variant_profile():
    with pytest.raises(ConfigError, match="unknown dataset 'kitti'"):
        load_config(PARAMS, "kitti")
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        load_config(PARAMS, "deepcrack", "nope")
    with pytest.raises(ConfigError, match="unknown profile 'gpu'"):
        load_config(PARAMS, "deepcrack", profile="gpu")


def test_missing_params_file_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["train", "deepcrack", "--params", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: parameter file not found" in err and len(err.strip().splitlines()) == 1


def test_helpers():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert deep_merge({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}}


def test_the_roads_run_labels_each_source_with_that_sources_own_overrides():
    cfg = load_config(PARAMS, "roads")
    cfd = load_config(PARAMS, "cfd").pseudo_labels
    deepcrack = load_config(PARAMS, "deepcrack").pseudo_labels
    assert cfg.prepare.roads.sources == ("deepcrack", "cfd", "crack500")
    for source, own in (("cfd", cfd), ("deepcrack", deepcrack)):
        merged = cfg.pseudo_labels.of_source(source)
        assert dataclasses.replace(merged, by_source={}) == dataclasses.replace(own, by_source={})
    assert cfg.train.source_weights and cfg.train.max_steps_per_epoch
    assert load_config(PARAMS, "cfd").pseudo_labels.by_source == {}  # single-source runs: nothing to merge


@pytest.mark.parametrize("override, message", [
    ("train.source_weights={deepcrack: -1, cfd: 1, crack500: 1}", "train.source_weights.deepcrack: -1 must be a number >= 0"),
    ("train.source_weights={deepcrack: 0, cfd: 0, crack500: 0}", "at least one weight must be > 0"),
    ("train.max_steps_per_epoch=null", "train.source_weights needs train.max_steps_per_epoch"),
    ("prepare.roads.sources=[deepcrack, roads]", "prepare.roads.sources: 'roads'"),
])
def test_bad_roads_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PARAMS, "roads", overrides=[override])
