"""Post-training quantization of a model's ``nn.Linear`` layers and quantized checkpoints.

- ``int8``: dynamic quantization (:class:`Int8Linear`): per-output-channel symmetric int8 weights,
  activations quantised per call (per tensor, asymmetric uint8). The matmul runs in
  ``quantized::linear_dynamic`` (the kernel behind the deprecated
  ``torch.ao.quantization.quantize_dynamic``; ``torch._int_mm`` measured 3-5x slower than fp32 here),
  with weights packed for oneDNN where the build has it (VNNI/AMX; 2x faster than FBGEMM here, see
  :mod:`mm.qengine`).
  Activations use the full 8-bit range when the kernel accumulates it exactly (VNNI/AMX CPUs; checked
  once per process by :func:`full_range_exact`), else 7 bits (``reduce_range``, which on the shipped
  default cost 0.5-1.2 points of text cosine per MiniLM layer group). Weights are stored as plain int8
  tensors + float32 scales, so checkpoints stay safetensors; the kernel's packed form is rebuilt on
  first use. Without the kernel the layer dequantises and runs ``F.linear``.
- ``int4``: weight-only group-wise (:class:`mm.int4.Int4Linear`): smaller, not faster. The tensors that
  stay unquantized (norms, biases, routers, gates, embeddings, the audio patch stem) are stored in
  float16 on disk (``residual_fp16``) and upcast to float32 when the checkpoint loads.

Which layers: every ``nn.Linear`` of the backbone and the projection heads, except the MoE routers and
the AAM complexity gates (small, and their outputs are discrete decisions that quantization noise can
flip), and except the names matching ``QuantSpec.exclude`` (fnmatch patterns; none by default). The
MoE experts are quantized too: each call sees only the tokens routed to one expert, and on the shipped
default quantizing them neither sped up nor slowed down the backbone measurably (it is dominated by
routing and dispatch), while it keeps the int8 checkpoint at ~1/4 of fp32.
Frozen packaged encoders (MiniLM) are quantized too for ``int8`` (speed; they are not in our
checkpoint, so they are re-quantized from the packaged weights when the checkpoint loads) and left in
fp32 for ``int4`` (weight-only INT4 would only slow them down, and saves no checkpoint space).

The frozen EfficientNet image encoder's convolutions run in static INT8 for ``int8`` when encoders are
quantized (:mod:`mm.encoders.efficientnet_int8`: oneDNN's quantized convolutions, calibrated activation
ranges shipped with the code, bias-corrected depthwise weights; re-applied when the checkpoint loads, and
left in fp32 where the torch build has no oneDNN). Dynamic INT8 does not suit them: running the 1x1
convolutions as int8 linears over channels_last measured slower than oneDNN's fp32 convolutions (the
feature maps are large and memory-bound, and dynamic quantization adds passes over them). The frozen
EfficientNet folds its BatchNorms into its convolutions when it loads
(:func:`mm.encoders.efficientnet_lite.fold_batchnorms`, exact, ~1.4-1.5x faster images in fp32 too), so
int8's speedup over fp32 is quantization's alone.

This module works on layers: which ones, and what replaces them. A quantized checkpoint is an ordinary
checkpoint directory plus ``quantization.json`` (the spec and the replaced module names):
:mod:`mm.checkpoint` reads it and re-applies the spec before the weights load, so the checkpoint serves
like any other, and :mod:`mm.quantize_checkpoint` writes one from a model.

Index letters: n output features, k input features, m rows (tokens).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.int4 import GROUP_SIZES, Int4Linear
from mm.qengine import engine, linear_engine, linear_engines

log = logging.getLogger(__name__)

FORMAT = 1
MODES = ("int8", "int4")
SKIP_PARTS = frozenset({"router", "gate"})  # module-name parts never quantized (see the module docstring)


@dataclass(frozen=True)
class QuantSpec:
    mode: Literal["int8", "int4"] = "int8"
    group_size: int = 64  # INT4 group size along the input features (32, 64 or 128)
    encoders: bool | None = None  # quantize frozen packaged encoders too; None: yes for int8, no for int4
    exclude: tuple[str, ...] = ()  # fnmatch patterns of module names kept in fp32
    residual_fp16: bool | None = None  # store unquantized float tensors in fp16; None: yes for int4
    # static INT8 convolutions' calibration (efficientnet_int8.Calibration.to_dict()); None: the shipped one
    calibration: dict[str, Any] | None = None
    modules: tuple[str, ...] = ()  # the replaced module names (filled in by quantize_model)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantization mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"INT4 group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def quantize_encoders(self) -> bool:
        return self.mode == "int8" if self.encoders is None else self.encoders

    @property
    def static_convs(self) -> bool:
        """Whether frozen encoders' convolutions run in static INT8 (int8 with quantized encoders)."""
        return self.mode == "int8" and self.quantize_encoders

    @property
    def fp16_residuals(self) -> bool:
        return self.mode == "int4" if self.residual_fp16 is None else self.residual_fp16

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"format": FORMAT, **d, "exclude": list(self.exclude), "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["modules"] = tuple(kw.get("modules", ()))
        kw["exclude"] = tuple(kw.get("exclude", ()))
        return cls(**kw)


def _fbgemm_ok() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and any(e in engines for e in ("x86", "fbgemm"))


@functools.cache
def full_range_exact() -> bool:
    """Whether ``quantized::linear_dynamic`` accumulates full-range (8-bit) activations exactly here.

    Without VNNI, FBGEMM multiplies uint8 x int8 pairs into saturating int16 sums (255 * 127 * 2 >
    32767), which is why ``reduce_range`` (7-bit activations) exists; VNNI/AMX accumulate in int32. The
    probe is the worst case: every activation code 255 times every weight 127.
    """
    if not _fbgemm_ok():
        return False
    k = 64
    with torch.inference_mode(False), torch.no_grad():
        w = torch._make_per_channel_quantized_tensor(
            torch.full((4, k), 127, dtype=torch.int8),
            torch.ones(4, dtype=torch.double),
            torch.zeros(4, dtype=torch.long),
            0,
        )
        for name in linear_engines():  # every engine Int8Linear may run on must be exact
            try:
                with engine(name):
                    packed = torch.ops.quantized.linear_prepack(w, None)
                y = torch.ops.quantized.linear_dynamic(torch.ones(2, k), packed, False)
            except (RuntimeError, NotImplementedError):
                return False
            if not torch.allclose(y, torch.full_like(y, 127.0 * k), rtol=1e-3):
                return False
    return True


def per_channel_int8(w: Tensor, levels: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes of ``w`` (N, ...) with one scale per output channel (dim 0): codes, scales (N,).

    ``levels``: the largest code (127; 63 for kernels that would overflow, see
    :func:`mm.encoders.efficientnet_int8.conv_weight_levels`).

    ``codes * scales`` (broadcast over the trailing dims) is the weight the int8 kernels compute with.
    """
    w = w.float()
    scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-8) / levels  # (N,)
    view = scale.view(-1, *([1] * (w.dim() - 1)))
    return torch.round(w / view).clamp(-levels, levels).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with per-channel symmetric int8 weights and dynamically quantised inputs."""

    qweight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: dict[str, Any] = {}  # the kernels' packed weights by engine, built on first use
        self._kernel = _fbgemm_ok()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.qweight, mod.scale = per_channel_int8(linear.weight.detach())
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]  # (N, K)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = {}  # new weights: repack on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _pack(self, name: str) -> Any:
        """The weight packed for engine ``name`` (oneDNN for many rows, else the default: mm.qengine)."""
        if name not in self._packed:
            with torch.inference_mode(False), torch.no_grad():
                q = torch._make_per_channel_quantized_tensor(
                    self.qweight.clone(),
                    self.scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long),
                    0,
                )
                bias = None if self.bias is None else self.bias.clone()
                with engine(name):
                    self._packed[name] = torch.ops.quantized.linear_prepack(q, bias)
        return self._packed[name]

    def forward(self, x: Tensor) -> Tensor:
        # x (..., K) -> (..., N)
        lead = x.shape[:-1]
        if self._kernel and x.numel():
            try:
                x2 = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
                packed = self._pack(linear_engine(x2.shape[0]))
                # (M, N); reduce_range (7-bit activations) only where int16 accumulation would saturate
                y = torch.ops.quantized.linear_dynamic(x2, packed, not full_range_exact())
                return y.reshape(*lead, self.out_features).to(x.dtype)
            except (RuntimeError, NotImplementedError) as e:  # no int8 kernel in this build: dequantise
                log.warning("int8 kernel unavailable (%s); falling back to dequantised matmul", e)
                self._kernel = False
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def select_linears(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Names of the ``nn.Linear`` modules ``spec`` quantizes (see the module docstring for the rule)."""
    if any(".lora_A." in n or n.endswith(".base_layer") for n, _ in model.named_modules()):
        raise ValueError("this model carries unmerged LoRA adapters: merge them first (mm finetune merge)")
    encoders = getattr(model, "encoders", {})
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or SKIP_PARTS & set(name.split(".")):
            continue
        parts = name.split(".")
        encoder = encoders[parts[1]] if parts[0] == "encoders" and parts[1] in encoders else None
        if encoder is not None and getattr(encoder, "frozen", False) and not spec.quantize_encoders:
            continue
        if spec.mode == "int4" and (mod.in_features % spec.group_size or mod.in_features < spec.group_size):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in spec.exclude):
            continue
        names.append(name)
    return names


def quantize_model(model: nn.Module, spec: QuantSpec) -> QuantSpec:
    """Replace the selected Linear layers in place; returns ``spec`` with ``modules`` filled in.

    When ``spec.modules`` is already set (loading a checkpoint) exactly those modules are replaced.
    """
    names = list(spec.modules) or select_linears(model, spec)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"cannot quantize {name}: it is a {type(lin).__name__}, not nn.Linear")
        if spec.mode == "int8":
            new: nn.Module = Int8Linear.from_linear(lin)
        else:
            new = Int4Linear.from_linear(lin, spec.group_size)
        setattr(parent, child, new)
    convs = _quantize_frozen_convs(model, spec.calibration) if spec.static_convs else []
    if names or convs:
        model.requires_grad_(False)  # a quantized model is for inference (or a frozen QLoRA base)
    log.info(
        "quantized %d Linear layers to %s; static INT8 convs: %s", len(names), spec.mode, convs or "none"
    )
    return dataclasses.replace(spec, modules=tuple(names))


def _quantize_frozen_convs(model: nn.Module, calibration: dict[str, Any] | None) -> list[str]:
    """Static INT8 convolutions for the frozen encoders that offer them; returns their modality names."""
    done = []
    for name, enc in getattr(model, "encoders", {}).items():
        quantize = getattr(enc, "quantize_convs", None)
        if quantize is not None and getattr(enc, "frozen", False) and quantize(calibration):
            done.append(name)
    return done


def calibrate_convs(model: nn.Module, images: Sequence[str | Path]) -> dict[str, Any]:
    """Calibrate the image encoder's static INT8 convolutions on ``images`` (files like those to index)."""
    enc = dict(getattr(model, "encoders", {}).items()).get("image")
    if enc is None or not hasattr(enc, "calibrate_convs"):
        raise ValueError("this model's image encoder has no static INT8 convolutions to calibrate")
    if not images:
        raise ValueError("no calibration images given")
    return enc.calibrate_convs(images).to_dict()
