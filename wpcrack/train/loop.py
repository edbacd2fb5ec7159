"""``wpcrack train``: epochs of the three-phase step, validation, checkpoints, metrics, tracking.

Outputs in ``out_dir`` (fixed names, DVC tracks them): ``checkpoint.pt`` (last epoch, for
resuming), ``best.pt`` (best validation score), ``config.yaml`` (resolved config, git commit
in a comment), ``train_metrics.json`` (final and best values, timing, ``resumed_from_epoch``),
``history.csv`` (a row per epoch). Checkpoints are written only at epoch ends, so a killed or
failed run keeps the last good one, and the next ``wpcrack train`` (so ``dvc repro train@<run>``
and the Prefect flows) continues from it by itself when its config, prepared data and training
code fingerprints match (``wpcrack.train.checkpoint``), or says why it starts over. The checkpoint
carries the whole-image pseudo labels too, so the interrupted epoch is replayed exactly: on the CPU
a resumed run ends with the same weights as an uninterrupted one (on a GPU, kernels are not
bitwise deterministic). ``--resume`` insists on resuming, ``--fresh`` never resumes.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its shard of the training split
(``DistributedSampler``, seeded, a new order each epoch) with ``batch_size`` images per process
(global batch = processes x ``batch_size``, and an epoch has 1/processes as many steps); the
gradients of each phase are averaged over the processes (``wpcrack.train.distributed``), each
process runs its own CRF pool (``pseudo_labels.workers`` per process), validation is sharded and
its counts summed, so every process selects the same best epoch; only rank 0 writes files, logs to
MLflow and shows progress. ``--resume`` needs the same number of processes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler

from wpcrack.method.cam import crack_cam
from wpcrack.config import Config
from wpcrack.errors import ConfigError, TrainingError
from wpcrack.io import atomic_path, write_json
from wpcrack.method.pseudo_labels import CRFPool, confusion, iou_of
from wpcrack.train import checkpoint, continuation, finetune, relabel
from wpcrack.train.averaging import WeightAverage, averaged
from wpcrack.train.distributed import World, process_group
from wpcrack.train.optim import Optimizers, build_optimizers, freeze_batchnorm
from wpcrack.train.phases import Batch, Runtime, train_step

TIMING_KEYS = ("rec_s", "cls_s", "det_s", "crf_wait_s", "data_s")
TOTALS = ("rec_total", "cls_total", "det_total")


@dataclass
class RunState:
    """Progress of a run; stored in ``checkpoint.pt`` as plain types."""

    epoch: int = 0  # epochs completed
    step: int = 0  # iterations completed
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # summed over every step of the run (rank 0's)
    world_size: int = 1  # training processes (torchrun); a resumed run needs the same number
    resumed_from_epoch: int = 0  # epochs done when this process took the run over (0: a fresh run)
    start: dict[str, Any] = field(default_factory=dict)  # the model a continued run started from (continuation)


def train(cfg: Config, out_dir: str | Path, resume: bool | None = None, *, track: bool = True,
          start: Path | None = None) -> dict[str, Any]:
    """Train WP-CrackNet (or a variant) on ``data/prepared/<dataset>``; returns train_metrics.json's dict.

    ``resume`` None (the default): continue an unfinished ``out_dir/checkpoint.pt`` of the same
    config, data and code, else start over and say why. True: continue it or fail with the reason.
    False: start over. ``track`` False skips MLflow (tests). Launched by torchrun
    (``WORLD_SIZE`` > 1), it joins the process group (initialised here unless it already is) and
    trains data-parallel. ``start``: the weights a continued run starts from (``wpcrack.train.continuation``;
    None: ImageNet).
    """
    if cfg.dataset is None:
        raise ConfigError("train needs a dataset")
    world = World.from_env()
    with process_group(world):
        return _train(cfg, Path(out_dir), resume, track, world, start)


def _train(cfg: Config, out_dir: Path, resume: bool | None, track: bool, world: World,
           start: Path | None) -> dict[str, Any]:
    from wpcrack.data.datasets import WeakDataset
    from wpcrack.models.wpcracknet import build_model

    out_dir.mkdir(parents=True, exist_ok=True)
    main = world.is_main
    t = cfg.train
    runtime = Runtime.for_config(cfg, world)
    manifest = Path(cfg.paths.data) / "prepared" / cfg.dataset / "manifest.csv"
    train_set = WeakDataset(manifest, "train", crop_size=t.crop_size, augment=True, seed=t.seed)
    val_set = WeakDataset(manifest, "val")

    with _deterministic(runtime):
        _seed_everything(t.seed)
        generator = torch.Generator().manual_seed(t.seed)
        sampler, loader, steps = _loader(train_set, cfg, world, generator, runtime)
        tune_set, tune_sampler, tune_loader, tune_steps = _finetune_data(cfg, manifest, world, generator, runtime)
        model = build_model(cfg)
        if t.freeze_bn:
            freeze_batchnorm(model)
        model.to(runtime.device, memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format)
        optimizers = build_optimizers(model, cfg, max_iterations=t.epochs * steps)
        if t.finetune_epochs:
            optimizers.add_finetune(*finetune.build_optimizer(model, cfg, t.finetune_epochs * tune_steps))
        prints = checkpoint.fingerprints(cfg.to_dict(), manifest)
        if start is not None:
            prints["init"] = continuation.md5(start)
        average = WeightAverage(model, t.ema_decay) if t.ema_decay else None
        run, labels_diag = _take_over(out_dir, cfg, prints, resume, model, optimizers, generator, train_set, world,
                                      average)
        if start is not None and run.epoch == 0:
            run.start = continuation.load_start(model, start)
            if average is not None:
                average.reset(model)
        if tune_set is not None:
            tune_set.pseudo = train_set.pseudo  # resumed inside fine-tuning: its labels came with the checkpoint
        total = t.epochs + t.finetune_epochs
        packed = _pack(train_set.pseudo)  # packed once per relabelling, saved with every checkpoint
        world.broadcast_model(model)  # already equal (same seed); made certain, as DDP does
        commit = _write_config(cfg, out_dir) if main else ""

        with CRFPool(cfg.pseudo_labels) as pool, _tracking(cfg, track and main) as tracker:
            tracker.log_params(cfg.to_dict())
            if run.start:
                tracker.log_params({"start": run.start})
            if world.enabled:
                tracker.log_params({"dist": {"world_size": world.size, "global_batch_size": world.size * t.batch_size}})
            for row in run.history:
                tracker.log_metrics(_numeric(row), step=int(row["epoch"]))
            pool.warm_up()
            examples: list[dict] = []
            for epoch in range(run.epoch, total):
                t_epoch = time.perf_counter()
                tuning = epoch >= t.epochs
                data, data_sampler = (tune_set, tune_sampler) if tuning else (train_set, sampler)
                data.set_epoch(epoch)
                if data_sampler is not None:
                    data_sampler.set_epoch(epoch)
                if epoch == t.epochs:  # the first fine-tuning epoch (the loop reaches it only when there is one)
                    t_relabel = time.perf_counter()
                    if t.epochs:  # epochs 0 (supervised only): fine-tuning starts from ImageNet
                        _load_best(model, out_dir, world)
                        if average is not None:
                            average.reset(model)
                    labels_diag = finetune.make_labels(model, tune_set, cfg, runtime, pool)
                    labels_diag["relabel_s"] = time.perf_counter() - t_relabel
                    train_set.pseudo = tune_set.pseudo
                    packed = _pack(train_set.pseudo)
                elif _relabel_now(cfg, epoch, bool(train_set.pseudo)):
                    t_relabel = time.perf_counter()
                    labels_diag = relabel.refresh(model, train_set, cfg, runtime, pool)
                    labels_diag["relabel_s"] = time.perf_counter() - t_relabel
                    packed = _pack(train_set.pseudo)
                if tuning:
                    step = _averaging(lambda batch: finetune.finetune_step(
                        model, optimizers.finetune, optimizers.schedulers["finetune"], batch, cfg, runtime), average, model)
                    row = _train_epoch(step, tune_loader, tune_steps, runtime, epoch, total, run, out_dir)
                    row["lr"] = optimizers.finetune.param_groups[0]["lr"]
                else:
                    train_detector = epoch >= t.detector_warmup_epochs
                    step = _averaging(lambda batch: train_step(
                        model, optimizers, batch, cfg, runtime, pool, train_detector), average, model)
                    row = _train_epoch(step, loader, steps, runtime, epoch, total, run, out_dir)
                    group = optimizers.classifier.param_groups[0]
                    row["lr"] = t.lr * group["lr"] / group["initial_lr"]
                row |= labels_diag
                if (epoch + 1) % t.val_every == 0 or epoch + 1 == total:
                    with averaged(average, model):  # the averaged weights are scored and kept
                        val, examples = validate(model, val_set, cfg, runtime, pool)
                        row |= val
                        if val["val_score"] > run.best_score:
                            run.best_score, run.best_epoch = val["val_score"], epoch + 1
                            if main:
                                checkpoint.save(out_dir / checkpoint.BEST, {
                                    "model": model.state_dict(), "config": cfg.to_dict(), "epoch": epoch + 1,
                                    "val_score": val["val_score"], "git_commit": commit,
                                })
                row["epoch_s"] = time.perf_counter() - t_epoch  # wall clock: steps, waiting and validation
                run.seconds["wall_s"] = run.seconds.get("wall_s", 0.0) + row["epoch_s"]
                run.history.append(row)
                run.epoch = epoch + 1
                if main:
                    checkpoint.save(out_dir / checkpoint.CHECKPOINT, {
                        "model": model.state_dict(), **optimizers.state_dict(),
                        "rng": checkpoint.rng_state(generator), "run": _plain(run), "config": cfg.to_dict(),
                        "git_commit": commit, "fingerprints": prints, "pseudo_labels": packed,
                        "labels_diag": labels_diag, **({"average": average.state_dict()} if average else {}),
                    })
                    _write_metrics(run, out_dir)
                    tracker.log_metrics(_numeric(row), step=epoch + 1)
                    print(_summary(row, run, total), flush=True)
            metrics = _write_metrics(run, out_dir, write=main)
            if main:
                _log_outputs(tracker, model, out_dir, examples, cfg)
    return metrics


# --- one epoch -------------------------------------------------------------------------------------


def _finetune_data(cfg: Config, manifest: Path, world: World, generator: torch.Generator, runtime: Runtime):
    """(dataset, sampler, loader, steps per epoch) of the fine-tuning crops; all None/0 without fine-tuning."""
    from wpcrack.data.datasets import WeakDataset

    t = cfg.train
    if not t.finetune_epochs:
        return None, None, None, 0
    dataset = WeakDataset(manifest, "train", crop_size=t.finetune_crop_size, augment=True, seed=t.seed)
    return dataset, *_loader(dataset, cfg, world, generator, runtime)


def _loader(dataset, cfg: Config, world: World, generator: torch.Generator, runtime: Runtime):
    """(sampler, loader, steps per epoch) of a training set: disjoint shards per process (padded by
    repeating rows to equal length), reshuffled each epoch. No persistent workers: they draw their
    seed from the generator once per run, not once per epoch, so a resumed run would shuffle
    differently."""
    from torch.utils.data.distributed import DistributedSampler

    t = cfg.train
    if t.source_weights:
        if world.enabled:
            raise ConfigError("train.source_weights: not available with torchrun (each process would draw alone)")
        draw = WeightedRandomSampler(source_row_weights(dataset.frame["dataset"], t.source_weights),
                                     t.max_steps_per_epoch * t.batch_size, replacement=True, generator=generator)
        loader = DataLoader(dataset, batch_size=t.batch_size, sampler=draw, drop_last=True, num_workers=t.num_workers,
                            generator=generator, worker_init_fn=_seed_worker, pin_memory=runtime.device.type == "cuda")
        return None, loader, len(loader)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                 seed=t.seed) if world.enabled else None
    rows = len(sampler) if sampler is not None else len(dataset)
    loader = DataLoader(
        dataset, batch_size=t.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=rows >= t.batch_size, num_workers=t.num_workers, generator=generator,
        worker_init_fn=_seed_worker, pin_memory=runtime.device.type == "cuda",
    )
    return sampler, loader, min(len(loader), t.max_steps_per_epoch or len(loader))


def source_row_weights(sources, weights: dict) -> torch.Tensor:
    """Per-row sampling weights that give each source (a row's ``dataset``) its share of the draws,
    ``weights[source] / sum(weights)``, whatever its number of rows."""
    import pandas as pd

    sources = pd.Series(list(sources), dtype=str)
    unknown = sorted(set(sources) - set(weights))
    if unknown:
        raise ConfigError(f"train.source_weights has no weight for source(s) {', '.join(unknown)} of the training rows")
    counts = sources.value_counts()
    total = sum(float(weights[s]) for s in counts.index)
    if total <= 0:
        raise ConfigError("train.source_weights: the training rows' sources all weigh 0")
    share = sources.map(lambda s: float(weights[s]) / total / counts[s])
    return torch.tensor(share.to_numpy(), dtype=torch.double)


def _averaging(step, average: WeightAverage | None, model):
    """``step`` followed by an update of the weight average (``step`` itself when averaging is off)."""
    if average is None:
        return step

    def step_and_average(batch):
        result = step(batch)
        average.update(model)
        return result

    return step_and_average


def _load_best(model, out_dir: Path, world: World) -> None:
    """Fine-tuning starts from the best model of the three-phase epochs (rank 0 reads, all get it)."""
    best = out_dir / checkpoint.BEST
    if world.is_main and best.is_file():
        model.load_state_dict(checkpoint.load(best)["model"])
    world.broadcast_model(model)


def _relabel_now(cfg: Config, epoch: int, have_labels: bool) -> bool:
    """Whole-image labels are made when the detector starts (after its warm-up), then every
    ``refresh_epochs`` (a resumed run has the interrupted run's labels from its checkpoint)."""
    t, p = cfg.train, cfg.pseudo_labels
    if p.source != "image" or t.detector_target != "pseudo" or not t.detector_warmup_epochs <= epoch < t.epochs:
        return False
    return not have_labels or (epoch - t.detector_warmup_epochs) % max(p.refresh_epochs, 1) == 0


def _train_epoch(step, loader: DataLoader, steps: int, runtime: Runtime, epoch: int, total: int, run: RunState,
                 out_dir: Path) -> dict[str, float]:
    """Train one epoch of ``step(batch) -> StepResult``; the row of per-epoch means (losses,
    pseudo-label diagnostic, timing)."""
    from tqdm import tqdm

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    diag = np.zeros(3, dtype=np.int64)
    kept = labelled = 0
    progress = tqdm(total=steps, desc=f"epoch {epoch + 1}/{total}", leave=False,
                    disable=None if runtime.world.is_main else True)
    t_data = time.perf_counter()
    for i, raw in enumerate(loader):
        if i >= steps:
            break
        batch = Batch.from_loader(raw, runtime)
        seconds["data_s"] += time.perf_counter() - t_data
        try:
            result = step(batch)
        except TrainingError as exc:
            raise TrainingError(
                f"epoch {epoch + 1}, step {i + 1}: {exc}; stopped, the last good checkpoint "
                f"(epoch {run.epoch}) is kept in {out_dir}"
            ) from exc
        for key, value in result.losses.items():
            sums[key] += value
            counts[key] += 1
        for key, value in result.seconds.items():
            seconds[f"{key}_s"] += value
        if result.pseudo_labels:
            crack = batch.crack.cpu()
            has_mask = batch.has_mask[crack].tolist()
            masks = batch.mask[crack.to(batch.mask.device)][:, 0].cpu().numpy()
            diag += confusion([p for p, m in zip(result.pseudo_labels, has_mask) if m], masks[has_mask])
            kept += sum(result.kept)
            labelled += len(result.kept)
        progress.set_postfix({k.split("_")[0]: f"{sums[k] / counts[k]:.3f}" for k in TOTALS if counts[k]})
        progress.update()
        t_data = time.perf_counter()
    progress.close()
    if runtime.world.enabled:  # the row describes every process's batches (timing stays rank 0's)
        mine = (dict(sums), dict(counts), diag, kept, labelled)
        sums, counts, diag, kept, labelled = _merge(runtime.world.gather(mine))

    n = max(steps, 1)
    run.step += steps
    for key, value in seconds.items():
        run.seconds[key] = run.seconds.get(key, 0.0) + value
    row: dict[str, float] = {"epoch": epoch + 1}
    row |= {key: sums[key] / counts[key] for key in sorted(sums)}
    # Every CRF label counts in the diagnostic, kept or not: it measures the pseudo labels themselves.
    row |= {"pseudo_label_iou": iou_of(diag) if labelled else math.nan,
            "pseudo_label_kept": kept / labelled if labelled else math.nan}
    return row | _timing({k: seconds.get(k, 0.0) / n for k in ("step_s", *TIMING_KEYS)})


def _merge(parts: list[tuple]) -> tuple:
    """Sum the per-rank (sums, counts, diag, kept, labelled) of ``_train_epoch``."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    diag = np.zeros(3, dtype=np.int64)
    kept = labelled = 0
    for s, c, d, k, n in parts:
        for key, value in s.items():
            sums[key] += value
        for key, value in c.items():
            counts[key] += value
        diag += d
        kept, labelled = kept + k, labelled + n
    return sums, counts, diag, kept, labelled


def _timing(per_step: dict[str, float]) -> dict[str, float]:
    step = per_step.get("step_s", 0.0)
    out = {"s_per_iter": step, **{k: v for k, v in per_step.items() if k != "step_s"}}
    out["crf_wait_share"] = per_step.get("crf_wait_s", 0.0) / step if step else math.nan
    return out


# --- validation ------------------------------------------------------------------------------------


def validate(model, val_set, cfg: Config, runtime: Runtime, pool: CRFPool) -> tuple[dict[str, float], list[dict]]:
    """Model-selection score on the val split from image-level labels only.

    ``val_score`` is the mean of three numbers in [0, 1], each guarding against a different failure:
    - ``val_agreement_iou``: crack IoU between the detector's mask (p > 0.5) and the CRF pseudo label
      of the classifier's CAM, summed over val crack images. The detector is trained to reproduce
      these labels, so this measures how well it has learnt them on unseen images.
    - ``val_cls_accuracy``: balanced image-level accuracy of the classifier (crack when
      sigmoid(q_crack) > 0.5, the patch-gating rule); a classifier that lost the task has useless CAMs.
    - ``val_det_accuracy``: balanced image-level accuracy of the detector (an image is "crack" when
      it marks at least ``pseudo_labels.min_pixels`` pixels). Agreement alone rewards a detector that
      paints everything; a share of clean no-crack images alone rewarded one that marks nothing (it
      picked an empty epoch-1 detector on CFD): both now score 0.5 here.
    A class without val images is left out of both accuracies. The pixel masks of
    the val rows give ``val_diag_det_iou`` and ``val_diag_pseudo_iou``: monitoring only, never used
    for selection, except by the supervised variant (``detector_target: mask``), whose
    ``val_score`` is ``val_diag_det_iou``: it learns from masks anyway, and the weak score picked an
    epoch whose val IoU was 1.4 points below the best one (DeepCrack, 12 epochs). The test split is never read here. Also returns
    a few crack examples for a figure.

    With several processes each validates every ``world.size``-th image and the counts behind every
    number are summed over them: the score is the one a single process computes, on every rank
    (the examples come from this rank's share).
    """
    world = runtime.world
    shard = Subset(val_set, range(world.rank, len(val_set), world.size)) if world.enabled else val_set
    loader = DataLoader(shard, batch_size=1, shuffle=False)
    model.eval()
    uses_rec = model.uses_rec
    right = np.zeros(2)
    seen = np.zeros(2)
    clean = 0
    fired = 0
    rgbs, cams, preds, masks, has_masks = [], [], [], [], []
    with torch.inference_mode(), runtime.autocast():
        for raw in loader:
            batch = Batch.from_loader(raw, runtime)
            x, label = batch.image, int(batch.label[0])
            cls_out = model.classifier(x)
            rec_mid = model.reconstructor.encoder.backbone.forward_mid(x) if uses_rec else None
            pred = (torch.sigmoid(model.detect(cls_out.mid, rec_mid, batch.size, cls_out.skips).float()) > 0.5)[0, 0].cpu().numpy()
            seen[label] += 1
            right[label] += int((cls_out.logits[0, 1].float() > 0).item()) == label
            if label == 1:
                rgbs.append(batch.rgb[0].numpy())
                cams.append(crack_cam(cls_out.cam, batch.label, size=batch.size)[0, 0].float().cpu().numpy())
                preds.append(pred)
                masks.append(batch.mask[0, 0].cpu().numpy())
                has_masks.append(bool(batch.has_mask[0]))
                fired += int(np.count_nonzero(pred) >= cfg.pseudo_labels.min_pixels)
            else:
                clean += int(np.count_nonzero(pred) < cfg.pseudo_labels.min_pixels)
    pseudo = pool.submit(rgbs, cams).result()
    with_mask = [i for i, m in enumerate(has_masks) if m]
    agreement = confusion(preds, pseudo)
    det_diag = confusion([preds[i] for i in with_mask], [masks[i] for i in with_mask])
    pseudo_diag = confusion([pseudo[i] for i in with_mask], [masks[i] for i in with_mask])
    if world.enabled:
        total = world.sum([*right, *seen, clean, fired, *agreement, *det_diag, *pseudo_diag]).round().astype(np.int64)
        right, seen, (clean, fired) = total[0:2].astype(float), total[2:4].astype(float), total[4:6].tolist()
        agreement, det_diag, pseudo_diag = total[6:9], total[9:12], total[12:15]
    terms = selection_terms(agreement, right, seen, clean, fired)
    has_masks = bool(with_mask) or world.enabled  # ranks without masked rows still sum the others' counts
    diag = {"val_diag_det_iou": iou_of(det_diag) if has_masks else math.nan,
            "val_diag_pseudo_iou": iou_of(pseudo_diag) if has_masks else math.nan}
    examples = [
        {"rgb": rgbs[i], "cam": cams[i], "pseudo": pseudo[i], "pred": preds[i]}
        for i in range(min(len(rgbs), cfg.evaluate.figure_images))
    ]
    score = float(np.mean(list(terms.values())))
    if cfg.train.detector_target == "mask" and has_masks:
        score = diag["val_diag_det_iou"]  # the supervised ceiling may select on the masks it trains on
    return {"val_score": score, **terms, **diag}, examples


def selection_terms(agreement, cls_right, seen, clean: int, fired: int) -> dict[str, float]:
    """The terms of ``val_score`` from counts: ``agreement`` (tp, fp, fn) of detector vs pseudo labels,
    ``cls_right``/``seen`` per class (no crack, crack), detector-clean no-crack and detector-firing
    crack images (see ``validate``)."""
    seen = np.asarray(seen, dtype=float)
    terms = {"val_agreement_iou": iou_of(np.asarray(agreement))} if seen[1] else {}
    terms["val_cls_accuracy"] = float(np.mean(np.asarray(cls_right, dtype=float)[seen > 0] / seen[seen > 0]))
    detector_right = np.array([clean, fired], dtype=float)
    terms["val_det_accuracy"] = float(np.mean(detector_right[seen > 0] / seen[seen > 0]))
    return terms


def _zero_if_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


# --- state, determinism, files ----------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: python and numpy seeded from the worker's torch seed (set by the loader)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def _deterministic(runtime: Runtime) -> Iterator[None]:
    """Deterministic kernels on the CPU (where resume is bitwise exact); cuDNN autotuning on a GPU.
    The caller's settings are restored afterwards."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    if runtime.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def _take_over(out_dir: Path, cfg: Config, prints: dict[str, str], resume: bool | None, model,
               optimizers: Optimizers, generator: torch.Generator, train_set, world: World,
               average: WeightAverage | None = None) -> tuple[RunState, dict]:
    """(run state, last relabelling's diagnostic) to start from: a restored checkpoint, or a fresh
    run (a stale best.pt removed) when there is none, ``resume`` is False or it cannot be resumed."""
    path = out_dir / checkpoint.CHECKPOINT
    if resume is not False and path.is_file():
        state = checkpoint.load(path)
        reason = _not_resumable(state, out_dir, cfg, prints, world, strict=resume is True)
        if reason is None:
            model.load_state_dict(state["model"])
            optimizers.load_state_dict(state)
            checkpoint.set_rng_state(state["rng"], generator)
            train_set.pseudo = _unpack(state.get("pseudo_labels"))
            if average is not None:
                average.load_state_dict(state["average"])
            run = RunState(**{**state["run"], "resumed_from_epoch": int(state["run"]["epoch"])})
            if world.is_main:
                print(f"{path}: resuming after epoch {run.epoch} of {cfg.train.epochs + cfg.train.finetune_epochs}",
                      flush=True)
            return run, dict(state.get("labels_diag") or {})
        if resume:
            raise TrainingError(f"{path}: {reason}; train without --resume to start over")
        if world.is_main:
            begin = "from the start model" if prints.get("init") else "from scratch"
            print(f"{path}: {reason}: training {begin}", file=sys.stderr, flush=True)
    if world.is_main:
        (out_dir / checkpoint.BEST).unlink(missing_ok=True)  # never let a previous run's model survive
    return RunState(world_size=world.size), {}


def _not_resumable(state: dict, out_dir: Path, cfg: Config, prints: dict[str, str], world: World,
                   strict: bool) -> str | None:
    """Why ``state`` cannot be continued by this run (None: it can)."""
    from wpcrack.tracking.runs import flatten

    run = state["run"]
    saved_size = int(run.get("world_size", 1))
    if saved_size != world.size:
        return (f"trained with {saved_size} process(es), this run has {world.size} (the data shards, steps per "
                f"epoch and learning-rate schedule depend on it); resume with WPCRACK_NPROC={saved_size} "
                "(or torchrun --nproc_per_node)")
    saved = flatten(checkpoint.training_config(state["config"]))
    current = flatten(checkpoint.training_config(cfg.to_dict()))
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        return f"trained with another configuration (differs in {', '.join(changed[:8])})"
    saved_prints = state.get("fingerprints") or {}
    for key, what in (("data", "the prepared data"), ("code", "the training code")):
        if saved_prints.get(key) != prints[key]:
            return f"{what} changed since it was written" if key in saved_prints else f"it records no {key} fingerprint"
    if saved_prints.get("init") != prints.get("init"):
        return ("it continued another model" if "init" in saved_prints and "init" in prints else
                "it trained from ImageNet" if "init" in prints else "it continued a trained model")
    total = cfg.train.epochs + cfg.train.finetune_epochs
    if not strict and int(run["epoch"]) >= total:
        return f"its run finished ({run['epoch']} of {total} epochs)"
    if int(run.get("best_epoch", 0)):
        best = out_dir / checkpoint.BEST
        best_epoch = checkpoint.load(best).get("epoch") if best.is_file() else None
        if best_epoch != run["best_epoch"]:
            return f"{best} of epoch {run['best_epoch']} is missing or replaced"
    return None


def _pack(labels: dict[int, np.ndarray]) -> torch.Tensor:
    """Whole-image pseudo labels as one compressed npz in a uint8 tensor (a few MB: mostly zeros)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{str(k): v for k, v in labels.items()})
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _unpack(packed: torch.Tensor | None) -> dict[int, np.ndarray]:
    if packed is None or packed.numel() == 0:
        return {}
    with np.load(io.BytesIO(packed.numpy().tobytes())) as npz:
        return {int(k): npz[k] for k in npz.files}


def _write_config(cfg: Config, out_dir: Path) -> str:
    """config.yaml: the resolved configuration, with the git commit as a comment (stays loadable)."""
    from wpcrack.tracking.runs import git_commit

    commit = git_commit()
    with atomic_path(out_dir / "config.yaml") as tmp:
        tmp.write_text(f"# git commit: {commit}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return commit


def _numeric(row: dict[str, float]) -> dict[str, float]:
    """A history row as MLflow metrics: finite numbers only, the epoch is the step."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}


def _json_safe(row: dict[str, float]) -> dict[str, float | None]:
    """NaN (no data) as null: strict JSON readers (DVC) reject NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _plain(run: RunState) -> dict[str, Any]:
    """``run`` for the checkpoint; a run from ImageNet stores no ``start`` (its checkpoint is as before)."""
    return {k: v for k, v in asdict(run).items() if k != "start" or v}


def _write_metrics(run: RunState, out_dir: Path, write: bool = True) -> dict[str, Any]:
    """train_metrics.json and history.csv from the run so far (``write`` False: only the dict)."""
    final = run.history[-1] if run.history else {}
    best = next((r for r in run.history if r["epoch"] == run.best_epoch), {})
    n = max(run.step, 1)
    timing = _timing({"step_s": run.seconds.get("step_s", 0.0) / n,
                      **{k: run.seconds.get(k, 0.0) / n for k in TIMING_KEYS}})
    metrics = {
        "epochs": run.epoch,
        "steps": run.step,
        "processes": run.world_size,
        "resumed_from_epoch": run.resumed_from_epoch,
        "train_seconds": run.seconds.get("wall_s", 0.0),  # summed epoch wall time (a resumed run adds up)
        "hardware": _hardware(),
        "best_epoch": run.best_epoch,
        "val_score": _json_safe({"v": run.best_score})["v"],
        "pseudo_label_iou": _json_safe({"v": final.get("pseudo_label_iou", math.nan)})["v"],
        "timing": _json_safe(timing),
        "final": _json_safe(final),
        "best": _json_safe({k: v for k, v in best.items() if k.startswith("val_") or k == "epoch"}),
        **({"start": _json_safe(run.start)} if run.start else {}),
    }
    if not write:
        return metrics
    write_json(out_dir / "train_metrics.json", metrics)
    columns = list(dict.fromkeys(k for row in run.history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(run.history)
    with atomic_path(out_dir / "history.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    return metrics


def _hardware() -> str:
    """Where this process trained, for the results table: GPU name or CPU cores and torch threads."""
    import os

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _summary(row: dict[str, float], run: RunState, epochs: int) -> str:
    losses = " ".join(f"{k.split('_')[0]} {row[k]:.3f}" for k in TOTALS if k in row)
    val = ""
    if "val_score" in row:
        val = f" | val {row['val_score']:.3f}{' (best)' if run.best_epoch == row['epoch'] else ''}"
    return (f"epoch {row['epoch']}/{epochs}: {losses} | pseudo-label IoU {row['pseudo_label_iou']:.3f}{val} | "
            f"{row['s_per_iter']:.2f} s/it, CRF wait {100 * _zero_if_nan(row['crf_wait_share']):.0f}%")


# --- tracking ---------------------------------------------------------------------------------------


class _NoTracker:
    """Stands in for ``wpcrack.tracking.runs.Tracker`` when tracking is off."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _tracking(cfg: Config, track: bool) -> Iterator[Any]:
    """The MLflow run of this training (stage ``train@<dataset>[-<variant>]``), or a no-op."""
    if not track:
        yield _NoTracker()
        return
    from wpcrack.tracking.runs import start_run

    key = cfg.dataset if cfg.variant == "full" else f"{cfg.dataset}-{cfg.variant}"
    with start_run(cfg, stage=f"train@{key}") as tracker:
        yield tracker


def _log_outputs(tracker, model, out_dir: Path, examples: list[dict], cfg: Config) -> None:
    """Best checkpoint, run files, a CAM / pseudo-label figure and the registered detector."""
    if isinstance(tracker, _NoTracker):
        return
    import tempfile

    from wpcrack.io import write_image

    for name in ("train_metrics.json", "history.csv", "config.yaml"):
        tracker.log_artifact(out_dir / name)
    tracker.log_artifact(out_dir / checkpoint.BEST, artifact_path="checkpoints")
    best = checkpoint.load(out_dir / checkpoint.BEST)
    model.load_state_dict(best["model"])
    if examples:
        with tempfile.TemporaryDirectory(prefix="wpcrack-figure-") as tmp:
            write_image(Path(tmp) / "train_cam_pseudo_label.png", _figure(examples))
            tracker.log_artifact(Path(tmp) / "train_cam_pseudo_label.png", artifact_path="figures")
        tracker.log_detector(model.slim(), examples[0]["rgb"])


def _figure(examples: list[dict]) -> np.ndarray:
    """Rows of (image, CAM heat map over it, CRF pseudo label, detector mask) of val crack images."""
    import cv2

    rows = []
    for ex in examples:
        heat = cv2.applyColorMap((ex["cam"] * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        overlay = (0.5 * ex["rgb"] + 0.5 * heat).astype(np.uint8)
        masks = [np.repeat((m > 0).astype(np.uint8)[..., None] * 255, 3, axis=2) for m in (ex["pseudo"], ex["pred"])]
        rows.append(np.concatenate([ex["rgb"], overlay, *masks], axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
