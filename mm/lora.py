"""LoRA / QLoRA adapters on the shared backbone: which layers, injecting, merging, counting.

LoRA (Hu et al. 2021) adds a low-rank update ``W + (alpha / r) * B @ A`` to chosen frozen Linear layers
and trains only ``A`` (r, k) and ``B`` (n, r). Adapters are injected with ``peft`` on the backbone's
attention projections (``q_proj``/``v_proj`` by default, any of ``q_proj,k_proj,v_proj,o_proj``) and,
with ``experts=True``, on every routed and shared expert's ``w1``/``w2``/``w3``. Everything else stays
frozen, the projection heads and the temperature included (an adapter then is the whole difference
from its base, and stays small); the MoE routers' balancing biases are frozen too, being part of the base.

QLoRA (Dettmers et al. 2023): the frozen base Linear layers (the same set ``mm quantize --mode int4``
quantizes) are held in group-wise INT4 (:mod:`mm.int4`, our own format: bitsandbytes has no CPU path
here) while the fp32 adapters train on top; peft's LoRA layer only calls its base layer, so an
:class:`~mm.int4.Int4Linear` base needs no peft support.

Merging a QLoRA adapter folds it into the dequantised INT4 base, which is exactly the function that was
trained. Adapter files (and putting one on a loaded model) are :mod:`mm.adapter`; training one is
:mod:`mm.finetune`, which a server loading an adapter never imports.

Index letters: n output features, k input features, r rank.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mm.int4 import GROUP_SIZES, Int4Linear

log = logging.getLogger(__name__)

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_LAYERS = ("w1", "w2", "w3")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16  # rank of the update
    alpha: float = 32.0  # the update is scaled by alpha / r
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # backbone attention projections to adapt
    experts: bool = False  # also adapt every routed and shared expert's w1/w2/w3
    dropout: float = 0.0  # dropout on the adapter input
    qlora: bool = False  # hold the frozen base Linear weights in INT4 while the adapters train
    group_size: int = 64  # INT4 group size for qlora (32, 64 or 128)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        bad = [t for t in self.targets if t not in ATTN_TARGETS]
        if bad or not (self.targets or self.experts):
            raise ValueError(
                f"LoRA targets must be a non-empty subset of {','.join(ATTN_TARGETS)} (got {bad or 'none'}); "
                "use experts=True (--experts) to adapt the experts"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.qlora and self.group_size not in GROUP_SIZES:
            raise ValueError(f"QLoRA group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def pattern(self) -> str:
        """Regex over full module names (peft ``target_modules``): only the backbone's layers match."""
        alts = []
        if self.targets:
            alts.append(rf"backbone\.blocks\.\d+\.attn\.({'|'.join(self.targets)})")
        if self.experts:
            alts.append(rf"backbone\.blocks\.\d+\.ffn\.(experts\.\d+|shared)\.({'|'.join(EXPERT_LAYERS)})")
        return "|".join(f"(?:{a})" for a in alts)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _int4_names(model: nn.Module, spec: LoraSpec) -> list[str]:
    from mm.quantize import QuantSpec, select_linears

    return select_linears(model, QuantSpec(mode="int4", group_size=spec.group_size, encoders=False))


def apply_lora(model: nn.Module, spec: LoraSpec) -> tuple[list[str], list[str]]:
    """Freeze ``model``, inject adapters (and for QLoRA hold the base in INT4). In place.

    Returns (adapted module names, INT4-quantized module names).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if lora_layers(model):
        raise ValueError("this model already carries LoRA adapters; merge or reload it first")
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(spec.pattern(), n)
    ]
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {spec.pattern()!r} in this model")
    quantized = _int4_names(model, spec) if spec.qlora else []
    model.requires_grad_(False)
    cfg = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, target_modules=spec.pattern(), lora_dropout=spec.dropout
    )
    inject_adapter_in_model(cfg, model)
    if hasattr(model, "peft_config"):
        del model.peft_config  # peft's bookkeeping attribute; the adapter files carry the config
    layers = lora_layers(model)
    assert sorted(layers) == sorted(names), (sorted(layers), sorted(names))
    for name in quantized:
        mod = model.get_submodule(name)
        if name in layers:
            mod.base_layer = Int4Linear.from_linear(mod.base_layer, spec.group_size)
        else:
            set_module(model, name, Int4Linear.from_linear(mod, spec.group_size))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return sorted(names), quantized


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer (anything with ``lora_A`` and ``base_layer``)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``<module>.lora_A`` (r, k) and ``<module>.lora_B`` (n, r) for every adapted module."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A["default"].weight.detach().float().contiguous().clone()
        out[f"{name}.lora_B"] = layer.lora_B["default"].weight.detach().float().contiguous().clone()
    return out


def _dense(mod: nn.Module) -> nn.Linear:
    if isinstance(mod, Int4Linear):
        return mod.to_linear()
    if isinstance(mod, nn.Linear):
        return mod
    raise TypeError(f"cannot merge into a {type(mod).__name__}")


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and drop the LoRA layers; INT4 layers become fp32.

    Returns how many adapters were merged. The model afterwards holds only plain ``nn.Linear`` layers
    and saves as a normal checkpoint.
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        lin = _dense(layer.get_base_layer())
        lin.weight += layer.get_delta_weight("default").to(lin.weight.dtype)  # (N, K)
        set_module(model, name, lin)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int4Linear):
            set_module(model, name, mod.to_linear())
    return len(layers)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters and all weights (INT4/INT8 weights counted by their logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            total += mod.in_features * mod.out_features + (0 if mod.bias is None else mod.out_features)
    return {"trainable": trainable, "total": total}
