"""One training step in three phases, each training one network while the others are frozen.

The shape of ACR's step (sangrockEG/ACR) plus the detector (paper 3.2-3.4):

(a) ``reconstructor_step``: the frozen classifier's crack CAM M_C splits Rec.E's fused map Z into
    Z_C = Z * M_C and Z_R = Z * (1 - M_C) (eq. 2), Rec.D decodes both (eq. 3), L_Rec (eqs. 13-16).
    The same CAM, upsampled to the crop, goes to the CRF pool here, so the pseudo labels are made
    while phases (a) and (b) run.
(b) ``classifier_step``: the reconstructor is frozen (no parameter of it changes) but gradients
    flow through its decoder into M_C; L_Cls (eqs. 17-21, CECCM included when enabled).
(c) ``detector_step``: PAAM + detector on the mid features of Cls and Rec.E (and, for the ``unet``
    decoder, Cls's fine skips) against the pseudo labels of the crack images, empty labels skipped
    (eq. 22 with the selection mechanism). With ``pseudo_labels.source: image`` the labels are not
    made here but come with the batch: the whole image's label, cropped with the image
    (``wpcrack.train.relabel``). ``pseudo_labels.negatives`` adds the crack-free images as
    all-background targets (the release drops them).

"Frozen" means: eval mode (BatchNorm statistics do not move), ``requires_grad`` off for the
duration of the phase, and only the trained network's optimiser steps.

Phase (c) reuses the mid features that (a) and (b) computed without gradient (the classifier's
before its update in (b), the reconstructor's after its update in (a)), instead of running both
backbones a third time. With ``detach_detector_features: false`` it runs them again with gradients
and the detector loss also trains both encoders.

Under torchrun each phase averages its gradients over the processes before its optimiser steps
(``optimizer_step`` with ``runtime.world``; see ``wpcrack.train.distributed``), so every rank takes the same
step; a single process (``runtime.world`` is ``SINGLE``) is untouched.

Not taken from ACR: its random grid erasing of the CAM in the reconstructor step (the paper does
not describe it). When nothing uses the reconstructor (``cls_only``: no adversarial game, no
CECCM, detector on Cls features) it is neither run nor trained.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from wpcrack.method.cam import crack_cam
from wpcrack.config import Config
from wpcrack.errors import TrainingError
from wpcrack.method.losses import classifier_loss, detector_loss, reconstructor_loss
from wpcrack.method.pseudo_labels import CRFHandle, CRFPool
from wpcrack.train.distributed import SINGLE, World, average_gradients
from wpcrack.train.optim import Optimizers, set_train_mode


@dataclass
class Runtime:
    """Where and how tensors run: device, bf16 autocast and channels_last (both CUDA only), and the
    data-parallel world (``SINGLE``: one process, no collectives)."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    world: World = SINGLE

    @classmethod
    def for_config(cls, cfg: Config, world: World = SINGLE) -> Runtime:
        """``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when there is a GPU, else the CPU."""
        device = world.device()
        cuda = device.type == "cuda"
        return cls(device, amp=cuda and cfg.train.amp, channels_last=cuda and cfg.train.channels_last, world=world)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def images(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class Batch:
    """A DataLoader batch on the device; ``rgb`` stays on the CPU for the CRF."""

    image: Tensor  # [B, 3, H, W] normalised
    rgb: Tensor  # [B, H, W, 3] uint8, CPU
    label: Tensor  # [B] int64
    mask: Tensor  # [B, 1, H, W] float, zeros without a mask (supervised variant, diagnostics only)
    has_mask: Tensor  # [B] bool
    pseudo: Tensor | None = None  # [B, 1, H, W] float 0/1/IGNORE: whole-image pseudo labels, cropped
    has_pseudo: Tensor | None = None  # [B] bool

    @classmethod
    def from_loader(cls, batch: dict, runtime: Runtime) -> Batch:
        pseudo = batch.get("pseudo")
        return cls(
            image=runtime.images(batch["image"]),
            rgb=batch["rgb"],
            label=batch["label"].to(runtime.device),
            mask=batch["mask"].to(runtime.device),
            has_mask=torch.as_tensor(batch["has_mask"], dtype=torch.bool),
            pseudo=pseudo.to(runtime.device) if pseudo is not None else None,
            has_pseudo=torch.as_tensor(batch["has_pseudo"], dtype=torch.bool) if pseudo is not None else None,
        )

    @property
    def crack(self) -> Tensor:
        return self.label == 1

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])


@dataclass
class Carry:
    """What phase (a) and (b) hand on to phase (c)."""

    cls_mid: Tensor | None = None
    cls_skips: list[Tensor] | None = None
    rec_mid: Tensor | None = None
    crf: CRFHandle | None = None


@dataclass
class StepResult:
    losses: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    pseudo_labels: list[np.ndarray] = field(default_factory=list)  # of the batch's crack images
    kept: list[bool] = field(default_factory=list)  # label passed the selection mechanism


def detector_modules(model: nn.Module) -> list[nn.Module]:
    """PAAM (or its projection) and the detector: every part that is not Cls or Rec."""
    return [m for name, m in model.named_children() if name not in ("classifier", "reconstructor")]


@contextlib.contextmanager
def training_only(model: nn.Module, trainable: Iterable[nn.Module], freeze_bn: bool) -> Iterator[None]:
    """Train the ``trainable`` parts; every other parameter of ``model`` is frozen for the block."""
    trainable = list(trainable)
    train_ids = {id(p) for m in trainable for p in m.parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        if id(p) not in train_ids:
            p.requires_grad_(False)
    for m in trainable:
        set_train_mode(m, True, freeze_bn)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_finite(phase: str, total: Tensor, parts: dict[str, float]) -> None:
    if not torch.isfinite(total.detach()).item():
        detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        raise TrainingError(f"{phase} loss is not finite ({detail})")


def optimizer_step(optimizers: Iterable[torch.optim.Optimizer], phase: str, total: Tensor | None,
                   parts: dict[str, float], world: World = SINGLE, weight: float = 1.0) -> None:
    """Backpropagate ``total`` and step ``optimizers``; a NaN/inf loss stops before any update.

    Gradients are dropped after the update: the next phase starts clean and no memory is held.
    With several processes the gradients are averaged over them first (``average_gradients``,
    ``weight`` this rank's share; ``total`` None: this rank has nothing to learn but joins the
    average) and a loss that is not finite on any rank stops every rank.
    """
    optimizers = list(optimizers)
    if world.enabled:
        _distributed_step(optimizers, phase, total, parts, world, weight)
        return
    _check_finite(phase, total, parts)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _distributed_step(optimizers: list[torch.optim.Optimizer], phase: str, total: Tensor | None,
                      parts: dict[str, float], world: World, weight: float) -> None:
    finite = total is None or bool(torch.isfinite(total.detach()).item())
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if total is not None and finite and weight > 0:
        total.backward()
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    summed, bad = average_gradients(params, world, weight if total is not None else 0.0, finite)
    if bad:
        detail = "" if finite else " (here: " + ", ".join(f"{k}={v:.4g}" for k, v in parts.items()) + ")"
        raise TrainingError(f"{phase} loss is not finite on {bad} of {world.size} processes{detail}")
    if summed > 0:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def _reconstruct(model: nn.Module, z: Tensor, m_c: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """O_C = Rec.D(Z * M_C), O_R = Rec.D(Z * (1 - M_C)) (eqs. 2-3), in one decoder pass."""
    both = model.reconstructor.decode(torch.cat([z * m_c, z * (1.0 - m_c)]), size)
    return both.chunk(2)


def reconstructor_step(
    model: nn.Module, optimizers: Optimizers, batch: Batch, cfg: Config, runtime: Runtime,
    pool: CRFPool | None, train_reconstructor: bool = True,
) -> tuple[dict[str, float], Carry]:
    """Phase (a). ``pool`` None: no pseudo labels needed (warm-up, supervised variant).

    ``train_reconstructor`` False skips the update (nothing uses Rec: no adversarial game, no
    CECCM, detector on Cls features only), keeping the CAM and CRF work of this phase.
    """
    x, crack = batch.image, batch.crack
    with training_only(model, [model.reconstructor], cfg.train.freeze_bn), runtime.autocast():
        with torch.no_grad():
            cls_out = model.classifier(x)
            m_c = crack_cam(cls_out.cam, batch.label)
        carry = Carry(cls_mid=cls_out.mid, cls_skips=cls_out.skips)
        if pool is not None and cfg.pseudo_labels.source == "crop":
            cams = crack_cam(cls_out.cam[crack], batch.label[crack], size=batch.size)
            cams = cams[:, 0].to("cpu", torch.float16).numpy()
            carry.crf = pool.submit(list(batch.rgb[crack.cpu()].numpy()), list(cams))
        if not train_reconstructor:
            return {}, carry
        enc = model.reconstructor.encode(x)
        z_c, m_c_c = enc.fused[crack], m_c[crack]
        o_c, o_r = _reconstruct(model, z_c, m_c_c, batch.size) if len(z_c) else (x[:0], x[:0])
        m_rec_c = crack_cam(enc.cam[crack], batch.label[crack])
        total, parts = reconstructor_loss(enc.logits, batch.label, x[crack], o_c, o_r, m_rec_c, cfg.loss)
    optimizer_step([optimizers.reconstructor], "reconstructor", total, parts, runtime.world)
    return parts, carry


def classifier_step(
    model: nn.Module, optimizers: Optimizers, batch: Batch, cfg: Config, runtime: Runtime, carry: Carry,
    need_rec: bool = True,
) -> dict[str, float]:
    """Phase (b). With ``adversarial: false`` only BCE (+ CECCM) trains the classifier.

    ``need_rec`` False skips the frozen reconstructor's forward (nothing here or in (c) uses it).
    """
    x, crack = batch.image, batch.crack
    adversarial = cfg.train.adversarial
    with training_only(model, [model.classifier], cfg.train.freeze_bn), runtime.autocast():
        enc = None
        if need_rec:
            with torch.no_grad():
                enc = model.reconstructor.encode(x)
            carry.rec_mid = enc.mid
        cls_out = model.classifier(x)
        m_c = crack_cam(cls_out.cam, batch.label)[crack]
        if adversarial and len(m_c):
            # Rec is frozen (requires_grad off) but the graph runs through Rec.D into M_C.
            o_c_hat, o_r_hat = _reconstruct(model, enc.fused[crack], m_c, batch.size)
            image_c = x[crack]
        else:
            image_c = o_c_hat = o_r_hat = x[:0]
        m_rec_c = crack_cam(enc.cam[crack], batch.label[crack]) if enc is not None else m_c.detach()
        total, parts = classifier_loss(
            cls_out.logits, batch.label, image_c, o_c_hat, o_r_hat, m_c, m_rec_c, cfg.loss, cfg.ceccm
        )
    optimizer_step([optimizers.classifier], "classifier", total, parts, runtime.world)
    return parts


def targets(batch: Batch, cfg: Config, carry: Carry, whole_image: bool) -> tuple[Tensor, Tensor, list[np.ndarray]]:
    """(targets [B, 1, H, W], which images train the detector [B] bool, the crack images' new labels).

    Targets are the masks (supervised variant), the batch's cropped whole-image labels (source
    image, and always in fine-tuning: ``whole_image``) or the CRF pool's labels of the crack crops
    (source crop); a crack image trains only when
    its label has ``min_pixels`` crack pixels (the selection mechanism). With ``negatives`` every
    crack-free image trains too, towards all background.
    """
    crack = batch.crack
    target = torch.zeros_like(batch.mask)
    labels: list[np.ndarray] = []
    if cfg.train.detector_target == "mask":
        target[crack] = batch.mask[crack]
        usable = crack & batch.has_mask.to(crack.device)
    else:
        if whole_image:
            if batch.pseudo is None:
                raise TrainingError("pseudo_labels.source is image but the batch has no whole-image labels")
            target = torch.where(crack.view(-1, 1, 1, 1), batch.pseudo, target)
            usable = crack & batch.has_pseudo.to(crack.device)
        else:
            labels = carry.crf.result() if carry.crf is not None else []
            if labels:
                target[crack] = torch.from_numpy(np.stack(labels)).to(target.device, torch.float32)[:, None]
            usable = crack.clone() if labels else torch.zeros_like(crack)
        usable &= (target == 1).flatten(1).sum(1) >= cfg.pseudo_labels.min_pixels
    if cfg.pseudo_labels.negatives:
        usable |= ~crack
    return target, usable, labels


def detector_step(
    model: nn.Module, optimizers: Optimizers, batch: Batch, cfg: Config, runtime: Runtime, carry: Carry,
) -> StepResult:
    """Phase (c); ``seconds["crf_wait"]`` is the time spent waiting for the CRF pool."""
    result = StepResult()
    t0 = time.perf_counter()
    target, usable, result.pseudo_labels = targets(batch, cfg, carry, cfg.pseudo_labels.source == "image")
    result.seconds["crf_wait"] = time.perf_counter() - t0
    result.kept = usable[batch.crack].tolist() if result.pseudo_labels else []
    detach = cfg.train.detach_detector_features
    opts = [optimizers.detector] if detach else [optimizers.detector, optimizers.classifier, optimizers.reconstructor]
    if not bool(usable.any()):
        if runtime.world.enabled:  # the other ranks may have images: join their gradient average
            optimizer_step(opts, "detector", None, {}, runtime.world, weight=0.0)
        return result

    x = batch.image[usable]
    uses_rec = model.uses_rec
    trainable = detector_modules(model)
    if not detach:
        trainable += [model.classifier, model.reconstructor.encoder]
    with training_only(model, trainable, cfg.train.freeze_bn), runtime.autocast():
        if detach:
            cls_mid, skips = carry.cls_mid[usable], [s[usable] for s in carry.cls_skips]
            rec_mid = carry.rec_mid[usable] if uses_rec else None
        else:
            cls_mid, skips = model.classifier.backbone.forward_mid_skips(x)
            rec_mid = model.reconstructor.encoder.backbone.forward_mid(x) if uses_rec else None
        logits = model.detect(cls_mid, rec_mid, batch.size, skips)
        total, result.losses = detector_loss(
            logits, target[usable], pos_weight=cfg.loss.det_pos_weight, dice=cfg.loss.det_dice
        )
    # Weighted by this rank's images: the mean over the global detector batch, as in one process.
    optimizer_step(opts, "detector", total, result.losses, runtime.world, weight=float(usable.sum()))
    return result


def train_step(
    model: nn.Module, optimizers: Optimizers, batch: Batch, cfg: Config, runtime: Runtime,
    pool: CRFPool | None, train_detector: bool = True,
) -> StepResult:
    """Phases (a), (b), (c) on one batch, timed with ``perf_counter`` (CUDA-synchronised).

    ``train_detector`` False (detector warm-up epochs) skips phase (c) and the CRF work.
    """
    t = cfg.train
    need_rec = t.adversarial or cfg.ceccm.enabled or model.uses_rec
    pseudo = train_detector and t.detector_target == "pseudo"
    clock = Clock(runtime)
    rec_parts, carry = reconstructor_step(
        model, optimizers, batch, cfg, runtime, pool if pseudo else None, train_reconstructor=need_rec
    )
    seconds = {"rec": clock.lap()}
    cls_parts = classifier_step(model, optimizers, batch, cfg, runtime, carry, need_rec=need_rec)
    seconds["cls"] = clock.lap()
    result = detector_step(model, optimizers, batch, cfg, runtime, carry) if train_detector else StepResult()
    seconds["det"] = clock.lap() - result.seconds.get("crf_wait", 0.0)
    seconds["crf_wait"] = result.seconds.get("crf_wait", 0.0)
    seconds["step"] = sum(seconds.values())
    optimizers.step_schedules(("classifier", "reconstructor") if need_rec else ("classifier",))
    runtime.world.sync_buffers(model)  # BatchNorm statistics: the same model on every rank
    losses = {f"rec_{k}": v for k, v in rec_parts.items()}
    losses |= {f"cls_{k}": v for k, v in cls_parts.items()}
    losses |= {"det_total" if k == "det" else k: v for k, v in result.losses.items()}
    return StepResult(losses, seconds, result.pseudo_labels, result.kept)


class Clock:
    """Seconds between laps, the device synchronised first (a CUDA step is asynchronous)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.last = time.perf_counter()

    def lap(self) -> float:
        self.runtime.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
