"""The shared backbone: ``L`` pre-norm blocks of ``x + AAM(norm(x))`` and ``x + DMoE(norm(x))``.

One trunk serves every modality (as in LIMoE and VLMo); a learned modality embedding tells it which
modality a sequence came from.

Index letters: b batch, t tokens, d width D, e experts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.attention import AdaptiveAttention, FullAttention
from mm.config import MODALITIES, AttentionConfig, BackboneConfig, MoEConfig
from mm.moe import DMoE, MoEStats, SwiGLU


class BackboneOutput(NamedTuple):
    hidden: Tensor  # (B, T, D) final normalised token states
    aux_loss: Tensor  # scalar, summed over MoE layers
    moe_stats: list[MoEStats]  # one per MoE layer
    gates: list[Tensor]  # AAM local-path weight per layer: (B,) or (B, T)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, use_moe: bool):
        super().__init__()
        attn_cfg = AttentionConfig(**{**_fields(cfg.attn), "dim": cfg.dim})
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = AdaptiveAttention(attn_cfg) if cfg.attention == "aam" else FullAttention(attn_cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.use_moe = use_moe
        if use_moe:
            self.ffn: nn.Module = DMoE(MoEConfig(**{**_fields(cfg.moe), "dim": cfg.dim}))
        else:
            # Dense ablation: the same active width as a token's routed experts.
            self.ffn = SwiGLU(cfg.dim, cfg.moe.hidden * cfg.moe.k, cfg.moe.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, MoEStats | None, Tensor]:
        """x (B, T, D), mask (B, T) bool True = real token."""
        a = self.attn(self.norm1(x), pad_mask=mask)
        x = x + a.output
        h = self.norm2(x)
        if self.use_moe:
            m = self.ffn(h, mask)
            return x + m.output, m.aux_loss, m.stats, a.gate
        return x + self.ffn(h), x.new_zeros(()), None, a.gate


class Backbone(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_embed = nn.Embedding(len(MODALITIES), cfg.dim)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(cfg, use_moe=cfg.ffn == "moe" and (i % cfg.moe_every == cfg.moe_every - 1))
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor, mask: Tensor, modality: str) -> BackboneOutput:
        """x (B, T, D) input tokens (already projected, positions added); mask (B, T) bool."""
        b, t, d = x.shape
        x = x + self.modality_embed.weight[MODALITIES.index(modality)]  # (B, T, D)
        aux = x.new_zeros(())
        stats: list[MoEStats] = []
        gates: list[Tensor] = []
        for block in self.blocks:
            x, a, s, g = block(x, mask)
            aux = aux + a
            gates.append(g)
            if s is not None:
                stats.append(s)
        return BackboneOutput(self.norm(x), aux, stats, gates)

    @torch.no_grad()
    def update_moe_biases(self) -> None:
        """Apply the aux-loss-free balancing step of every MoE layer (call after each optimizer step)."""
        for block in self.blocks:
            if block.use_moe:
                block.ffn.update_bias()


def sinusoidal_positions(t: int, d: int, device: torch.device | None = None) -> Tensor:
    """(T, D) fixed sinusoidal positions (Vaswani et al.); any length, nothing to learn."""
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, device=device, dtype=torch.float32)
    freq = torch.exp(-math.log(10000.0) * i / d)
    pe = torch.zeros(t, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, T, D), mask (B, T) bool -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def l2_normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def _fields(cfg: object) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
