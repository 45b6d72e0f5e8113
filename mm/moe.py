"""Dynamic Mixture-of-Experts (D-MoE) feed-forward layer.

Index letters: b batch, t tokens per sequence, d width, e routed experts, k expert slots per token
(k = cfg.k, the top-k count or the top-p cap k_max), n routed (valid) tokens, m (token, expert)
assignments.

- ``Router``: a light gating network (Linear -> GELU -> Linear -> softmax) plus a non-trainable
  per-expert ``bias`` used for *selection only* (DeepSeek-V3 auxiliary-loss-free balancing,
  arXiv:2412.19437 sec. 2.1.2); combination weights are the unbiased probabilities renormalised
  over the chosen experts.
- Routing is fixed top-k, or dynamic top-p (the smallest set, in biased-score order, whose
  probability mass reaches ``top_p``, capped at k), so flatter gate distributions get more experts.
- Dispatch sorts assignments by expert id and runs each expert once on its contiguous slice.
- Optional expert collaboration: a token's selected expert outputs attend to each other, queried
  by the token, before they are combined (zero-initialised output projection: starts as identity).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.config import MoEConfig

logger = logging.getLogger(__name__)

__all__ = ["DMoE", "ExpertCollaboration", "MoEOutput", "MoEStats", "Router", "SwiGLU"]


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``w2(silu(w1 x) * w3 x)``; also the dense-FFN ablation."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # (..., D) -> (..., D)
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))

    def forward_into(self, x: Tensor, out: Tensor) -> None:
        """``out[:] = self(x)`` for 2-D ``x`` (C, D) -> ``out`` (C, D), without building autograd state.

        With plain ``nn.Linear`` layers and no gradient needed, the activation is computed in place and
        the down projection is written straight into ``out`` (no temporaries, no copy); anything else
        (LoRA-wrapped or quantized layers, training) takes the ordinary forward.
        """
        plain = all(type(m) is nn.Linear and m.weight.dtype == x.dtype for m in (self.w1, self.w2, self.w3))
        if plain and not torch.is_grad_enabled() and not (self.training and self.dropout.p > 0):
            a = F.silu(F.linear(x, self.w1.weight), inplace=True)  # (C, H)
            a.mul_(F.linear(x, self.w3.weight))
            torch.mm(a, self.w2.weight.t(), out=out)
        else:
            out.copy_(self(x))


class MoEStats(NamedTuple):
    load: Tensor  # (E,) fraction of routed (token, expert) assignments per expert; sums to 1
    maxvio: Tensor  # scalar: (max_load - mean_load) / mean_load (DeepSeek's MaxVio)
    experts_per_token: Tensor  # scalar: mean number of routed experts per valid token


class MoEOutput(NamedTuple):
    output: Tensor  # (B, T, D)
    aux_loss: Tensor  # scalar; 0 when seq_balance_weight == 0
    stats: MoEStats


class Router(nn.Module):
    """Dynamic gating network: light feature extractor + linear -> softmax over experts."""

    bias: Tensor

    def __init__(self, dim: int, n_experts: int, gate_hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(dim, gate_hidden), nn.GELU())
        self.proj = nn.Linear(gate_hidden, n_experts)
        # Selection-only offset, nudged by DMoE.update_bias(); never receives gradients.
        self.register_buffer("bias", torch.zeros(n_experts))

    def forward(self, x: Tensor) -> Tensor:
        # (N, D) -> (N, E) routing probabilities (float32 even under autocast)
        return self.proj(self.features(x)).float().softmax(dim=-1)


class ExpertCollaboration(nn.Module):
    """Single-head attention among one token's selected expert outputs.

    Each expert output ``h_i`` forms a query together with the token, ``q_i = Wq x + Wh h_i``, and
    attends over the token's other selected outputs (itself included); the result is added back as
    a residual, ``h_i + Wo attn_i``. ``Wo`` starts at zero, so the layer starts as the identity.
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.q_token = nn.Linear(dim, head_dim, bias=False)
        self.q_expert = nn.Linear(dim, head_dim, bias=False)
        self.k_proj = nn.Linear(dim, head_dim, bias=False)
        self.v_proj = nn.Linear(dim, head_dim, bias=False)
        self.o_proj = nn.Linear(head_dim, dim, bias=False)
        nn.init.zeros_(self.o_proj.weight)
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, x: Tensor, h: Tensor, keep: Tensor) -> Tensor:
        # x (N, D) tokens; h (N, K, D) expert outputs (zeros in unused slots); keep (N, K) bool
        q = self.q_token(x).unsqueeze(1) + self.q_expert(h)  # (N, K, H)
        k = self.k_proj(h)  # (N, K, H)
        v = self.v_proj(h)  # (N, K, H)
        scores = torch.einsum("nih,njh->nij", q, k).float() * self.scale  # (N, K, K)
        scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
        attn = scores.softmax(dim=-1).to(v.dtype)  # (N, K, K); slot 0 is always kept: no NaN
        mixed = torch.einsum("nij,njh->nih", attn, v)  # (N, K, H)
        return h + self.o_proj(mixed)  # (N, K, D)


class DMoE(nn.Module):
    """Dynamic MoE layer: route each token to a few SwiGLU experts (plus an optional shared expert)."""

    _load_acc: Tensor

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.router = Router(cfg.dim, cfg.n_experts, cfg.gate_hidden)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.hidden, cfg.dropout) for _ in range(cfg.n_experts))
        self.shared = SwiGLU(cfg.dim, cfg.hidden, cfg.dropout) if cfg.shared_expert else None
        self.collab = ExpertCollaboration(cfg.dim, max(16, cfg.dim // 4)) if cfg.collaboration else None
        # Assignment counts per expert since the last update_bias() (training forwards only).
        # Integer, so that model.to(bfloat16) cannot round the counts.
        self.register_buffer("_load_acc", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MoEOutput:
        # x (B, T, D); mask (B, T) bool, True = real token -> output (B, T, D)
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"DMoE expects x of shape (B, T, {cfg.dim}), got {tuple(x.shape)}")
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # (B*T, D)
        if mask is not None:
            if mask.shape != (b, t):
                raise ValueError(f"mask must have shape (B, T) = {(b, t)}, got {tuple(mask.shape)}")
            rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) indices of real tokens
            xs = flat.index_select(0, rows)  # (N, D)
        else:
            rows = None
            xs = flat

        probs = self.router(xs)  # (N, E)
        idx, keep, weight = self._select(probs)  # (N, K) each
        y, counts = self._dispatch(xs, idx, keep, weight)  # (N, D), (E,)
        if self.shared is not None:
            y = y + self.shared(xs)

        if rows is None:
            out = y.reshape(b, t, d)
        else:
            out = y.new_zeros(b * t, d).index_copy(0, rows, y).reshape(b, t, d)

        if self.training:
            with torch.no_grad():
                self._load_acc += counts
        aux = self._seq_balance_loss(probs, idx, keep, rows, b, t)
        return MoEOutput(out, aux, self._stats(counts, keep))

    def _select(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # probs (N, E) -> idx (N, K) expert ids, keep (N, K) bool, weight (N, K) combination weights
        cfg = self.cfg
        biased = probs.detach() + self.router.bias  # bias steers selection only
        idx = biased.topk(cfg.k, dim=-1).indices  # (N, K), sorted by biased score
        p = probs.gather(1, idx)  # (N, K) unbiased probabilities of the candidates
        if cfg.routing == "topp":
            # Keep expert j while the mass before it is still below top_p: the smallest prefix
            # reaching top_p, at least one expert, at most K (dynamic routing, Huang et al. 2024).
            before = p.detach().cumsum(dim=-1) - p.detach()
            keep = before < cfg.top_p
            keep[:, 0] = True
        else:
            keep = torch.ones_like(idx, dtype=torch.bool)
        p = p * keep
        weight = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        return idx, keep, weight

    def _dispatch(self, xs: Tensor, idx: Tensor, keep: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        # xs (N, D); idx/keep/weight (N, K) -> combined expert output (N, D), assignments per expert (E,)
        n, k = idx.shape
        slot = keep.reshape(-1).nonzero().squeeze(1)  # (M,) flat (token, slot) positions kept
        expert_of = idx.reshape(-1).index_select(0, slot)  # (M,)
        slot = slot.index_select(0, expert_of.argsort(stable=True))  # (M,) grouped by expert id
        counts = torch.bincount(expert_of, minlength=self.cfg.n_experts)  # (E,)
        m = slot.numel()

        # One gather in, each expert once on its contiguous slice, one gather back to (token, slot)
        # order. Gathers (index_select) are much faster on CPU than scatters (index_add_).
        x_sorted = xs.index_select(0, torch.div(slot, k, rounding_mode="floor"))  # (M, D)
        inplace = not torch.is_grad_enabled() and not torch.is_autocast_enabled(xs.device.type)
        experts = self._experts_inplace if inplace else self._experts_autograd
        h = experts(x_sorted, counts)  # (M + 1, D): rows in x_sorted's order, then a zero row
        src = torch.full((n * k,), m, dtype=torch.long, device=xs.device)  # row M: unused slots (zeros)
        src[slot] = torch.arange(m, device=xs.device)
        w = weight.to(h.dtype)  # (N, K); unused slots weigh 0
        if self.collab is not None or not inplace:
            hk = h.index_select(0, src).view(n, k, xs.shape[1])  # (N, K, D)
            if self.collab is not None:
                hk = self.collab(xs, hk, keep)  # (N, K, D)
            y = torch.bmm(w.unsqueeze(1), hk).squeeze(1)  # (N, D)
        else:
            # Inference without collaboration: gather and accumulate one slot at a time, never
            # materialising (N, K, D).
            src = src.view(n, k)
            y = h.index_select(0, src[:, 0]).mul_(w[:, :1])  # (N, D)
            for j in range(1, k):
                y.addcmul_(h.index_select(0, src[:, j]), w[:, j : j + 1])
        return y, counts

    def _experts_autograd(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        # x_sorted (M, D) grouped by expert -> (M + 1, D) expert outputs and a zero row for unused slots
        outs = []
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                outs.append(self.experts[e](x_sorted[start : start + c]))  # (c, D)
                start += c
        dtype = outs[0].dtype if outs else x_sorted.dtype
        outs.append(x_sorted.new_zeros(1, x_sorted.shape[1], dtype=dtype))
        return torch.cat(outs)

    def _experts_inplace(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        # Same as _experts_autograd without gradients: each expert writes its rows of one buffer.
        h = x_sorted.new_empty(x_sorted.shape[0] + 1, x_sorted.shape[1])  # (M + 1, D)
        h[-1].zero_()
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                self.experts[e].forward_into(x_sorted[start : start + c], h[start : start + c])
                start += c
        return h

    def _seq_balance_loss(
        self,
        probs: Tensor,
        idx: Tensor,
        keep: Tensor,
        rows: Tensor | None,
        b: int,
        t: int,
    ) -> Tensor:
        """DeepSeek-V3 complementary sequence-wise balance loss: alpha * sum_e f_e * P_e per sequence."""
        cfg = self.cfg
        if cfg.seq_balance_weight == 0:
            return probs.new_zeros(())
        n, e = probs.shape
        chosen = probs.new_zeros(n, e).scatter_(1, idx, keep.to(probs.dtype))  # (N, E) 0/1
        if rows is None:
            chosen_bt = chosen.view(b, t, e)
            probs_bt = probs.view(b, t, e)
        else:
            chosen_bt = probs.new_zeros(b * t, e).index_copy(0, rows, chosen).view(b, t, e)
            probs_bt = probs.new_zeros(b * t, e).index_copy(0, rows, probs).view(b, t, e)
        n_tok = (chosen_bt.sum(-1) > 0).sum(1).to(probs.dtype)  # (B,) real tokens per sequence
        n_assign = chosen_bt.sum(dim=(1, 2))  # (B,) routed assignments per sequence
        f = e * chosen_bt.sum(1) / n_assign.clamp_min(1).unsqueeze(1)  # (B, E), 1 when balanced
        p_mean = probs_bt.sum(1) / n_tok.clamp_min(1).unsqueeze(1)  # (B, E)
        has_tokens = (n_tok > 0).to(probs.dtype)
        per_seq = (f * p_mean).sum(-1) * has_tokens  # (B,)
        return cfg.seq_balance_weight * per_seq.sum() / has_tokens.sum().clamp_min(1)

    def _stats(self, counts: Tensor, keep: Tensor) -> MoEStats:
        with torch.no_grad():
            total = counts.sum().clamp_min(1).float()
            load = counts.float() / total  # (E,)
            mean = 1.0 / self.cfg.n_experts
            maxvio = (load.max() - mean) / mean if counts.sum() > 0 else load.new_zeros(())
            per_token = keep.sum(-1).float().mean() if keep.numel() else load.new_zeros(())
        return MoEStats(load, maxvio, per_token)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step: bias += gamma * sign(mean_load - load); resets the counts.

        The trainer calls this after each optimizer step; loads come from training-mode forwards.
        """
        total = self._load_acc.sum()
        if total <= 0:
            return
        load = self._load_acc.float() / total
        self.router.bias += self.cfg.bias_update_gamma * torch.sign(1.0 / self.cfg.n_experts - load)
        self._load_acc.zero_()


def _validate(cfg: MoEConfig) -> None:
    if cfg.routing not in ("topk", "topp"):
        raise ValueError(f"MoEConfig.routing must be 'topk' or 'topp', got {cfg.routing!r}")
    if not 1 <= cfg.k <= cfg.n_experts:
        raise ValueError(f"MoEConfig.k must be in [1, n_experts={cfg.n_experts}], got {cfg.k}")
    if cfg.routing == "topp" and not 0.0 < cfg.top_p <= 1.0:
        raise ValueError(f"MoEConfig.top_p must be in (0, 1], got {cfg.top_p}")
    for name in ("dim", "hidden", "gate_hidden", "n_experts"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"MoEConfig.{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.bias_update_gamma < 0 or cfg.seq_balance_weight < 0:
        raise ValueError("MoEConfig.bias_update_gamma and seq_balance_weight must be >= 0")
