"""Post-training quantization of a model's ``nn.Linear`` layers and quantized checkpoints.

- ``int8``: dynamic quantization (:class:`Int8Linear`): per-output-channel symmetric int8 weights,
  activations quantised per call. The matmul runs in FBGEMM's ``quantized::linear_dynamic`` (the kernel
  behind the deprecated ``torch.ao.quantization.quantize_dynamic``; measured ~2x faster than fp32 on
  this CPU, where ``torch._int_mm`` measured 3-5x slower than fp32). Weights are stored as plain int8
  tensors + float32 scales, so checkpoints stay safetensors; the kernel's packed form is rebuilt on
  first use. Without the kernel the layer dequantises and runs ``F.linear``.
- ``int4``: weight-only group-wise (:class:`mm.int4.Int4Linear`): smaller, not faster.

Which layers: every ``nn.Linear`` of the backbone and the projection heads, except the MoE routers and
the AAM complexity gates (small, and their outputs are discrete decisions that quantization noise can
flip). Frozen packaged encoders (MiniLM) are quantized too for ``int8`` (speed; they are not in our
checkpoint, so they are re-quantized from the packaged weights when the checkpoint loads) and left in
fp32 for ``int4`` (weight-only INT4 would only slow them down, and saves no checkpoint space).
Convolutions (EfficientNet, the audio patch stem) are not touched.

A quantized checkpoint is an ordinary checkpoint directory plus ``quantization.json`` (the spec and the
replaced module names); ``mm.model.create_model`` calls :func:`apply_checkpoint_quantization` before it
loads the weights, so the checkpoint serves like any other.

Index letters: n output features, k input features, m rows (tokens).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.int4 import GROUP_SIZES, Int4Linear

log = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
FORMAT = 1
MODES = ("int8", "int4")
SKIP_PARTS = frozenset({"router", "gate"})  # module-name parts never quantized (see the module docstring)


@dataclass(frozen=True)
class QuantSpec:
    mode: Literal["int8", "int4"] = "int8"
    group_size: int = 64  # INT4 group size along the input features (32, 64 or 128)
    encoders: bool | None = None  # quantize frozen packaged encoders too; None: yes for int8, no for int4
    modules: tuple[str, ...] = ()  # the replaced module names (filled in by quantize_model)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantization mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"INT4 group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def quantize_encoders(self) -> bool:
        return self.mode == "int8" if self.encoders is None else self.encoders

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self), "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["modules"] = tuple(kw.get("modules", ()))
        return cls(**kw)


def _fbgemm_ok() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and any(e in engines for e in ("x86", "fbgemm"))


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
        self._packed: Any = None  # FBGEMM's packed weight, built on first use (not state)
        self._kernel = _fbgemm_ok()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # (N,)
        mod.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        mod.scale = scale
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]  # (N, K)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None  # new weights: repack on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _pack(self) -> Any:
        if self._packed is None:
            with torch.inference_mode(False), torch.no_grad():
                q = torch._make_per_channel_quantized_tensor(
                    self.qweight.clone(),
                    self.scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long),
                    0,
                )
                bias = None if self.bias is None else self.bias.clone()
                self._packed = torch.ops.quantized.linear_prepack(q, bias)
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        # x (..., K) -> (..., N)
        lead = x.shape[:-1]
        if self._kernel and x.numel():
            try:
                y = torch.ops.quantized.linear_dynamic(
                    x.reshape(-1, self.in_features).float().contiguous(), self._pack(), True
                )  # (M, N); reduce_range=True: 7-bit activations keep FBGEMM's int16 accumulation exact
                return y.reshape(*lead, self.out_features).to(x.dtype)
            except (RuntimeError, NotImplementedError) as e:  # no FBGEMM in this build: dequantise
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
    if names:
        model.requires_grad_(False)  # a quantized model is for inference (or a frozen QLoRA base)
    log.info("quantized %d Linear layers to %s", len(names), spec.mode)
    return dataclasses.replace(spec, modules=tuple(names))


def read_spec(checkpoint: str | Path) -> QuantSpec | None:
    """The quantization spec stored beside a checkpoint (a directory, or its weights file), or None."""
    p = Path(checkpoint)
    f = (p if p.is_dir() else p.parent) / QUANT_FILE
    if not p.exists() or not f.exists():
        return None
    try:
        return QuantSpec.from_dict(json.loads(f.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f} is not a valid quantization spec: {e}") from e


def apply_checkpoint_quantization(model: nn.Module, checkpoint: str | Path) -> QuantSpec | None:
    """Make ``model`` match a quantized checkpoint's layout before its weights load (no-op otherwise)."""
    spec = read_spec(checkpoint)
    if spec is not None:
        quantize_model(model, spec)
    return spec


def save_quantized(model: nn.Module, spec: QuantSpec, out_dir: str | Path) -> Path:
    """Write a quantized model as a checkpoint: config.json, model.safetensors, quantization.json."""
    from mm.model import save_model

    if not spec.modules:
        raise ValueError("spec lists no quantized modules: pass the spec quantize_model returned")
    out = save_model(model, out_dir)  # type: ignore[arg-type]
    (out / QUANT_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return out


def quantize_checkpoint(
    model: str | Path, mode: str, out_dir: str | Path, group_size: int = 64, encoders: bool | None = None
) -> tuple[Path, QuantSpec]:
    """Load ``model`` (a name or checkpoint), quantize it and save it to ``out_dir``."""
    from mm.model import create_model, resolve

    spec = QuantSpec(mode=mode, group_size=group_size, encoders=encoders)  # type: ignore[arg-type]
    ckpt = resolve(model)[1]
    if ckpt is not None and read_spec(ckpt) is not None:
        raise ValueError(f"{model} is already quantized; quantize the fp32 checkpoint instead")
    emb = create_model(model)
    spec = quantize_model(emb.model, spec)
    return save_quantized(emb.model, spec, out_dir), spec


def checkpoint_size_mb(path: str | Path) -> float:
    """Bytes on disk of a checkpoint directory (all files), in MB."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6
