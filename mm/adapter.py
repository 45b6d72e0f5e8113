"""Adapter files: write, read and identify a LoRA adapter, and put one on a loaded model.

An adapter directory holds ``adapter.safetensors`` (``<module>.lora_A`` (r, k), ``<module>.lora_B``
(n, r)) and ``adapter.json`` (base model, its model id, r, alpha, targets, the adapted and INT4 modules).
:func:`load_adapter` puts an adapter on a loaded base (merged by default: pure torch, no peft import,
no run-time cost); :func:`merge_adapter` writes base + adapter as a normal checkpoint. Nothing here
trains: a server that loads an adapter imports this module and :mod:`mm.lora`, not the trainer.

Index letters: n output features, k input features, r rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mm.atomic import atomic_write, atomic_write_text
from mm.int4 import Int4Linear
from mm.lora import LoraSpec, adapter_state_dict, apply_lora, lora_layers, set_module

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = 1


def save_adapter(
    model: nn.Module,
    spec: LoraSpec,
    out_dir: str | Path,
    *,
    base_model: str,
    base_model_id: str,
    quantized: list[str] | None = None,
) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` (atomically) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("the model carries no LoRA adapters to save")
    header = {"format": "pt", "base_model_id": base_model_id}
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=header))
    meta = {
        "format": FORMAT,
        "base_model": base_model,
        "base_model_id": base_model_id,
        **dataclasses.asdict(spec),
        "targets": list(spec.targets),
        "modules": sorted(lora_layers(model)),
        "quantized": list(quantized or []),
        "adapter_params": sum(v.numel() for v in state.values()),
    }
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoraSpec, dict[str, Any], dict[str, Tensor]]:
    """(spec, adapter.json contents, weights) of an adapter directory."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).exists() or not (d / ADAPTER_WEIGHTS).exists():
        raise ValueError(
            f"{d} is not an adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(written by `mm finetune`)"
        )
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{d / ADAPTER_CONFIG} has format {meta.get('format')!r}; this version reads {FORMAT}"
        )
    fields = {f.name for f in dataclasses.fields(LoraSpec)}
    spec = LoraSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in fields})
    return spec, meta, load_file(str(d / ADAPTER_WEIGHTS))


def adapter_id(adapter_dir: str | Path) -> str:
    """A short digest of the adapter weights (recorded by collections re-embedded with it)."""
    return hashlib.sha256((Path(adapter_dir) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:12]


@torch.no_grad()
def load_adapter(embedder: Any, adapter_dir: str | Path, merge: bool = True) -> Any:
    """Put the adapter in ``adapter_dir`` on ``embedder``'s model (in place); returns the embedder.

    ``merge=True`` folds it into the weights (pure torch, no run-time cost); ``merge=False`` keeps peft
    LoRA layers (and the INT4 base for a QLoRA adapter), reproducing the trained model bit for bit.
    """
    spec, meta, state = read_adapter(adapter_dir)
    model = embedder.model
    if embedder.model_id != meta.get("base_model_id"):
        log.warning(
            "adapter %s was trained on %s but is loaded onto %s",
            adapter_dir,
            meta.get("base_model_id"),
            embedder.model_id,
        )
    modules = list(meta["modules"])
    missing = [n for n in modules if f"{n}.lora_A" not in state or f"{n}.lora_B" not in state]
    if missing:
        raise ValueError(f"{adapter_dir}/{ADAPTER_WEIGHTS} lacks weights for {missing[:3]}")
    if merge:
        for name in meta.get("quantized", []):  # QLoRA: the base it was trained on is the INT4 one
            lin = model.get_submodule(name)
            set_module(model, name, Int4Linear.from_linear(lin, spec.group_size).to_linear())
        for name in modules:
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"adapter module {name} is a {type(lin).__name__} in this model, not Linear")
            a, b = state[f"{name}.lora_A"], state[f"{name}.lora_B"]  # (r, K), (N, r)
            if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
                raise ValueError(
                    f"adapter {name} has shape {tuple(b.shape)}x{tuple(a.shape)}; not this model"
                )
            lin.weight += ((b @ a) * spec.scaling).to(lin.weight.dtype)
    else:
        adapted, _ = apply_lora(model, spec)
        if sorted(adapted) != sorted(modules):
            raise ValueError(f"adapter modules {modules[:3]}... do not match this model's {adapted[:3]}...")
        for name, layer in lora_layers(model).items():
            layer.lora_A["default"].weight.copy_(state[f"{name}.lora_A"])
            layer.lora_B["default"].weight.copy_(state[f"{name}.lora_B"])
        model.requires_grad_(False)
    model.eval()
    embedder.weights_changed()  # so does the id collections check
    return embedder


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Base model + adapter -> a normal checkpoint directory loadable with ``create_model``."""
    from mm.model import create_model, save_model

    _, meta, _ = read_adapter(adapter_dir)
    emb = create_model(str(base or meta["base_model"]))
    load_adapter(emb, adapter_dir, merge=True)
    return save_model(emb.model, out_dir)
