"""Choosing the next token from a decoder's logits: greedy, temperature, top-k and nucleus (top-p).

Index letters: v vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(..., V) logits with everything outside the top-k and the top-p nucleus set to -inf.

    Nucleus (Holtzman et al. 2019): the smallest set of most likely tokens whose probability reaches
    ``top_p``; the most likely token is always kept.
    """
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator | None
) -> int:
    """One token id from (V,) logits: argmax when temperature == 0, else filtered sampling."""
    if temperature == 0:
        return int(logits.argmax())
    # shifted so the largest is 0 before scaling, in float64 (where any positive temperature is non-zero): a
    # tiny temperature (1e-308) then sends the others to -inf (greedy, its limit) instead of overflowing
    # them all to inf, or dividing by a float32 zero, whose softmax is nan
    logits = logits.double()
    probs = filter_logits((logits - logits.max()) / temperature, top_k, top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
