"""LoRA / QLoRA fine-tuning of the shared backbone on a user's own pairs, and adapter files.

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

Files: ``adapter.safetensors`` (``<module>.lora_A`` (r, k), ``<module>.lora_B`` (n, r)) and
``adapter.json`` (base model, its model id, r, alpha, targets, the adapted and INT4 modules).
:func:`load_adapter` puts an adapter on a loaded base (merged by default: pure torch, no peft import,
no run-time cost); :func:`merge_adapter` writes base + adapter as a normal checkpoint. Merging a QLoRA
adapter folds it into the dequantised INT4 base, which is exactly the function that was trained.

Index letters: n output features, k input features, r rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mm.int4 import GROUP_SIZES, Int4Linear
from mm.train import STATE_FILE, TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = 1
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


# ----------------------------------------------------------------------------------------------------
# injecting, merging, counting


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
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
            _set_module(model, name, Int4Linear.from_linear(mod, spec.group_size))
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
        _set_module(model, name, lin)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int4Linear):
            _set_module(model, name, mod.to_linear())
    return len(layers)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters and all weights (INT4/INT8 weights counted by their logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            total += mod.in_features * mod.out_features + (0 if mod.bias is None else mod.out_features)
    return {"trainable": trainable, "total": total}


# ----------------------------------------------------------------------------------------------------
# adapter files


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
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "base_model_id": base_model_id})
    tmp.replace(out / ADAPTER_WEIGHTS)
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
    tmp_json = out / (ADAPTER_CONFIG + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_json.replace(out / ADAPTER_CONFIG)
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
            _set_module(model, name, Int4Linear.from_linear(lin, spec.group_size).to_linear())
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


# ----------------------------------------------------------------------------------------------------
# fine-tuning


class LoraTrainer(Trainer):
    """The contrastive :class:`~mm.train.Trainer` with a frozen base and trainable LoRA adapters.

    Checkpoints are adapter files (no optimizer state: a fine-tune is short, and it restarts cleanly).
    """

    balance_experts = False  # the routers' balancing biases belong to the frozen base

    def __init__(self, cfg: TrainConfig, spec: LoraSpec):
        if cfg.overrides:
            raise ValueError("fine-tuning keeps the base model's config; drop the config overrides")
        if (Path(cfg.out_dir) / STATE_FILE).exists():
            raise ValueError(f"{cfg.out_dir} holds a full training run; write the adapter to another --out")
        super().__init__(cfg)
        self.spec = spec
        self.base_counts = parameter_counts(self.model)  # what a full fine-tune would train
        self.base_model = _portable(cfg.model)
        self.base_model_id = self.embedder.model_id
        self.modules, self.quantized = apply_lora(self.model, spec)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.embedder.weights_changed()
        counts = parameter_counts(self.model)
        log.info(
            "LoRA r=%d on %d modules: %d trainable parameters (%.2f%% of the %d a full fine-tune trains)",
            spec.r,
            len(self.modules),
            counts["trainable"],
            100 * counts["trainable"] / max(1, self.base_counts["trainable"]),
            self.base_counts["trainable"],
        )

    def save(self) -> None:
        save_adapter(
            self.model,
            self.spec,
            self.out,
            base_model=self.base_model,
            base_model_id=self.base_model_id,
            quantized=self.quantized,
        )

    def summary(self) -> dict[str, Any]:
        counts = parameter_counts(self.model)
        return {
            "trainable_params": counts["trainable"],
            "full_finetune_params": self.base_counts["trainable"],
            "trainable_pct": round(100 * counts["trainable"] / max(1, self.base_counts["trainable"]), 3),
            "modules": len(self.modules),
            "int4_modules": len(self.quantized),
        }


def finetune(cfg: TrainConfig, spec: LoraSpec) -> tuple[TrainResult, dict[str, Any]]:
    """Train an adapter; returns the training result and a summary (parameter counts)."""
    trainer = LoraTrainer(cfg, spec)
    result = trainer.train()
    return result, trainer.summary()


def _portable(model: str) -> str:
    """A base given as a path is recorded absolute, so the adapter still finds it from elsewhere."""
    p = Path(model)
    return str(p.resolve()) if p.exists() else model
