"""Static INT8 inference for a BatchNorm-folded EfficientNet-Lite, on oneDNN's quantized convolutions.

Every convolution runs as ``quantized::conv2d`` / ``quantized::conv2d_relu`` on uint8 activations (one
scale and zero point per tensor) and int8 weights (symmetric, one scale per output channel); residual sums
run as ``quantized::add``. The weights are packed for oneDNN, whose int8 kernels use VNNI/AMX on x86: on
this machine's CPU the feature extractor runs ~8x faster than the fp32 channels_last one (FBGEMM's and the
"x86" engine's quantized convolutions measured 2-4x *slower* than fp32 here, so oneDNN it is).

Activation ranges are static:

- the input: the normalised pixels' range;
- ReLU6 outputs: ``[0, min(6, calibrated max)]``; the fused ReLU gives the lower clamp and uint8
  saturation the upper one, so ReLU6 costs nothing;
- the 1x1 projection outputs (no activation) and the residual sums: calibrated min / max.

Weights: int8 per output channel (absmax). Depthwise kernels have 9-25 taps per channel, and their rounding
error shifts each channel's mean output; bias correction (Nagel et al., "Data-Free Quantization", 2019)
subtracts that shift, ``(W_q - W) . E[x]``, from the bias, with E[x] the channel means of the conv's input
seen during calibration. On the sample corpus' test images it takes the pooled-feature cosine of
weight-only int8 from 0.994 to 0.999.

The calibration of the packaged ImageNet weights (ranges and depthwise input means) ships beside this file
(``CALIBRATION_FILE``, measured by :func:`calibrate` on the sample corpus' training images); regenerate it
with ``python -m mm.encoders.recalibrate IMAGE...``.

TensorFlow "SAME" padding of stride-2 convolutions is asymmetric on even inputs (one more zero after than
before). Padding a quantized tensor is a slow copy here, so those convolutions instead get a kernel one
tap larger with a zero first row/column and symmetric padding: the same sums, no padded copy.

Index letters: b batch, c channels, h/w spatial.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mm.encoders.efficientnet_lite import EfficientNetLite, MBConv, SameConv2d
from mm.qengine import ONEDNN, engine, onednn_available
from mm.quantize import per_channel_int8

log = logging.getLogger(__name__)

CALIBRATION_FILE = Path(__file__).with_name("efficientnet_lite0_int8.json")


def calibration_file(variant: str = "lite0") -> Path:
    """Where the shipped calibration of a variant's packaged weights lives (it may not exist)."""
    return CALIBRATION_FILE.with_name(f"efficientnet_{variant}_int8.json")


RELU6 = 6.0
Range = tuple[float, float]


def int8_convs_available() -> bool:
    """Whether this torch build has oneDNN's quantized convolutions (x86 builds do)."""
    return onednn_available() and hasattr(torch.ops.quantized, "conv2d_prepack")


@functools.cache
def conv_weight_levels() -> int:
    """The largest int8 weight code oneDNN's int8 convolution multiplies exactly here: 127, else 63.

    Without VNNI (AVX2-only x86 CPUs) the kernel adds pairs of uint8 x int8 products into saturating
    int16 sums, and 255 * 127 * 2 > 32767: results are silently wrong (measured on an AVX2 AMD EPYC:
    pooled Lite0 features at cosine 0.74 to fp32 on real pictures). Weights of at most 63 keep every
    pair under 2**15 (255 * 63 * 2 = 32130), at one bit of weight precision (cosine 0.955-0.99 there,
    still 2.8x faster than fp32). VNNI/AMX accumulate in int32 and keep all 127 levels. The probe is
    the worst case: every activation code 255 times every weight code 127, once per process.
    """
    c = 64
    with torch.inference_mode(False), torch.no_grad():
        x = torch.quantize_per_tensor(torch.full((1, c, 1, 1), 255.0), 1.0, 0, torch.quint8)
        w = torch._make_per_channel_quantized_tensor(
            torch.full((1, c, 1, 1), 127, dtype=torch.int8),
            torch.ones(1, dtype=torch.double),
            torch.zeros(1, dtype=torch.long),
            0,
        )
        exact = 255.0 * 127.0 * c
        try:
            with engine(ONEDNN):
                packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [0, 0], [1, 1], 1)
            y = torch.ops.quantized.conv2d(x, packed, exact / 200.0, 0).dequantize()
        except (RuntimeError, NotImplementedError):
            return 63
    levels = 127 if abs(float(y.flatten()[0]) - exact) <= exact / 100 else 63
    if levels < 127:
        log.info("int8 convolutions accumulate in int16 on this CPU (no VNNI): 7-bit weights")
    return levels


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 scale and zero point covering [lo, hi] (widened to include 0, so zero is exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    return scale, int(min(max(round(-lo / scale), 0), 255))


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" zero padding (before, after) of one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Int8Conv2d(nn.Module):
    """A folded (biased) conv as a static int8 conv, output requantized to ``out_range``.

    ``relu6``: the conv is followed by ReLU6, fused (see the module docstring). A :class:`SameConv2d`
    keeps its input-dependent "SAME" padding: one packed kernel per (height, width) parity.
    """

    def __init__(self, conv: nn.Conv2d, out_range: Range, relu6: bool, input_mean: Tensor | None = None):
        super().__init__()
        if conv.bias is None or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("Int8Conv2d takes BatchNorm-folded convs (biased, undilated, zero-padded)")
        self.relu6 = relu6
        self.scale, self.zero_point = _qparams(*out_range)
        self.kernel, self.stride = conv.kernel_size, conv.stride
        self.same = isinstance(conv, SameConv2d)
        if self.same and max(self.stride) > 2:
            raise ValueError("Int8Conv2d supports SAME padding for strides 1 and 2 only")
        w = conv.weight.detach().float()  # (C_out, C_in / groups, kh, kw)
        codes, scales = per_channel_int8(w, conv_weight_levels())  # (C_out, C_in / groups, kh, kw), (C_out,)
        bias = conv.bias.detach().float().clone()  # (C_out,)
        if input_mean is not None:
            bias -= _weight_error_shift(w, codes, scales, input_mean, conv.groups)
        with engine(ONEDNN), torch.inference_mode(False), torch.no_grad():
            if self.same:
                self._packed = {
                    parity: self._pack(
                        self._grow(codes, parity), bias, scales, self._padding(parity), conv.groups
                    )
                    for parity in ((0, 0), (0, 1), (1, 0), (1, 1))
                }
            else:
                self._packed = {None: self._pack(codes, bias, scales, conv.padding, conv.groups)}

    def _pack(self, codes: Tensor, bias: Tensor, scales: Tensor, padding, groups: int):
        zeros = torch.zeros(len(scales), dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(codes, scales.double(), zeros, 0)
        return torch.ops.quantized.conv2d_prepack(qw, bias, list(self.stride), list(padding), [1, 1], groups)

    def _pads(self, parity: tuple[int, int]) -> list[tuple[int, int]]:
        # any size of the given parity pads alike for stride <= 2 (the only strides EfficientNet uses)
        return [_same_pad(2 + p, k, s) for p, k, s in zip(parity, self.kernel, self.stride, strict=True)]

    def _padding(self, parity: tuple[int, int]) -> tuple[int, int]:
        return tuple(after for _, after in self._pads(parity))  # type: ignore[return-value]

    def _grow(self, w: Tensor, parity: tuple[int, int]) -> Tensor:
        """One zero tap in front along each dimension padded one more after than before."""
        (bh, ah), (bw, aw) = self._pads(parity)
        eh, ew = ah - bh, aw - bw
        out = w.new_zeros(w.shape[0], w.shape[1], w.shape[2] + eh, w.shape[3] + ew)
        out[:, :, eh:, ew:] = w
        return out

    def forward(self, x: Tensor) -> Tensor:  # quint8 (B, C_in, H, W) -> quint8 (B, C_out, H', W')
        key = (x.shape[-2] % 2, x.shape[-1] % 2) if self.same else None
        op = torch.ops.quantized.conv2d_relu if self.relu6 else torch.ops.quantized.conv2d
        return op(x, self._packed[key], self.scale, self.zero_point)


class Int8MBConv(nn.Module):
    """:class:`MBConv` on int8 activations: expand (ReLU6) -> depthwise (ReLU6) -> project (+ residual)."""

    def __init__(self, block: MBConv, name: str, cal: Calibration):
        super().__init__()
        ranges = cal.ranges
        self.expand = (
            Int8Conv2d(block._expand_conv, _relu6_range(ranges, f"{name}._expand_conv"), True)
            if block.has_expand
            else None
        )
        dw = f"{name}._depthwise_conv"
        self.depthwise = Int8Conv2d(block._depthwise_conv, _relu6_range(ranges, dw), True, cal.mean(dw))
        self.project = Int8Conv2d(block._project_conv, _range(ranges, f"{name}._project_conv"), False)
        self.residual = block.residual
        self.add_scale, self.add_zero_point = _qparams(*_range(ranges, name)) if block.residual else (1.0, 0)

    def forward(self, x: Tensor) -> Tensor:  # quint8 (B, C_in, H, W) -> quint8 (B, C_out, H', W')
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        if self.residual:
            return torch.ops.quantized.add(x, h, self.add_scale, self.add_zero_point)
        return h


class Int8EfficientNetFeatures(nn.Module):
    """``EfficientNetLite.features`` in static int8: float pixels in, float feature map out."""

    def __init__(self, net: EfficientNetLite, cal: Calibration):
        super().__init__()
        ranges = cal.ranges
        if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
            raise ValueError("fold the BatchNorms first (mm.encoders.efficientnet_lite.fold_batchnorms)")
        self.in_scale, self.in_zero_point = _qparams(*_range(ranges, "input"))
        self.stem = Int8Conv2d(net._conv_stem, _relu6_range(ranges, "_conv_stem"), True)
        self.blocks = nn.ModuleList(Int8MBConv(b, f"_blocks.{i}", cal) for i, b in enumerate(net._blocks))
        self.head = Int8Conv2d(net._conv_head, _relu6_range(ranges, "_conv_head"), True)

    def forward(self, pixels: Tensor) -> Tensor:  # (B, 3, H, W) float -> (B, 1280, H/32, W/32) float
        x = pixels.float().contiguous(memory_format=torch.channels_last)
        q = torch.quantize_per_tensor(x, self.in_scale, self.in_zero_point, torch.quint8)
        q = self.stem(q)
        for block in self.blocks:
            q = block(q)
        return self.head(q).dequantize()


def _weight_error_shift(w: Tensor, codes: Tensor, scales: Tensor, input_mean: Tensor, groups: int) -> Tensor:
    """(C_out,) mean output shift the int8 ``codes * scales`` of a depthwise ``w`` cause: (W_q - W) . E[x]."""
    if groups != w.shape[0] or w.shape[1] != 1 or input_mean.shape != (w.shape[0],):
        raise ValueError("bias correction is implemented for depthwise convs (one input channel each)")
    q = codes.float() * scales[:, None, None, None]
    return (q - w).sum(dim=(1, 2, 3)) * input_mean.float()


def _range(ranges: dict[str, Range], name: str) -> Range:
    if name not in ranges:
        raise ValueError(f"no calibrated activation range for {name!r}; recalibrate (calibrate())")
    lo, hi = ranges[name]
    return float(lo), float(hi)


def _relu6_range(ranges: dict[str, Range], name: str) -> Range:
    hi = ranges[name][1] if name in ranges else RELU6
    return 0.0, min(RELU6, float(hi))


@dataclass(frozen=True)
class Calibration:
    """Activation ranges (min, max) by module name, and the per-channel input means of depthwise convs."""

    ranges: dict[str, Range]
    means: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, name: str) -> Tensor | None:
        return torch.tensor(self.means[name]) if name in self.means else None

    def to_dict(self) -> dict:
        return {
            "ranges": {k: [round(lo, 5), round(hi, 5)] for k, (lo, hi) in sorted(self.ranges.items())},
            "means": {k: [round(v, 5) for v in vs] for k, vs in sorted(self.means.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        ranges = {k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()}
        return cls(ranges, {k: [float(x) for x in v] for k, v in d.get("means", {}).items()})


def calibrate(net: EfficientNetLite, batches: Iterable[Tensor]) -> Calibration:
    """Observe ``net.features`` on normalised pixel batches (B, 3, H, W); ``net`` folded or not.

    Ranges: the input's, every conv's output (before its ReLU6, as the int8 graph requantizes it) and
    every residual block's output. Means: the per-channel mean input of every depthwise conv.
    """
    seen: dict[str, list[float]] = {}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, t: Tensor) -> None:
        lo, hi = float(t.min()), float(t.max())
        cur = seen.setdefault(name, [lo, hi])
        cur[0], cur[1] = min(cur[0], lo), max(cur[1], hi)

    def observe_input(name: str, x: Tensor) -> None:  # x (B, C, H, W)
        sums[name] = sums.get(name, 0) + x.double().sum(dim=(0, 2, 3))
        counts[name] = counts.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]

    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, MBConv) and m.residual):
            hooks.append(m.register_forward_hook(lambda _m, _i, out, name=name: observe(name, out)))
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            hooks.append(m.register_forward_hook(lambda _m, inp, _o, name=name: observe_input(name, inp[0])))
    try:
        with torch.no_grad():
            for pixels in batches:
                observe("input", pixels)
                net.features(pixels.contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("calibration saw no images")
    means = {k: (sums[k] / counts[k]).tolist() for k in sums}
    return Calibration({k: (v[0], v[1]) for k, v in seen.items()}, means)


def default_calibration(variant: str = "lite0") -> Calibration:
    """The shipped calibration of a variant's packaged ImageNet weights (Lite0's unless told)."""
    path = calibration_file(variant)
    if not path.is_file():
        raise ValueError(
            f"no int8 calibration ships for EfficientNet-{variant.capitalize()}: calibrate on your images "
            "(mm quantize --calibrate DIR, or python -m mm.encoders.recalibrate --variant ...)"
        )
    return Calibration.from_dict(json.loads(path.read_text()))
