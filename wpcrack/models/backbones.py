"""Backbone registry: every backbone maps an image to stride-8 features.

Each backbone returns ``BackboneOutput(mid, final, levels, skips)``:
- ``mid``: an intermediate dilated block, the detector's input (paper 3.3, ``Z_in``);
- ``final``: the last map, where the CAM head sits;
- ``levels``: the maps the reconstructor fuses into ``Z`` (paper 3.2), last one = ``final``;
- ``skips``: the early maps at strides 2 and 4 (``skip_channels``), for a detector decoder with a
  fine-scale path (a 1-3 px crack has vanished from every stride-8 map).

All three are at output stride 8: the later stages keep stride 1 and dilate instead (``tiny``: 1x1
convs), so CAMs stay fine enough for thin cracks. Every stride-2 layer pads like a 3x3 conv with padding 1, so an HxW
image gives ceil(H/8) x ceil(W/8) maps for any H, W, and feature cell k is centred on pixel 8k
(``upsample_to_input`` relies on that).

Weights: ``weights_path`` (a state dict) wins whenever it is given; otherwise ``pretrained`` loads
torchvision's ImageNet weights from torch.hub's cache (``python -m wpcrack.models.weights_cache``
puts local files there), trying a download only when they are not cached.
"""

from __future__ import annotations

import abc
import copy
import socket
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wpcrack.errors import WpcrackError

OUTPUT_STRIDE = 8
DOWNLOAD_TIMEOUT_S = 30


class BackboneOutput(NamedTuple):
    mid: Tensor
    final: Tensor
    levels: list[Tensor]
    skips: list[Tensor]  # [stride 2, stride 4]


def crop_or_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Fit ``x`` to ``size``: crop the bottom/right overhang of a padded map, otherwise resize."""
    height, width = size
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if 0 <= h - height < OUTPUT_STRIDE and 0 <= w - width < OUTPUT_STRIDE:
        return x[..., :height, :width]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


def upsample_to_input(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of a stride-8 map to the input size, keeping cell k on pixel 8k.

    A plain resize to (H, W) would put cell k at pixel 8k + 3.5 (and stretch non-multiples of 8),
    a shift as wide as a crack. Maps that are not ceil(H/8) x ceil(W/8) are simply resized.
    """
    height, width = size
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if h != -(-height // OUTPUT_STRIDE) or w != -(-width // OUTPUT_STRIDE):
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    span = (OUTPUT_STRIDE * (h - 1) + 1, OUTPUT_STRIDE * (w - 1) + 1)
    if span != (h, w):
        x = F.interpolate(x, size=span, mode="bilinear", align_corners=True)
    pad_h, pad_w = max(height - span[0], 0), max(width - span[1], 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x[..., :height, :width]


class Backbone(nn.Module, abc.ABC):
    """Common interface; subclasses build layers and say which ones come after ``mid``."""

    mid_channels: int
    out_channels: int
    level_channels: tuple[int, ...]
    skip_channels: tuple[int, int]  # strides 2 and 4
    is_truncated = False

    def forward_mid(self, x: Tensor) -> Tensor:
        return self._to_mid(x)[0]

    def forward_mid_skips(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(mid, [stride-2 map, stride-4 map]): everything the detector reads from an image."""
        mid, _, skips = self._to_mid(x)
        return mid, skips

    def forward(self, x: Tensor) -> BackboneOutput:
        if self.is_truncated:
            raise RuntimeError(f"{type(self).__name__} was truncated after mid: call forward_mid")
        mid, early, skips = self._to_mid(x)
        final, late = self._from_mid(mid)
        return BackboneOutput(mid, final, [*early, *late], skips)

    def truncated(self) -> Backbone:
        """A copy holding only the layers up to ``mid`` (the detector's inference needs no more)."""
        clone = copy.deepcopy(self)
        clone._drop_after_mid()
        clone.is_truncated = True
        return clone

    @abc.abstractmethod
    def _to_mid(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(mid, fusion levels computed before mid, [stride-2 skip, stride-4 skip])."""

    @abc.abstractmethod
    def _from_mid(self, mid: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(final, fusion levels from mid on, ending with final)."""

    @abc.abstractmethod
    def _drop_after_mid(self) -> None:
        """Delete the layers that only ``_from_mid`` uses."""


# ----------------------------------------------------------------------------------------------
# ResNet38d (Wu et al., "Wider or deeper", as used by AffinityNet, IRN, ACR and the WP-CrackNet
# release). Attribute names follow the release so that its converted MXNet weights load as they are.


class ResBlock(nn.Module):
    """Pre-activation residual block with two 3x3 convs."""

    def __init__(self, in_channels, mid_channels, out_channels, stride=1, first_dilation=None, dilation=1):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(
            in_channels, mid_channels, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, the block's BN-ReLU'd input), the latter being a fusion level."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(x_bn_relu)
        branch2 = self.conv_branch2a(x_bn_relu)
        branch2 = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch2)))
        return branch1 + branch2, x_bn_relu


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck block (1x1, dilated 3x3, 1x1) with dropout, for b6 and b7."""

    def __init__(self, in_channels, out_channels, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(
            out_channels // 4, out_channels // 2, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_bn_relu = F.relu(self.bn_branch2a(x))
        branch2 = self.conv_branch2a(x_bn_relu)
        branch2 = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch2))))
        branch2 = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch2))))
        return self.conv_branch1(x_bn_relu) + branch2, x_bn_relu


class ResNet38d(Backbone):
    """b1 conv 64; b2-b4 residual (128, 256, 512; stride 8 at the end of b4); b5 dilated 2
    (512 -> 1024); b6-b7 dilated-4 bottlenecks (2048, 4096). ``mid`` = output of b5 (the release's
    detector input); levels = BN-ReLU'd inputs of b5 (512) and b6 (1024), and the final map (4096)."""

    mid_channels = 1024
    out_channels = 4096
    level_channels = (512, 1024, 4096)
    skip_channels = (128, 256)
    _after_mid = ("b5_1", "b5_2", "b6", "b7", "bn7")

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)
        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)
        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)
        self.b5 = ResBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = ResBlockBottleneck(1024, 2048, dilation=4, dropout=0.2)
        self.b7 = ResBlockBottleneck(2048, 4096, dilation=4, dropout=0.2)
        self.bn7 = nn.BatchNorm2d(4096)

    def _to_mid(self, x):
        x = self.conv1a(x)
        skips = []
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x, _ = getattr(self, name)(x)
            if name in ("b2_2", "b3_2"):
                skips.append(x)
        mid, level4 = self.b5(x)
        return mid, [level4], skips

    def _from_mid(self, mid):
        x, _ = self.b5_1(mid)
        x, _ = self.b5_2(x)
        x, level5 = self.b6(x)
        x, _ = self.b7(x)
        final = F.relu(self.bn7(x))
        return final, [level5, final]

    def _drop_after_mid(self):
        for name in self._after_mid:
            delattr(self, name)


# ----------------------------------------------------------------------------------------------
# torchvision backbones, dilated to output stride 8.


def _dilate(module: nn.Module, dilation: int) -> None:
    """Turn stride-2 3x3 convs into stride 1 and dilate the 3x3 convs of a stage in place.

    The strided conv gets ``dilation // 2`` and the others ``dilation``, exactly like torchvision's
    ``replace_stride_with_dilation``; strided 1x1 shortcuts just lose their stride.
    """
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        three = conv.kernel_size == (3, 3)
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            if three:
                conv.dilation = conv.padding = (dilation // 2, dilation // 2)
        elif three:
            conv.dilation = conv.padding = (dilation, dilation)


class MobileNetV2(Backbone):
    """torchvision MobileNetV2 with blocks 7-13 dilated 2 and 14-17 dilated 4.

    ``mid`` = block 13 (96 channels, end of the dilation-2 stage); levels = block 6 (32, last
    stride-8 block), block 13 and the final 1x1 conv (1280).
    """

    mid_channels = 96
    out_channels = 1280
    level_channels = (32, 96, 1280)
    skip_channels = (16, 24)
    _mid_index = 13

    def __init__(self):
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2().features
        _dilate(self.features[7:14], 2)
        _dilate(self.features[14:18], 4)

    def _to_mid(self, x):
        s2 = self.features[:2](x)
        s4 = self.features[2:4](s2)
        x = self.features[4:7](s4)
        return self.features[7 : self._mid_index + 1](x), [x], [s2, s4]

    def _from_mid(self, mid):
        final = self.features[self._mid_index + 1 :](mid)
        return final, [mid, final]

    def _drop_after_mid(self):
        self.features = self.features[: self._mid_index + 1]


class _TorchvisionResNet(Backbone):
    """torchvision ResNet with layer3 dilated 2 and layer4 dilated 4 (DeepLab style).

    ``mid`` = layer3; levels = layer2 (last stride-8 stage), layer3, layer4 (= final).
    """

    _factory: str

    def __init__(self):
        super().__init__()
        import torchvision.models as tvm

        net = getattr(tvm, self._factory)()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        _dilate(self.layer3, 2)
        _dilate(self.layer4, 4)

    def _to_mid(self, x):
        s2 = self.relu(self.bn1(self.conv1(x)))
        s4 = self.layer1(self.maxpool(s2))
        level2 = self.layer2(s4)
        return self.layer3(level2), [level2], [s2, s4]

    def _from_mid(self, mid):
        final = self.layer4(mid)
        return final, [mid, final]

    def _drop_after_mid(self):
        del self.layer4


class ResNet18(_TorchvisionResNet):
    _factory = "resnet18"
    mid_channels = 256
    out_channels = 512
    level_channels = (128, 256, 512)
    skip_channels = (64, 64)


class ResNet50(_TorchvisionResNet):
    _factory = "resnet50"
    mid_channels = 1024
    out_channels = 2048
    level_channels = (512, 1024, 2048)
    skip_channels = (64, 256)


# ----------------------------------------------------------------------------------------------
# Tiny: a few conv-BN-ReLU layers for the smoke profile (random init, a minute per run on a CPU).


def _cbr(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (3x3 with padding 1, so stride 2 gives ceil(n / 2) like the other backbones), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Tiny(Backbone):
    """A small plain CNN with no ImageNet weights: the README demo and CI train it from scratch.

    ``stem``: six 3x3 conv-BN-ReLU (16, 24, 24, 32, 32, 32 channels), three of them stride 2, from
    full resolution (a 1 px crack must survive the first layer) to stride 8. ``mid`` (64) and
    ``final`` (128) are two 1x1 conv-BN-ReLU each: no dilation, the receptive field stays the
    stem's 29 px, so a cell's CAM answers "is there a crack here" and stays on the crack instead of
    spreading over the image (randomly initialised dilated stages gave diffuse, gridded CAMs).
    Levels = stem output, mid, final.
    """

    mid_channels = 64
    out_channels = 128
    level_channels = (32, 64, 128)
    skip_channels = (24, 32)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            _cbr(3, 16), _cbr(16, 24, stride=2), _cbr(24, 24), _cbr(24, 32, stride=2), _cbr(32, 32),
            _cbr(32, 32, stride=2),
        )
        self.stage_mid = nn.Sequential(_cbr(32, 64, kernel_size=1), _cbr(64, 64, kernel_size=1))
        self.stage_final = nn.Sequential(_cbr(64, 128, kernel_size=1), _cbr(128, 128, kernel_size=1))

    def _to_mid(self, x):
        s2 = self.stem[:3](x)
        s4 = self.stem[3:5](s2)
        level = self.stem[5:](s4)
        return self.stage_mid(level), [level], [s2, s4]

    def _from_mid(self, mid):
        final = self.stage_final(mid)
        return final, [mid, final]

    def _drop_after_mid(self):
        del self.stage_final


# ----------------------------------------------------------------------------------------------
# Registry and weights.


class _Entry(NamedTuple):
    cls: Callable[[], Backbone]
    weights: str | None  # torchvision weights enum member, "Enum.MEMBER"; None: no public download


BACKBONES: dict[str, _Entry] = {
    "resnet38d": _Entry(ResNet38d, None),
    "mobilenet_v2": _Entry(MobileNetV2, "MobileNet_V2_Weights.IMAGENET1K_V1"),
    "resnet18": _Entry(ResNet18, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": _Entry(ResNet50, "ResNet50_Weights.IMAGENET1K_V1"),
    "tiny": _Entry(Tiny, None),
}


def create_backbone(name: str, pretrained: bool = False, weights_path: str | Path | None = None) -> Backbone:
    """Build a registered backbone; load ``weights_path`` if given, else ImageNet weights if ``pretrained``."""
    try:
        entry = BACKBONES[name]
    except KeyError:
        raise WpcrackError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None
    if weights_path is not None:
        state, source = _read_weights_file(Path(weights_path)), str(weights_path)
    elif not pretrained:
        return entry.cls()
    elif entry.weights is None:
        raise WpcrackError(
            f"backbone {name}: no ImageNet weights can be downloaded for it; set model.weights_path "
            "to a state dict (for resnet38d, the MXNet weights converted as in the AffinityNet/ACR "
            "code) or model.pretrained=false to train from random init"
        )
    else:
        state, source = _torchvision_weights(name, entry.weights)
    backbone = entry.cls()
    _load_into(backbone, state, source)
    return backbone


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WpcrackError(f"{path}: weights file not found (model.weights_path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WpcrackError(f"{path}: not a loadable PyTorch state dict ({exc.__class__.__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WpcrackError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _torchvision_weights(name: str, weights: str) -> tuple[dict[str, Tensor], str]:
    """ImageNet weights from torch.hub's cache, downloading them only when they are not cached."""
    import torchvision.models as tvm

    enum_name, member = weights.split(".")
    url = getattr(getattr(tvm, enum_name), member).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached.is_file():
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
        except Exception as exc:
            raise WpcrackError(
                f"backbone {name}: ImageNet weights {cached.name} are not in {cached.parent} and could not "
                f"be downloaded from {url} ({exc.__class__.__name__}: {exc}); copy that file there "
                f"(python -m wpcrack.models.weights_cache FILE), or set model.weights_path, "
                f"or model.pretrained=false"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
    from wpcrack.models.weights_cache import verify_weights

    verify_weights(cached)
    return _read_weights_file(cached), str(cached)


def _load_into(backbone: Backbone, state: dict[str, Tensor], source: str) -> None:
    """Load matching keys; every backbone parameter must be covered (extra keys, e.g. the ImageNet
    classifier, are ignored; BN batch counters may be absent, as in converted MXNet weights)."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WpcrackError(f"{source}: does not fit backbone {type(backbone).__name__}: missing {shown}")
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise WpcrackError(
            f"{source}: shape mismatch for {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        )
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
