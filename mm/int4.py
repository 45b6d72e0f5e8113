"""INT4 weight-only group-wise quantization: two 4-bit codes per byte, one scale and zero point per group.

A weight row of ``K`` inputs is cut into groups of ``G`` consecutive values. Each group is mapped
asymmetrically onto the codes 0..15 (``w ~ (q - zero) * scale``, the GPTQ/AWQ storage layout), with the
range widened to include 0 so that zero weights stay exactly zero. Codes are packed two per ``uint8``
(even column in the low nibble), scales are stored in float16 and zero points in ``uint8``. The forward
pass unpacks and dequantises the whole weight, then runs an ordinary ``F.linear``: the point is a
~7x smaller checkpoint and resident model (QLoRA's frozen base), not faster matmuls.

Index letters: n output features, k input features, g groups per row (k / G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QMAX = 15  # largest 4-bit code
GROUP_SIZES = (32, 64, 128)


def pack_int4(q: Tensor) -> Tensor:
    """(..., K) integer codes in [0, 15], K even -> (..., K / 2) uint8 (even column in the low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., K / 2) uint8 -> (..., K) uint8 codes in [0, 15]; the inverse of :func:`pack_int4`."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)  # (..., K / 2, 2) -> (..., K)


def check_group_size(k: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"INT4 group size must be a positive even number (32, 64, 128), got {group_size}")
    if k % group_size:
        raise ValueError(f"INT4 group size {group_size} does not divide the {k} input features")


def quantize_int4(w: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) float -> packed (N, K / 2) uint8, scale (N, K / G) float16, zero (N, K / G) uint8."""
    n, k = w.shape
    check_group_size(k, group_size)
    g = w.detach().float().reshape(n, k // group_size, group_size)  # (N, g, G)
    lo = g.amin(-1).clamp(max=0.0)  # (N, g); the range always holds 0
    hi = g.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / QMAX).clamp_min(1e-8).half()  # float16 is what is stored, so quantise with it
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, QMAX)  # (N, g)
    q = torch.round(g / s[..., None] + zero[..., None]).clamp(0, QMAX)  # (N, g, G)
    return pack_int4(q.reshape(n, k)), scale, zero.to(torch.uint8)


def dequantize_int4(
    packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The inverse of :func:`quantize_int4`: (N, K / 2), (N, g), (N, g) -> weights (N, K) in ``dtype``."""
    n = packed.shape[0]
    q = unpack_int4(packed).reshape(n, -1, group_size).float()  # (N, g, G)
    w = (q - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, -1).to(dtype)


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is held in group-wise INT4 (buffers only, no parameters)."""

    qweight: Tensor
    scale: Tensor
    zero: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64):
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        mod.qweight, mod.scale, mod.zero = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(N, K) weight in ``dtype``."""
        return dequantize_int4(self.qweight, self.scale, self.zero, self.group_size, dtype)

    def to_linear(self) -> nn.Linear:
        """An fp32 ``nn.Linear`` holding the dequantised weight (for merging adapters into it)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        # x (..., K) -> (..., N)
        # Dequantise straight into the input's dtype (bf16 under autocast), so no fp32 copy is made.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )
