"""train(): outputs, exact resume after a kill, NaN handling (the smoke profile learning: test_end_to_end)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from wpcrack.config import load_config
from wpcrack.data.datasets import WeakDataset
from wpcrack.data.prepare import prepare
from wpcrack.errors import TrainingError
from wpcrack.models.wpcracknet import build_model
from wpcrack.train import checkpoint, loop, phases
from wpcrack.train.loop import train

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY_DATA = ["prepare.synthetic.size=64", "prepare.synthetic.train_crack=6", "prepare.synthetic.train_nocrack=6",
             "prepare.synthetic.val_crack=2", "prepare.synthetic.val_nocrack=2", "prepare.synthetic.test=2"]
TINY_RUN = ["model.cam_channels=16", "model.paam_channels=8", "model.paam_reduction=4", "model.detector_channels=8",
            "model.decoder_channels=8", "train.epochs=3", "train.batch_size=4", "train.crop_size=32",
            "train.max_steps_per_epoch=2", "pseudo_labels.workers=0", "pseudo_labels.iterations=2",
            "pseudo_labels.min_pixels=0", "train.detector_warmup_epochs=0"]


def _cfg(data: Path, *overrides: str):
    return load_config(PARAMS, dataset="synthetic", overrides=[f"paths.data={data}", *TINY_DATA, *TINY_RUN, *overrides])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("tiny") / "data"
    prepare(_cfg(data), "synthetic")
    return data


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def test_outputs(tiny_data, tmp_path):
    metrics = train(_cfg(tiny_data), tmp_path, track=False)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "checkpoint.pt", "best.pt", "config.yaml", "train_metrics.json", "history.csv"}
    assert (tmp_path / "config.yaml").read_text().startswith("# git commit: ")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 3
    assert json.loads((tmp_path / "train_metrics.json").read_text()) == metrics
    assert metrics["epochs"] == 3 and metrics["steps"] == 6 and 1 <= metrics["best_epoch"] <= 3
    assert metrics["train_seconds"] >= sum(float(r["epoch_s"]) for r in csv.DictReader((tmp_path / "history.csv").open())) * 0.999 > 0
    assert metrics["hardware"].startswith(("CPU", "1x", "2x"))
    assert set(metrics["timing"]) >= {"s_per_iter", "rec_s", "cls_s", "det_s", "crf_wait_s", "crf_wait_share"}
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["val_score"] and r["pseudo_label_iou"] for r in rows)
    best = checkpoint.load(tmp_path / "best.pt")
    assert best["epoch"] == metrics["best_epoch"] and best["config"]["variant"] == "full"
    model = build_model(_cfg(tiny_data))
    model.load_state_dict(best["model"])  # evaluate's loader does the same


class Killed(Exception):
    pass


IMAGE_LABELS = ("pseudo_labels.source=image", "pseudo_labels.method=darkness", "pseudo_labels.refresh_epochs=2",
                "pseudo_labels.darkness.block=15", "pseudo_labels.darkness.min_area=4")


def _kill_in_epoch_two(monkeypatch, cfg, out: Path) -> None:
    calls = {"n": 0}
    real_step = loop.train_step

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second step of epoch 2, after epoch 1's checkpoint
            raise Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", killed)
    with pytest.raises(Killed):
        train(cfg, out, track=False)
    monkeypatch.setattr(loop, "train_step", real_step)
    assert checkpoint.load(out / "checkpoint.pt")["run"]["epoch"] == 1


@pytest.mark.parametrize(("overrides", "resume"), [((), True), (IMAGE_LABELS, None), (("train.ema_decay=0.5",), None)],
                         ids=["--resume", "dvc-stage-default-with-whole-image-labels", "with-weight-average"])
def test_resume_after_a_kill_ends_with_the_same_weights(tiny_data, tmp_path, monkeypatch, overrides, resume):
    """``resume=None`` is what ``dvc repro train@<run>`` runs (no flag): it must continue by itself.
    With whole-image labels remade every 2 epochs, the labels of epoch 1 travel in the checkpoint."""
    cfg = _cfg(tiny_data, *overrides)
    straight_metrics = train(cfg, tmp_path / "straight", track=False)
    assert straight_metrics["resumed_from_epoch"] == 0
    _kill_in_epoch_two(monkeypatch, cfg, tmp_path / "resumed")
    resumed_metrics = train(cfg, tmp_path / "resumed", resume=resume, track=False)
    assert resumed_metrics["resumed_from_epoch"] == 1
    assert json.loads((tmp_path / "resumed" / "train_metrics.json").read_text())["resumed_from_epoch"] == 1
    for key in ("val_score", "best_epoch", "best", "pseudo_label_iou"):
        assert resumed_metrics[key] == straight_metrics[key], key


    for name in ("checkpoint.pt", "best.pt"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    straight, resumed = (list(csv.DictReader((tmp_path / d / "history.csv").open())) for d in ("straight", "resumed"))
    timing = {"s_per_iter", "crf_wait_share", "epoch_s", "relabel_s", *loop.TIMING_KEYS}
    assert [{k: v for k, v in r.items() if k not in timing} for r in straight] == [
        {k: v for k, v in r.items() if k not in timing} for r in resumed]


FINETUNE = ("train.finetune_epochs=2", "train.finetune_crop_size=48", *IMAGE_LABELS)


def test_finetuning_starts_from_the_best_model_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """Fine-tuning epochs follow the three-phase ones, start from best.pt and are selected like
    them; killed inside fine-tuning, the run continues to the same weights."""
    cfg = _cfg(tiny_data, *FINETUNE)
    real_labels, real_step = loop.finetune.make_labels, loop.finetune.finetune_step
    started_from = {}

    def spy(model, dataset, *args):
        best = checkpoint.load(tmp_path / "straight" / "best.pt")["model"]
        started_from["best"] = all(torch.equal(best[k], v) for k, v in model.state_dict().items())
        return real_labels(model, dataset, *args)

    monkeypatch.setattr(loop.finetune, "make_labels", spy)
    straight = train(cfg, tmp_path / "straight", track=False)
    monkeypatch.setattr(loop.finetune, "make_labels", real_labels)
    assert started_from == {"best": True}
    assert straight["epochs"] == 5 and straight["steps"] == 10
    rows = list(csv.DictReader((tmp_path / "straight" / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5] and all(r["val_score"] for r in rows)
    assert rows[3]["cls_total"] and rows[3]["det_total"] and not rows[3].get("rec_total")

    calls = {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # second step of fine-tuning epoch 1 (epoch 4)
            raise Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop.finetune, "finetune_step", killed)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed", track=False)
    monkeypatch.setattr(loop.finetune, "finetune_step", real_step)
    resumed = train(cfg, tmp_path / "resumed", track=False)
    assert resumed["resumed_from_epoch"] == 3
    for key in ("val_score", "best_epoch", "best"):
        assert resumed[key] == straight[key], key
    for name in ("checkpoint.pt", "best.pt"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_weight_averaging_keeps_the_average_and_leaves_the_training_path_alone(tiny_data, tmp_path):
    """With ``ema_decay`` best.pt holds averaged weights (not those of any epoch's end), while the
    live weights train exactly as without averaging."""
    plain = train(_cfg(tiny_data), tmp_path / "plain", track=False)
    averaged = train(_cfg(tiny_data, "train.ema_decay=0.5"), tmp_path / "ema", track=False)
    live_plain, live_ema = _weights(tmp_path / "plain" / "checkpoint.pt"), _weights(tmp_path / "ema" / "checkpoint.pt")
    assert all(torch.equal(live_plain[k], live_ema[k]) for k in live_plain)
    shadow = checkpoint.load(tmp_path / "ema" / "checkpoint.pt")["average"]
    assert shadow["updates"] == averaged["steps"] == plain["steps"]
    best = _weights(tmp_path / "ema" / "best.pt")
    float_keys = [k for k in best if best[k].is_floating_point()]
    if averaged["best_epoch"] == averaged["epochs"]:
        assert all(torch.equal(best[k], shadow["shadow"][k]) for k in best)
    assert any(not torch.equal(best[k], live_ema[k]) for k in float_keys)
    assert "average" not in checkpoint.load(tmp_path / "plain" / "checkpoint.pt")


def test_the_supervised_recipe_alone_fine_tunes_from_imagenet(tiny_data, tmp_path, monkeypatch):
    """``epochs: 0`` (supervised only): every epoch is a fine-tuning epoch, from the initial weights."""
    cfg = _cfg(tiny_data, "train.epochs=0", "train.detector_target=mask", *FINETUNE[:2])
    real_labels = loop.finetune.make_labels
    initial = {}

    def spy(model, dataset, *args):
        initial["untouched"] = not (tmp_path / "best.pt").exists()
        return real_labels(model, dataset, *args)

    monkeypatch.setattr(loop.finetune, "make_labels", spy)
    metrics = train(cfg, tmp_path, track=False)
    assert initial == {"untouched": True} and metrics["epochs"] == 2
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(r["det_total"] and not r.get("rec_total") for r in rows)
    assert (tmp_path / "best.pt").is_file()


def test_a_checkpoint_of_other_code_or_a_finished_run_is_not_resumed(tiny_data, tmp_path, monkeypatch, capsys):
    cfg = _cfg(tiny_data, "train.epochs=2")
    _kill_in_epoch_two(monkeypatch, cfg, tmp_path)
    monkeypatch.setattr(checkpoint, "code_fingerprint", lambda: "edited")
    with pytest.raises(TrainingError, match="the training code changed"):
        train(cfg, tmp_path, resume=True, track=False)
    assert train(cfg, tmp_path, track=False)["resumed_from_epoch"] == 0
    assert "the training code changed since it was written: training from scratch" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "checkpoint.pt")["fingerprints"]["code"] == "edited"
    assert train(cfg, tmp_path, track=False)["resumed_from_epoch"] == 0  # finished: `dvc repro -f` retrains
    assert "its run finished (2 of 2 epochs)" in capsys.readouterr().err


def test_fresh_ignores_an_unfinished_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_data, "train.epochs=2")
    _kill_in_epoch_two(monkeypatch, cfg, tmp_path)
    assert train(cfg, tmp_path, resume=False, track=False)["resumed_from_epoch"] == 0


def test_resume_refuses_another_configuration(tiny_data, tmp_path):
    train(_cfg(tiny_data, "train.epochs=1"), tmp_path, track=False)
    with pytest.raises(TrainingError, match="train.lr"):
        train(_cfg(tiny_data, "train.epochs=1", "train.lr=0.5"), tmp_path, resume=True, track=False)


def test_nan_loss_stops_with_the_epoch_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real = phases.classifier_loss
    calls = {"n": 0}

    def nan_in_epoch_two(*args):
        calls["n"] += 1
        total, parts = real(*args)
        return (total * math.nan, parts) if calls["n"] == 3 else (total, parts)

    monkeypatch.setattr(phases, "classifier_loss", nan_in_epoch_two)
    with pytest.raises(TrainingError, match=r"epoch 2, step 1: classifier loss is not finite.*epoch 1"):
        train(_cfg(tiny_data), tmp_path, track=False)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["run"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert (tmp_path / "best.pt").is_file()


def test_selection_prefers_a_learning_detector_to_an_empty_one():
    """CFD picked an epoch-1 detector that marked nothing: its clean no-crack images outscored a real one."""
    seen, cls_right = [10, 10], [9, 10]
    empty = loop.selection_terms([0, 0, 500], cls_right, seen, clean=10, fired=0)
    learning = loop.selection_terms([150, 200, 150], cls_right, seen, clean=7, fired=10)
    assert empty == {"val_agreement_iou": 0.0, "val_cls_accuracy": 0.95, "val_det_accuracy": 0.5}
    assert learning["val_agreement_iou"] == pytest.approx(0.3)
    assert learning["val_det_accuracy"] == pytest.approx(0.85)
    assert sum(learning.values()) > sum(empty.values())
    painter = loop.selection_terms([500, 4000, 0], cls_right, seen, clean=0, fired=10)
    assert painter["val_det_accuracy"] == 0.5


def test_selection_leaves_out_a_class_without_val_images():
    terms = loop.selection_terms([1, 1, 0], [0, 3], [0, 4], clean=0, fired=2)
    assert terms == {"val_agreement_iou": 0.5, "val_cls_accuracy": 0.75, "val_det_accuracy": 0.5}


def test_the_supervised_variant_selects_on_val_masks_the_weak_model_never(tiny_data):
    from wpcrack.method.pseudo_labels import CRFPool

    val = WeakDataset(tiny_data / "prepared/synthetic/manifest.csv", "val")
    runtime = phases.Runtime(torch.device("cpu"))
    for target in ("mask", "pseudo"):
        cfg = _cfg(tiny_data, f"train.detector_target={target}")
        torch.manual_seed(0)
        with CRFPool(cfg.pseudo_labels) as pool:
            row, _ = loop.validate(build_model(cfg), val, cfg, runtime, pool)
        terms = [row[k] for k in ("val_agreement_iou", "val_cls_accuracy", "val_det_accuracy")]
        expected = row["val_diag_det_iou"] if target == "mask" else sum(terms) / 3
        assert row["val_score"] == pytest.approx(expected), target


def test_source_weights_give_each_source_its_share_of_the_draws():
    from wpcrack.errors import ConfigError

    weights = loop.source_row_weights(["a"] * 30 + ["b"] * 10, {"a": 1.0, "b": 3.0})
    assert weights[:30].sum().item() == pytest.approx(0.25) and weights[30:].sum().item() == pytest.approx(0.75)
    drawn = torch.multinomial(weights, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert (drawn >= 30).float().mean().item() == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ConfigError, match="no weight for source"):
        loop.source_row_weights(["a", "c"], {"a": 1.0})


def test_a_weighted_run_takes_max_steps_per_epoch_draws(tiny_data, tmp_path):
    cfg = _cfg(tiny_data.parent / "data", "train.epochs=2", "train.max_steps_per_epoch=3",
               "train.source_weights={synthetic: 1.0}")
    out = train(cfg, tmp_path / "weighted", track=False)
    assert out["steps"] == 6 and out["epochs"] == 2
