"""Backbones, model parts and the assembled WP-CrackNet on tiny CPU inputs."""

from __future__ import annotations

import hashlib
import math
import socket
import urllib.error

import pytest
import torch
from torch import nn

from wpcrack.config import Config, ModelConfig
from wpcrack.errors import WpcrackError
from wpcrack.models.backbones import BACKBONES, create_backbone, crop_or_resize, upsample_to_input
from wpcrack.models.detector import Detector
from wpcrack.models.paam import PAAM, DirectionalConv
from wpcrack.models import weights_cache
from wpcrack.models.weights_cache import cache_weights, main as weights_cache_main
from wpcrack.models.wpcracknet import SlimDetector, build_model, count_parameters

SIZES = [(64, 64), (72, 100), (96, 130)]
TINY = dict(backbone="mobilenet_v2", pretrained=False, cam_channels=16, paam_channels=16,
            paam_reduction=4, detector_channels=8, decoder_channels=8)


def _ceil8(n: int) -> int:
    return math.ceil(n / 8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def light_backbones():
    return {name: create_backbone(name).eval() for name in ("mobilenet_v2", "resnet18", "tiny")}


@pytest.fixture(scope="module")
def heavy_backbones():
    return {name: create_backbone(name).eval() for name in ("resnet38d", "resnet50")}


def _check_output(backbone, size):
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, *size))
    grid = (_ceil8(size[0]), _ceil8(size[1]))
    assert out.mid.shape == (1, backbone.mid_channels, *grid)
    assert out.final.shape == (1, backbone.out_channels, *grid)
    assert [tuple(t.shape[1:]) for t in out.levels] == [(c, *grid) for c in backbone.level_channels]
    assert out.levels[-1] is out.final


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "tiny"])
def test_light_backbones_any_size(light_backbones, name, size):
    _check_output(light_backbones[name], size)


def test_tiny_backbone_is_small_and_has_no_download(light_backbones):
    assert count_parameters(light_backbones["tiny"]) < 200_000
    with pytest.raises(WpcrackError, match="pretrained=false"):
        create_backbone("tiny", pretrained=True)


@pytest.mark.parametrize("name", ["resnet38d", "resnet50"])
def test_heavy_backbones_non_multiple_size(heavy_backbones, name):
    _check_output(heavy_backbones[name], (36, 52))


@pytest.mark.parametrize("name", ["mobilenet_v2", "tiny"])
def test_truncated_backbone_keeps_mid_only(light_backbones, name):
    backbone = light_backbones[name]
    cut = backbone.truncated()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(cut.forward_mid(x), backbone.forward_mid(x))
        assert torch.equal(backbone(x).mid, backbone.forward_mid(x))
    assert count_parameters(cut) < count_parameters(backbone)
    with pytest.raises(RuntimeError, match="forward_mid"):
        cut(x)


def test_registry_error_lists_names():
    with pytest.raises(WpcrackError) as info:
        create_backbone("vgg16")
    for name in BACKBONES:
        assert name in str(info.value)


def test_resnet38d_has_no_download():
    with pytest.raises(WpcrackError, match="weights_path"):
        create_backbone("resnet38d", pretrained=True)


def test_weights_path_round_trip(tmp_path):
    source = create_backbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {**source.state_dict(), "fc.weight": torch.zeros(2)}}, path)
    loaded = create_backbone("resnet18", weights_path=path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(WpcrackError, match="does not fit"):
        create_backbone("mobilenet_v2", weights_path=path)
    with pytest.raises(WpcrackError, match="not found"):
        create_backbone("resnet18", weights_path=tmp_path / "missing.pth")


def test_pretrained_uses_hub_cache_and_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    timeout = socket.getdefaulttimeout()
    with pytest.raises(WpcrackError, match="mobilenet_v2-b0353104.pth"):
        create_backbone("mobilenet_v2", pretrained=True)
    assert socket.getdefaulttimeout() == timeout

    source = create_backbone("mobilenet_v2")
    (tmp_path / "checkpoints").mkdir()
    cached = tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth"
    torch.save(source.state_dict(), cached)
    with pytest.raises(WpcrackError, match="differs from the known"):
        create_backbone("mobilenet_v2", pretrained=True)
    monkeypatch.setitem(weights_cache.KNOWN_SHA256, cached.name, hashlib.sha256(cached.read_bytes()).hexdigest())
    loaded = create_backbone("mobilenet_v2", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_weights_cache(tmp_path, capsys):
    src = tmp_path / "plain.pth"
    src.write_bytes(b"weights")
    dest = tmp_path / "hub"
    assert cache_weights([src], dest) == [dest / "plain.pth"]
    assert (dest / "plain.pth").read_bytes() == b"weights"
    cache_weights([src], dest)
    assert "already cached" in capsys.readouterr().out
    bad = tmp_path / "net-0123abcd.pth"
    bad.write_bytes(b"not matching its hash prefix")
    with pytest.raises(WpcrackError, match="corrupt"):
        cache_weights([bad], dest)
    assert weights_cache_main([]) == 0
    assert weights_cache_main([str(tmp_path / "missing.pth")]) == 1


def test_upsample_keeps_cell_k_on_pixel_8k():
    cam = torch.zeros(1, 1, 3, 4)
    cam[0, 0, 1, 2] = 1.0
    up = upsample_to_input(cam, (20, 27))
    assert up.shape == (1, 1, 20, 27)
    assert divmod(int(up.flatten().argmax()), 27) == (8, 16)
    flat = upsample_to_input(torch.full((1, 1, 3, 4), 0.3), (20, 27))
    assert torch.allclose(flat, torch.full_like(flat, 0.3))
    assert crop_or_resize(torch.zeros(1, 1, 24, 32), (20, 27)).shape == (1, 1, 20, 27)


def test_directional_kernels_are_lines():
    k = DirectionalConv(2, kernel_size=3).kernels().detach()
    expected = {
        0: [(1, 0), (1, 1), (1, 2)],
        1: [(2, 0), (1, 1), (0, 2)],
        2: [(0, 1), (1, 1), (2, 1)],
        3: [(0, 0), (1, 1), (2, 2)],
    }
    for direction, cells in expected.items():
        support = {(i, j) for i in range(3) for j in range(3) if k[direction, :, i, j].abs().sum() > 0}
        assert support == set(cells)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (9, 13), (32, 32)])
def test_paam_any_size(size):
    paam = PAAM(12, 8, reduction=4)
    z = torch.randn(2, 12, *size)
    out = paam(z)
    assert out.shape == (2, 8, *size)
    attention = paam.spatial_attention(z)
    assert attention.shape == (2, 1, *size)
    assert bool(((attention >= 0.5) & (attention < 1)).all())


@pytest.mark.parametrize("size", SIZES)
def test_detector_output_is_exact_input_size(size):
    detector = Detector(8, 8)
    z = torch.randn(2, 8, _ceil8(size[0]), _ceil8(size[1]))
    assert detector(z, size).shape == (2, 1, *size)


@pytest.fixture(scope="module")
def model():
    return build_model(Config(model=ModelConfig(**TINY)))


@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_model_parts_shapes(model, size):
    x = torch.randn(2, 3, *size)
    grid = (_ceil8(size[0]), _ceil8(size[1]))
    cls = model.classifier(x)
    enc = model.reconstructor.encode(x)
    assert cls.cam.shape == enc.cam.shape == (2, 2, *grid)
    assert cls.logits.shape == enc.logits.shape == (2, 2)
    assert torch.allclose(cls.logits, cls.cam.mean(dim=(2, 3)))
    assert enc.fused.shape == (2, model.reconstructor.encoder.fused_channels, *grid)
    assert model.reconstructor.decode(enc.fused, size).shape == (2, 3, *size)
    assert model.reconstructor.decode(enc.fused).shape == (2, 3, 8 * grid[0], 8 * grid[1])
    assert model.detect(cls.mid, enc.mid, size).shape == (2, 1, *size)
    assert model(x).shape == (2, 1, *size)


@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_tiny_model_parts_shapes(size):
    m = build_model(Config(model=ModelConfig(**{**TINY, "backbone": "tiny"})))
    x = torch.randn(2, 3, *size)
    grid = (_ceil8(size[0]), _ceil8(size[1]))
    cls, enc = m.classifier(x), m.reconstructor.encode(x)
    assert cls.cam.shape == enc.cam.shape == (2, 2, *grid)
    assert enc.fused.shape == (2, m.reconstructor.encoder.fused_channels, *grid)
    assert m.reconstructor.decode(enc.fused, size).shape == (2, 3, *size)
    assert m.detect(cls.mid, enc.mid, size).shape == (2, 1, *size)
    with torch.inference_mode():
        assert torch.equal(m.slim()(x), m.predict(x))


def test_decoder_sees_only_the_masked_map(model):
    """With an all-zero mask, two different images reconstruct identically: no encoder bypass."""
    model.eval()
    with torch.no_grad():
        z1 = model.reconstructor.encode(torch.randn(1, 3, 64, 64)).fused
        z2 = model.reconstructor.encode(torch.randn(1, 3, 64, 64)).fused
        assert not torch.equal(z1, z2)
        assert torch.equal(model.reconstructor.decode(z1 * 0), model.reconstructor.decode(z2 * 0))
    model.train()


@pytest.mark.parametrize("gating", [True, False])
def test_slim_equals_predict(model, gating):
    x = torch.randn(2, 3, 72, 100)
    slim = model.slim(gating=gating)
    assert isinstance(slim, SlimDetector) and not slim.training
    with torch.inference_mode():
        assert torch.equal(slim(x), model.predict(x))
        if gating:
            assert torch.equal(slim.classify(x), model.classify(x))
    assert count_parameters(slim) < count_parameters(model)
    if not gating:
        with pytest.raises(RuntimeError, match="gating"):
            slim.classify(x)


def test_predict_restores_modes_and_gives_probabilities(model):
    model.train()
    frozen = model.classifier.backbone.features[0][1]
    frozen.eval()
    p = model.predict(torch.randn(2, 3, 40, 48))
    assert p.shape == (2, 1, 40, 48) and bool(((p >= 0) & (p <= 1)).all())
    assert model.training and model.detector.training and not frozen.training
    crack = model.classify(torch.randn(3, 3, 40, 48))
    assert crack.shape == (3,) and bool(((crack >= 0) & (crack <= 1)).all())


def test_cls_only_variant_without_paam():
    m = build_model(Config(model=ModelConfig(**{**TINY, "detector_inputs": "cls", "paam": False})))
    assert not isinstance(m.paam, PAAM)
    x = torch.randn(1, 3, 48, 40)
    cls = m.classifier(x)
    assert m.detect(cls.mid, None, (48, 40)).shape == (1, 1, 48, 40)
    slim = m.slim()
    assert slim.rec_backbone is None
    with torch.inference_mode():
        assert torch.equal(slim(x), m.predict(x))


def test_cls_rec_requires_rec_mid(model):
    cls = model.classifier(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="rec_mid"):
        model.detect(cls.mid, None, (32, 32))


def test_channels_last_and_cpu_autocast(model):
    model.eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(x)
    model.to(memory_format=torch.contiguous_format).train()
    assert torch.allclose(ref, cl, atol=1e-4)
    assert bf.shape == ref.shape and bool(torch.isfinite(bf).all())


def test_count_parameters_trainable_only():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 8 and count_parameters(layer, trainable_only=True) == 6



@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "tiny"])
def test_skips_are_at_strides_2_and_4(light_backbones, name):
    backbone = light_backbones[name]
    x = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        mid, skips = backbone.forward_mid_skips(x)
        assert torch.equal(mid, backbone.forward_mid(x))
        assert all(torch.equal(a, b) for a, b in zip(skips, backbone(x).skips, strict=True))
    assert [tuple(s.shape[1:]) for s in skips] == [
        (backbone.skip_channels[0], 36, 50), (backbone.skip_channels[1], 18, 25)]


@pytest.mark.parametrize("size", [(64, 64), (72, 100), (33, 47)])
def test_unet_detector_draws_at_input_size_and_learns_from_the_fine_skips(size):
    m = build_model(Config(model=ModelConfig(**{**TINY, "detector_decoder": "unet"})))
    x = torch.randn(2, 3, *size)
    cls = m.classifier(x)
    assert m.detect(cls.mid, m.reconstructor.encoder.backbone.forward_mid(x), size, cls.skips).shape == (2, 1, *size)
    skips = [s.detach().requires_grad_() for s in cls.skips]
    m.detect(cls.mid.detach(), torch.zeros_like(cls.mid), size, skips).sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in skips)
    with pytest.raises(ValueError, match="skips"):
        m.detect(cls.mid, cls.mid, size)
    with torch.inference_mode():
        assert torch.equal(m.slim()(x), m.predict(x))
        assert torch.equal(m.slim(gating=False)(x), m.predict(x))
