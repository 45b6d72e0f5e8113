"""Contrastive objectives for the shared space.

Symmetric InfoNCE (CLIP, Radford et al. 2021) over every modality pair present in a batch: a group
(row) may carry any two or three of text/image/audio, and each pair is trained on the rows that have
both sides.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE. a, b (N, E) L2-normalised, row i of a pairs with row i of b.

    ``labels`` (N,) optional class ids: rows sharing a label are not pushed apart (their targets are
    spread uniformly over the positives), which keeps variants of one concept from fighting.
    """
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.t()  # (N, N)
    if labels is None:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    pos = (labels[:, None] == labels[None, :]).float()  # (N, N)
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target.t() * F.log_softmax(logits.t(), 1), 1).mean()
    )


def multi_pair_loss(
    emb: dict[str, Tensor],
    present: dict[str, Tensor],
    logit_scale: Tensor,
    labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean symmetric InfoNCE over every modality pair.

    emb[m] (N, E) embeddings for all N rows (rows without modality m hold anything);
    present[m] (N,) bool, which rows carry m. Returns the loss and per-pair values for logging.
    """
    losses: list[Tensor] = []
    logs: dict[str, float] = {}
    for m1, m2 in itertools.combinations(sorted(emb), 2):
        rows = present[m1] & present[m2]
        if int(rows.sum()) < 2:
            continue
        lab = labels[rows] if labels is not None else None
        loss = info_nce(emb[m1][rows], emb[m2][rows], logit_scale, lab)
        losses.append(loss)
        logs[f"loss_{m1}_{m2}"] = float(loss.detach())
    if not losses:
        zero = logit_scale * 0.0
        return zero, logs
    return torch.stack(losses).mean(), logs
