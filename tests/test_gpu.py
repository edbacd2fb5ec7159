"""Every CUDA path of the project, on a GPU (marker ``gpu``).

Deselected by the default run (pyproject's addopts); ``pytest -m gpu`` selects them, and without a
CUDA device each one skips. ``make gpu-check`` (``wpcrack.diagnostics.gpu_check``) runs them first on a GPU
machine. They use the public entry points only (``build_model``, the phases, ``train``, ``slim()``,
``benchmark``, ``load_trained``), at small sizes: a few seconds each, except the ``torch.compile``
ones (a compile each).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from network_state import changed, snapshot
from wpcrack.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# The paper profile's code path (frozen BatchNorm, CRF pool) with a small network, or ResNet38d itself.
TINY_MODEL = ["model.backbone=tiny", "model.cam_channels=16", "model.paam_channels=8", "model.paam_reduction=4",
              "model.detector_channels=8", "model.decoder_channels=8"]
TINY_DATA = ["prepare.synthetic.size=64", "prepare.synthetic.train_crack=6", "prepare.synthetic.train_nocrack=6",
             "prepare.synthetic.val_crack=2", "prepare.synthetic.val_nocrack=2", "prepare.synthetic.test=2"]
TINY_RUN = ["train.epochs=1", "train.batch_size=4", "train.crop_size=32", "train.max_steps_per_epoch=2",
            "train.num_workers=0", "pseudo_labels.workers=2", "pseudo_labels.iterations=2", "pseudo_labels.min_pixels=0"]
BACKBONES = {"tiny": TINY_MODEL, "resnet38d": ["model.backbone=resnet38d", "model.pretrained=false"]}


def _cfg(*overrides: str, dataset: str = "synthetic"):
    return load_config(PARAMS, dataset=dataset, profile="paper", overrides=list(overrides))


def _first_conv_probe(model: torch.nn.Module) -> dict:
    """Records the dtype and memory format of the first convolution's input and output."""
    seen: dict = {}
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    def hook(module, inputs, output):
        if not seen:
            seen.update(input_channels_last=inputs[0].is_contiguous(memory_format=torch.channels_last),
                        output_dtype=output.dtype)

    conv.register_forward_hook(hook)
    return seen


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from wpcrack.data.prepare import prepare

    data = tmp_path_factory.mktemp("gpu") / "data"
    prepare(_cfg(f"paths.data={data}", *TINY_DATA), "synthetic")
    return data


def _batch(runtime, size: int = 64, seed: int = 0):
    """A batch of 3 crack images and 1 crack-free one, with masks, on the runtime's device."""
    from wpcrack.data.datasets import normalize
    from wpcrack.train.phases import Batch

    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8, generator=g)
    mask = torch.zeros(4, 1, size, size)
    mask[:, :, size // 2 - 1 : size // 2 + 1, 4:-4] = 1.0
    raw = {"image": normalize(rgb), "rgb": rgb, "label": torch.tensor([1, 0, 1, 1]), "mask": mask,
           "has_mask": torch.ones(4, dtype=torch.bool)}
    return Batch.from_loader(raw, runtime)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_full_model_forward_backward_in_bf16_channels_last(backbone):
    from wpcrack.models.wpcracknet import build_model

    torch.manual_seed(0)
    model = build_model(_cfg(*BACKBONES[backbone])).cuda().to(memory_format=torch.channels_last).train()
    probe = _first_conv_probe(model)
    size = (96, 112)
    x = torch.randn(2, 3, *size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cls = model.classifier(x)
        enc = model.reconstructor.encode(x)
        image = model.reconstructor.decode(enc.fused, size)
        logits = model(x)
    assert probe == {"input_channels_last": True, "output_dtype": torch.bfloat16}
    assert logits.shape == (2, 1, *size) and image.shape == (2, 3, *size)
    loss = cls.logits.float().square().mean() + enc.logits.float().square().mean() + image.float().square().mean()
    loss = loss + logits.float().sigmoid().mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.is_cuda and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_each_training_phase_on_the_gpu(backbone):
    """Phases (a), (b), (c) with bf16 autocast and channels_last, each training only its network."""
    from wpcrack.models.wpcracknet import build_model
    from wpcrack.train.optim import build_optimizers, freeze_batchnorm
    from wpcrack.train.phases import Runtime, classifier_step, detector_step, reconstructor_step

    torch.manual_seed(0)
    cfg = _cfg(*BACKBONES[backbone], "train.detector_target=mask", "train.lr=0.05")
    runtime = Runtime.for_config(cfg)
    assert runtime.device.type == "cuda" and runtime.amp and runtime.channels_last
    model = build_model(cfg)
    if cfg.train.freeze_bn:
        freeze_batchnorm(model)
    model.to(runtime.device, memory_format=torch.channels_last)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    batch = _batch(runtime)

    before = snapshot(model)
    rec_parts, carry = reconstructor_step(model, optimizers, batch, cfg, runtime, pool=None)
    after = snapshot(model)
    assert changed(before, after) == {"reconstructor"}
    cls_parts = classifier_step(model, optimizers, batch, cfg, runtime, carry)
    before, after = after, snapshot(model)
    assert changed(before, after) == {"classifier"}
    result = detector_step(model, optimizers, batch, cfg, runtime, carry)
    before, after = after, snapshot(model)
    assert changed(before, after) == {"detector"}
    for parts in (rec_parts, cls_parts, result.losses):
        assert parts and all(torch.isfinite(torch.tensor(float(v))) for v in parts.values())
    assert all(p.is_cuda for p in model.parameters())


def test_train_step_with_pseudo_labels_from_the_crf_pool():
    from wpcrack.models.wpcracknet import build_model
    from wpcrack.method.pseudo_labels import CRFPool
    from wpcrack.train.optim import build_optimizers
    from wpcrack.train.phases import Runtime, train_step

    torch.manual_seed(0)
    cfg = _cfg(*TINY_MODEL, "pseudo_labels.workers=2", "pseudo_labels.iterations=2", "pseudo_labels.min_pixels=0")
    runtime = Runtime.for_config(cfg)
    model = build_model(cfg).to(runtime.device, memory_format=torch.channels_last)
    optimizers = build_optimizers(model, cfg, max_iterations=10)
    with CRFPool(cfg.pseudo_labels) as pool:
        result = train_step(model, optimizers, _batch(runtime), cfg, runtime, pool)
    assert result.losses and all(torch.isfinite(torch.tensor(float(v))) for v in result.losses.values())
    assert {"rec", "cls", "det", "crf_wait", "step"} <= set(result.seconds)
    assert result.seconds["step"] > 0


def test_slim_detector_under_torch_compile():
    from wpcrack.models.wpcracknet import build_model

    torch.manual_seed(0)
    model = build_model(_cfg(*TINY_MODEL)).cuda().eval()
    slim = model.slim(gating=False).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        eager = slim(x)
        compiled = torch.compile(slim)(x)
        full = model.predict(x)
    assert compiled.shape == eager.shape == (2, 1, 64, 64)
    assert torch.allclose(compiled, eager, atol=2e-3)
    assert torch.allclose(eager, full, atol=1e-4)


def test_benchmark_stage_gpu_rows(tmp_path):
    import json

    from wpcrack.diagnostics.benchmark import benchmark, device_modes
    from wpcrack.models.wpcracknet import build_model

    cfg = _cfg(*TINY_MODEL, "benchmark.size=64", "benchmark.batch_sizes=[2]", "benchmark.warmup=1",
               "benchmark.iterations=2", dataset="deepcrack")
    gpu_modes = [mode for device, mode in device_modes() if device == "cuda"]
    assert set(gpu_modes) >= {"fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile"}
    result = benchmark(cfg, tmp_path / "unused", tmp_path / "out", model=build_model(cfg))
    for mode in gpu_modes:
        run = result["runs"][f"cuda_{mode}_b2"]
        assert "error" not in run, run
        assert run["images_per_s"] > 0 and run["peak_memory_mb"] > 0
    assert result["environment"]["gpu"] == torch.cuda.get_device_name(0)
    assert json.loads((tmp_path / "out" / "deepcrack.json").read_text())["runs"].keys() == result["runs"].keys()
    assert "| cuda | bf16_channels_last_compile | 2 |" in (tmp_path / "out" / "deepcrack.md").read_text()


def test_checkpoint_saved_on_the_gpu_loads_on_the_cpu(tiny_data, tmp_path):
    """A short training on the GPU (the paper profile's loop: bf16, channels_last, CRF pool,
    cudnn autotuning), then its best.pt, whose tensors were CUDA tensors, predicts on the CPU."""
    from wpcrack.inference.loading import load_trained
    from wpcrack.train.checkpoint import BEST
    from wpcrack.train.loop import train

    cfg = _cfg(f"paths.data={tiny_data}", *TINY_DATA, *TINY_MODEL, *TINY_RUN)
    metrics = train(cfg, tmp_path, track=False)
    assert metrics["steps"] == 2 and torch.cuda.get_device_name(0) in metrics["hardware"]
    raw = torch.load(tmp_path / BEST, weights_only=True)  # no map_location: tensors come back where saved
    assert next(iter(raw["model"].values())).is_cuda
    x = torch.randn(1, 3, 64, 64)
    on_cpu = load_trained(tmp_path, cfg, "cpu")
    on_gpu = load_trained(tmp_path, cfg, "cuda")
    assert all(not p.is_cuda for p in on_cpu.parameters())
    with torch.inference_mode():
        assert torch.allclose(on_cpu.predict(x), on_gpu.predict(x.cuda()).cpu(), atol=1e-3)


# --- two processes, NCCL -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_rank(rank: int, port: int, data: Path, out: Path) -> None:
    """One torchrun-like process: trains, then saves its weights and the backend it used."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    import torch.distributed as dist

    import wpcrack.models.wpcracknet as wpcracknet
    from wpcrack.train.loop import train

    backends, models = [], []
    init, build = dist.init_process_group, wpcracknet.build_model

    def recording_init(backend=None, *args, **kwargs):
        backends.append(backend)
        return init(backend, *args, **kwargs)

    dist.init_process_group = recording_init
    wpcracknet.build_model = lambda cfg: models.append(build(cfg)) or models[-1]
    cfg = _cfg(f"paths.data={data}", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "train.epochs=2", "train.batch_size=2")
    metrics = train(cfg, out / "model", track=False)
    weights = {k: v.detach().cpu() for k, v in models[0].state_dict().items()}
    torch.save({"backends": backends, "metrics": metrics, "device": torch.cuda.current_device(), "model": weights},
               out / f"rank{rank}.pt")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_processes_train_data_parallel_over_nccl(tiny_data, tmp_path):
    mp.spawn(_nccl_rank, args=(_free_port(), tiny_data, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["backends"] for r in ranks] == [["nccl"], ["nccl"]]
    assert [r["device"] for r in ranks] == [0, 1]
    assert all(r["metrics"]["processes"] == 2 for r in ranks)
    a, b = ranks[0]["model"], ranks[1]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # one model on both GPUs
    saved = torch.load(tmp_path / "model" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved[k], a[k]) for k in a)  # and it is what rank 0 wrote
