"""Data-parallel training over the processes ``torchrun`` starts (one per GPU; gloo on the CPU).

Every rank holds a full copy of the model and trains on its own shard of the training split
(``DistributedSampler``). The networks are not wrapped in ``DistributedDataParallel``: each step
trains one network while the others are frozen, some networks get no gradient on some ranks (a
shard batch without crack images never runs the decoder; a rank whose pseudo labels are all empty
skips the detector's forward), and phase (c) may have nothing to learn on one rank but not on
another. Instead each phase ends with ``average_gradients`` over the parameters of the optimisers it
steps, before the step, on every rank:

- one small all-reduce first agrees on which parameters have a gradient anywhere (those missing
  here get zeros, as DDP's ``find_unused_parameters`` does; a parameter with no gradient on any rank
  keeps ``None``, so the optimiser skips it as in a single process), whether a loss was not finite
  anywhere (every rank then raises the same ``TrainingError``), and the summed weight;
- then the gradients, in buckets, are summed and divided: the result is the weighted mean
  ``sum_r w_r g_r / sum_r w_r``. Phases (a) and (b) weigh every rank 1 (DDP's mean); phase (c)
  weighs a rank by its number of kept pseudo-labelled images, which is exactly the gradient of the
  mean loss over the global detector batch (the loss is a mean over equal-sized images).

Identical initial weights (broadcast from rank 0), identical averaged gradients and identical
optimiser states keep the parameters equal on every rank. BatchNorm statistics are computed per
rank and averaged after every step (integer counters come from rank 0), so the whole state dict is
the same everywhere and rank 0 alone writes it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

BUCKET_BYTES = 64 * 2**20  # gradients are summed in chunks of this size (memory bound, few collectives)
TIMEOUT_ENV = "WPCRACK_DIST_TIMEOUT_MIN"  # collectives wait this long (minutes) for a slow rank


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; ``World()`` is a single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """From the variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        return cls(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)), size=size)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` with CUDA (``cuda`` for a single process, as before), else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if not self.enabled:
            return torch.device("cuda")
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            from wpcrack.errors import TrainingError

            raise TrainingError(f"process LOCAL_RANK={self.local_rank} has no GPU: {count} visible; "
                                "start at most one process per GPU (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    # --- collectives (no-ops in a single process) ---------------------------------------------------

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a small vector of numbers (float64)."""
        array = np.asarray(values, dtype=np.float64)
        if not self.enabled:
            return array
        import torch.distributed as dist

        t = torch.as_tensor(array, device=self._comm_device())
        dist.all_reduce(t)
        return t.cpu().numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_model(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (as DDP does when it wraps a model)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensors in _buckets([*model.parameters(), *model.buffers()]):
                flat = _flatten(tensors)
                dist.broadcast(flat, src=0)
                _unflatten_into(flat, tensors)

    def sync_buffers(self, model: nn.Module) -> None:
        """BatchNorm running statistics averaged over ranks; every other buffer (BatchNorm's batch
        counters, constants) from rank 0."""
        if not self.enabled:
            return
        import torch.distributed as dist

        stats = {id(b): b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for b in (m.running_mean, m.running_var) if b is not None}
        with torch.no_grad():
            for tensors in _buckets(list(stats.values())):
                flat = _flatten(tensors)
                dist.all_reduce(flat)
                flat /= self.size
                _unflatten_into(flat, tensors)
            for tensors in _buckets([b for b in model.buffers() if id(b) not in stats]):
                flat = _flatten(tensors)
                dist.broadcast(flat, src=0)
                _unflatten_into(flat, tensors)


SINGLE = World()


def average_gradients(params: Iterable[nn.Parameter], world: World, weight: float = 1.0,
                      finite: bool = True) -> tuple[float, int]:
    """Replace each ``.grad`` by the ``weight``-ed mean of the ranks' gradients (see the module doc).

    Every rank must call it for the same phase, with the same parameters in the same order. A rank
    with nothing to contribute passes ``weight=0`` (its gradients, if any, are ignored). Returns
    (summed weight, number of ranks whose loss was not finite); the caller skips the step when
    the weight is 0 and raises when a loss was not finite (gradients are then dropped here).
    """
    params = [p for p in params if p.requires_grad]
    if not world.enabled:
        return weight, int(not finite)
    import torch.distributed as dist

    if not finite:
        weight = 0.0
    device = world._comm_device()
    meta = torch.tensor([float(p.grad is not None and weight > 0) for p in params] + [weight, float(not finite)],
                        dtype=torch.float64, device=device)
    dist.all_reduce(meta)
    meta = meta.cpu()
    total, bad = float(meta[-2]), int(round(float(meta[-1])))
    if bad or total <= 0:
        for p in params:
            p.grad = None
        return total, bad
    needed = [p for p, n in zip(params, meta[:-2].tolist()) if n > 0]
    needed_ids = {id(p) for p in needed}
    for p in params:
        if p.grad is None or weight <= 0:
            p.grad = torch.zeros_like(p) if id(p) in needed_ids else None
    scale = weight / total
    with torch.no_grad():
        for grads in _buckets([p.grad for p in needed]):
            flat = _flatten(grads)
            flat *= scale
            dist.all_reduce(flat)
            _unflatten_into(flat, grads)
    return total, bad


@contextlib.contextmanager
def process_group(world: World) -> Iterator[None]:
    """Initialise the default process group for ``world`` (nccl on CUDA, gloo on the CPU) for the
    block, unless one is already initialised (then it is left as it is)."""
    import torch.distributed as dist

    if not world.enabled:
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.device())  # collectives of objects (all_gather_object) use it
    if dist.is_initialized():
        yield
        return
    timeout = datetime.timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "30")))
    if torch.cuda.is_available():
        dist.init_process_group("nccl", rank=world.rank, world_size=world.size, timeout=timeout,
                                device_id=world.device())
    else:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- flat buffers ------------------------------------------------------------------------------------


def _buckets(tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive runs of ``tensors`` with one dtype and device, each at most ``BUCKET_BYTES``
    (a larger tensor is a bucket of its own)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
