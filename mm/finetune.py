"""LoRA / QLoRA fine-tuning of the shared backbone on a user's own pairs (``mm finetune``).

The contrastive trainer of :mod:`mm.train` with the base frozen and adapters (:mod:`mm.lora`) trainable;
its checkpoints are adapter files (:mod:`mm.adapter`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mm.adapter import save_adapter
from mm.lora import LoraSpec, apply_lora, parameter_counts
from mm.train import STATE_FILE, TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)


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
