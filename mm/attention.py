"""Adaptive Attention Mechanism (AAM): local sliding-window attention fused with global sparse attention.

Index letters: b batch, t tokens, d model width, h heads, e head width (d = h * e), g global tokens.

Two sparse paths share one set of ``q_proj``/``k_proj``/``v_proj``/``o_proj`` projections:

- local: token i attends to the real tokens j with ``|i - j| <= window // 2`` (Longformer's sliding
  window, Beltagy et al. 2020; BigBird's window attention, Zaheer et al. 2020).
- global: ``n_global`` learned tokens (BigBird-ITC's extra global tokens) first attend to every real
  token, which makes them a summary of the sequence; then every token attends to the updated global
  tokens and to itself. Both steps cost O(T * n_global).

A small gate (:class:`ComplexityGate`) reads pooled statistics of the input (masked mean and std, log
length) and sets the weight ``g`` of the local path per sequence or per token:
``output = o_proj(g * local + (1 - g) * global)``. Neither path materialises the T x T matrix.

The local path has two kernels: ``flex`` (``torch.nn.attention.flex_attention`` with a BlockMask
built directly from the band, compiled once per process) and ``chunked`` (query blocks of ~window
tokens, each attending to its key band with fused SDPA; memory O(T * window)). ``auto`` uses flex on
CUDA for long sequences and chunked on CPU, where chunked measured faster (see
``benchmarks/bench_attention.py``) and needs no compile.

Padding positions (``pad_mask`` False) are never attended to, and their outputs are zero.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.config import AttentionConfig

log = logging.getLogger(__name__)

FLEX_BLOCK = 128  # FlexAttention's default block size; the BlockMask is built at this granularity
FLEX_MIN_TOKENS = 2048  # below this the chunked kernel is as fast and needs no compile
GATE_HIDDEN = 64  # width of the complexity gate's hidden layer


class AttentionOutput(NamedTuple):
    output: Tensor  # (B, T, D)
    gate: Tensor  # weight of the local path: (B,) for gate="sequence", (B, T) for gate="token"


# ----------------------------------------------------------------------------------------------------
# helpers


def _check_inputs(x: Tensor, pad_mask: Tensor | None, dim: int) -> Tensor:
    """Validate ``x`` (B, T, D) and return the boolean mask of real tokens (B, T)."""
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"expected x of shape (B, T, {dim}), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x has no tokens (T = 0); pass at least one token per sequence")
    if pad_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if pad_mask.shape != x.shape[:2]:
        raise ValueError(
            f"pad_mask must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(pad_mask.shape)}"
        )
    return pad_mask.to(device=x.device, dtype=torch.bool)


def _check_mix(mix: float | None) -> None:
    if mix is not None and not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix must be in [0, 1] (1.0 = local path only, 0.0 = global only), got {mix}")


def _nonempty_keys(valid: Tensor) -> Tensor:
    """Key mask (B, T) where a sequence with no real token may attend to all (its outputs are zeroed)."""
    return valid | ~valid.any(dim=1, keepdim=True)


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)  # (B, H, T, E)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, t, e = x.shape
    return x.transpose(1, 2).reshape(b, t, h * e)  # (B, T, D)


def _block_diag(m: Tensor) -> Tensor:
    """(B, H, G, E) -> (B, H * G, H * E): row (h, g) holds m[:, h, g] in head h's columns, zeros elsewhere."""
    b, h, g, e = m.shape
    eye = torch.eye(h, dtype=m.dtype, device=m.device)
    return (m[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(b, h * g, h * e)


# ----------------------------------------------------------------------------------------------------
# local path: chunked kernel


def _band_bias(valid: Tensor, w2: int, c: int, n_blocks: int, dtype: torch.dtype) -> Tensor:
    """Additive mask (B, N, C, C + 2 w2) of every query block against its key band, built once.

    Band column col of block i is key i * C - w2 + col. Query r sees it iff 0 <= col - r <= 2 * w2
    and the key is real or is the query itself (col == r + w2), which keeps padding rows finite.
    Float, so SDPA uses it as is.
    """
    span = c + 2 * w2
    validp = F.pad(valid, (w2, n_blocks * c - valid.shape[1] + w2), value=False)  # (B, N * C + 2 w2)
    key_ok = validp.unfold(1, span, c)  # (B, N, S)
    r = torch.arange(c, device=valid.device)[:, None]
    col = torch.arange(span, device=valid.device)[None, :]
    band = (col - r >= 0) & (col - r <= 2 * w2)  # (C, S)
    ok = band & (key_ok[:, :, None, :] | (col - r == w2))  # (B, N, C, S)
    return torch.zeros(ok.shape, dtype=dtype, device=valid.device).masked_fill_(~ok, float("-inf"))


def local_chunked(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, half_window: int, block: int) -> Tensor:
    """Sliding-window attention in query blocks; each block attends only to its key band.

    q, k, v (B, H, T, E); valid (B, T) bool. Query i sees key j iff ``|i - j| <= half_window`` and
    (``valid[j]`` or ``j == i``; self keeps padding rows finite). Returns (B, H, T, E).
    The blocks of a sequence go to one fused SDPA call as a batch of (block, band) problems; the bands
    are overlapping strided views of the padded keys, so memory is O(T * (E + block + 2 * half_window)).
    """
    b, h, t, e = q.shape
    w2 = min(half_window, t - 1)  # a wider band changes nothing
    c = max(1, min(block, t))
    n_blocks = -(-t // c)
    span = c + 2 * w2
    bias = _band_bias(valid, w2, c, n_blocks, q.dtype)  # (B, N, C, S)
    if n_blocks == 1:  # the band of the only block is the whole sequence
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :, :t, w2 : w2 + t])
    tail = n_blocks * c - t
    qt, kt, vt = (z.transpose(1, 2) for z in (q, k, v))  # (B, T, H, E); contiguous when from a Linear
    qp = F.pad(qt, (0, 0, 0, 0, 0, tail)) if tail else qt  # (B, N * C, H, E)
    kp = F.pad(kt, (0, 0, 0, 0, w2, w2 + tail))  # (B, w2 + N * C + w2, H, E)
    vp = F.pad(vt, (0, 0, 0, 0, w2, w2 + tail))
    outs = []
    for i in range(b):  # SDPA takes 4-D inputs only: one call per sequence
        qb = qp[i].reshape(n_blocks, c, h, e).transpose(1, 2)  # (N, H, C, E)
        kb = kp[i].unfold(0, span, c).permute(0, 1, 3, 2)  # (N, H, S, E), overlapping views
        vb = vp[i].unfold(0, span, c).permute(0, 1, 3, 2)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias[i, :, None])  # (N, H, C, E)
        outs.append(o.transpose(1, 2).reshape(n_blocks * c, h, e)[:t])  # (T, H, E)
    out = outs[0][None] if b == 1 else torch.stack(outs)  # (B, T, H, E)
    return out.transpose(1, 2)  # (B, H, T, E)


# ----------------------------------------------------------------------------------------------------
# local path: FlexAttention kernel


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """torch.compile(flex_attention), built once per process (without compile flex is dense).

    ``dynamic=False``: each new sequence length compiles again (cached in memory and on disk by inductor).
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def flex_available(device_type: str) -> bool:
    """Whether compiled FlexAttention runs on this device type; the first call compiles (tens of s on CPU)."""
    try:
        q = torch.randn(1, 1, 2 * FLEX_BLOCK, 16, device=device_type)
        valid = torch.ones(1, 2 * FLEX_BLOCK, dtype=torch.bool, device=device_type)
        start = time.perf_counter()
        local_flex(q, q, q, valid, 8)
        log.info("flex_attention compiled on %s in %.1f s", device_type, time.perf_counter() - start)
        return True
    except Exception as exc:  # any backend failure means "use the chunked kernel"
        log.warning("flex_attention unavailable on %s (%s); using the chunked kernel", device_type, exc)
        return False


def band_block_mask(valid: Tensor, half_window: int) -> Any:
    """BlockMask of the sliding window + padding, built from block-level arithmetic.

    ``create_block_mask`` evaluates the mask on every (i, j) pair (seconds at 8k tokens on CPU); the
    band's block structure is known in closed form, so only the O(T / 128)^2 block grid is computed.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, t = valid.shape
    w2 = half_window
    nb = -(-t // FLEX_BLOCK)
    start = torch.arange(nb, device=valid.device) * FLEX_BLOCK
    end = torch.clamp(start + FLEX_BLOCK, max=t) - 1  # last index in each block
    qs, qe, ks, ke = start[:, None], end[:, None], start[None, :], end[None, :]
    any_pair = (ks - qe <= w2) & (qs - ke <= w2)  # (Nq, Nk): some pair within the band
    all_pairs = (ke - qs <= w2) & (qe - ks <= w2)  # (Nq, Nk): every pair within the band
    tail = nb * FLEX_BLOCK - t  # keys past the end do not exist: they count as neither real nor padding
    kv_all_valid = F.pad(valid, (0, tail), value=True).view(b, nb, FLEX_BLOCK).all(-1)  # (B, Nk)
    kv_any_valid = F.pad(valid, (0, tail), value=False).view(b, nb, FLEX_BLOCK).any(-1)
    diag = torch.eye(nb, dtype=torch.bool, device=valid.device)  # a padding query still sees itself
    full = all_pairs[None] & kv_all_valid[:, None, :]  # (B, Nq, Nk)
    partial = any_pair[None] & (kv_any_valid[:, None, :] | diag) & ~full

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        counts = dense.sum(-1, dtype=torch.int32)[:, None]  # (B, 1, Nq)
        idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return counts, idx  # selected blocks first, in ascending order

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return ((qi - ki).abs() <= w2) & (valid[bi, ki] | (qi == ki))

    kv_n, kv_i = ordered(partial)
    full_n, full_i = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_n, kv_i, full_n, full_i, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(t, t)
    )


def local_flex(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, half_window: int) -> Tensor:
    """Same contract as :func:`local_chunked`, computed by compiled FlexAttention. (B, H, T, E).

    On CPU the sequence is padded to a whole number of ``FLEX_BLOCK``s first: torch 2.9.1's compiled CPU
    kernel reads past the end of a partial last block on AVX2-only machines (outputs off by up to ~1,
    different from call to call; exact at 256 tokens). Padded keys are masked out (``valid`` False) and
    padded queries are dropped, so the result is the same contract.
    """
    t = q.shape[2]
    pad = -t % FLEX_BLOCK if q.device.type == "cpu" else 0
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        valid = F.pad(valid, (0, pad), value=False)
    out = _compiled_flex()(q, k, v, block_mask=band_block_mask(valid, half_window))
    return out[:, :, :t] if pad else out


# ----------------------------------------------------------------------------------------------------
# modules


class ComplexityGate(nn.Module):
    """Local-path weight from pooled input statistics: masked mean, masked std and log length.

    gate="sequence": one weight per sequence (B,); gate="token": per token (B, T), from the token's
    own features added to the pooled ones.
    """

    def __init__(self, dim: int, mode: str, hidden: int = GATE_HIDDEN):
        super().__init__()
        self.mode = mode
        self.pooled = nn.Linear(2 * dim + 1, hidden)
        self.token = nn.Linear(dim, hidden, bias=False) if mode == "token" else None
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, T, D); valid (B, T) bool. Returns (B,) or (B, T)."""
        m = valid.to(x.dtype)[:, None, :]  # (B, 1, T)
        n = m.sum(-1).clamp(min=1.0)  # (B, 1)
        w = m / n[..., None]
        mean = (w @ x).squeeze(1)  # (B, D); matmuls are the fastest masked reductions on CPU
        var = ((w @ (x * x)).squeeze(1) - mean**2).clamp(min=0.0)
        feats = torch.cat([mean, (var + 1e-6).sqrt(), n.log()], dim=-1)  # (B, 2D + 1)
        hid = self.pooled(feats)  # (B, Hg)
        if self.token is not None:
            hid = hid[:, None] + self.token(x)  # (B, T, Hg)
        return torch.sigmoid(self.out(F.gelu(hid))).squeeze(-1)  # (B,) or (B, T)


def _validate_cfg(cfg: AttentionConfig) -> None:
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"attention dim {cfg.dim} must be divisible by n_heads {cfg.n_heads}")
    if cfg.window < 1:
        raise ValueError(f"attention window must be >= 1, got {cfg.window}")
    if cfg.n_global < 0:
        raise ValueError(f"n_global must be >= 0, got {cfg.n_global}")
    if cfg.gate not in ("sequence", "token"):
        raise ValueError(f"gate must be 'sequence' or 'token', got {cfg.gate!r}")
    if cfg.impl not in ("auto", "flex", "chunked"):
        raise ValueError(f"impl must be 'auto', 'flex' or 'chunked', got {cfg.impl!r}")


class AdaptiveAttention(nn.Module):
    """AAM: gated mix of sliding-window (local) and global-token attention. See the module docstring."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        _validate_cfg(cfg)
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.half_window = cfg.window // 2
        self.block = max(cfg.window, 16)  # queries per chunk; the key band is block + window wide
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)
        self.global_tokens = nn.Parameter(torch.randn(cfg.n_global, cfg.dim) * 0.02)  # (G, D)
        self.gate = ComplexityGate(cfg.dim, cfg.gate)
        self.dropout = nn.Dropout(cfg.dropout)

    def kernel_for(self, x: Tensor) -> str:
        """The local kernel this input will use: 'flex' or 'chunked'."""
        if self.cfg.impl != "auto":
            return self.cfg.impl
        # On CPU chunked measured faster than compiled flex at 8k tokens (bench_attention), and flex
        # compiles for 30-100 s per new sequence length; on GPU flex is the fused kernel it was built as.
        long_enough = x.shape[1] >= FLEX_MIN_TOKENS
        return "flex" if x.is_cuda and long_enough and flex_available(x.device.type) else "chunked"

    def local(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, kernel: str) -> Tensor:
        """Sliding-window path. q, k, v (B, H, T, E) -> (B, H, T, E)."""
        if kernel == "flex":
            return local_flex(q, k, v, valid, self.half_window)
        return local_chunked(q, k, v, valid, self.half_window, self.block)

    def global_path(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        """Global tokens read the whole sequence, then every token reads them and itself.

        q, k, v (B, T, D) with heads side by side; valid (B, T) bool. Returns (B, T, D). Per-head
        products against the G global tokens are single matmuls with a block-diagonal (H * G, D)
        matrix: H times the FLOPs of a per-head loop (still < 1/4 of one projection for G * H <= D / 4)
        but no (B, H, T, E) transposed copies of q, k, v, which dominate on CPU.
        """
        b, t, d = q.shape
        h, n_g = self.n_heads, self.cfg.n_global
        e = d // h
        if n_g == 0:
            return v  # attending to itself alone
        scale = 1.0 / math.sqrt(e)
        g = self.global_tokens.to(q.dtype).expand(b, -1, -1)  # (B, G, D)
        qg = _split_heads(self.q_proj(g), h) * scale  # (B, H, G, E)
        kg = _split_heads(self.k_proj(g), h)
        vg = _split_heads(self.v_proj(g), h)
        # step 1: global tokens attend to all real tokens and to the global tokens
        s_gg = qg @ kg.transpose(-1, -2)  # (B, H, G, G)
        s_gx = (_block_diag(qg) @ k.transpose(1, 2)).view(b, h, n_g, t)  # (B, H, G, T)
        s_gx = s_gx.masked_fill(~valid[:, None, None, :], float("-inf"))
        p = torch.cat([s_gg, s_gx], dim=-1).softmax(dim=-1)  # (B, H, G, G + T)
        from_x = (p[..., n_g:].reshape(b, h * n_g, t) @ v).view(b, h, n_g, h, e)  # (B, H, G, H', E)
        own_head = torch.diagonal(from_x, dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, H, G, E): H' = H
        summary = p[..., :n_g] @ vg + own_head  # (B, H, G, E)
        g = g + self.o_proj(_merge_heads(summary))  # (B, G, D): residual update of the global tokens
        kg = _split_heads(self.k_proj(g), h)  # (B, H, G, E)
        vg = _split_heads(self.v_proj(g), h)
        # step 2: every token attends to the G updated global tokens and to itself
        s_xg = (q @ _block_diag(kg * scale).transpose(1, 2)).view(b, t, h, n_g)  # (B, T, H, G)
        s_self = (q * k).view(b, t, h, e).sum(-1, keepdim=True) * scale  # (B, T, H, 1)
        p = torch.cat([s_xg, s_self], dim=-1).softmax(dim=-1)  # (B, T, H, G + 1)
        out = (p[..., :n_g].reshape(b, t, h * n_g) @ _block_diag(vg)).view(b, t, h, e)  # (B, T, H, E)
        return torch.addcmul(out, p[..., n_g:], v.view(b, t, h, e)).view(b, t, d)  # (B, T, D)

    def mix_paths(self, x: Tensor, keys_ok: Tensor, w: Tensor, mix: float | None) -> Tensor:
        """w * local + (1 - w) * global, before o_proj. x (B, T, D); w (B, 1, 1) or (B, T, 1) -> (B, T, D).

        A method of its own so that q, k, v and the two paths are freed before o_proj runs.
        """
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, D) each
        if mix is None or mix > 0.0:
            heads = [_split_heads(z, self.n_heads) for z in (q, k, v)]  # (B, H, T, E) views
            local = _merge_heads(self.local(*heads, keys_ok, self.kernel_for(x)))  # (B, T, D)
            if mix == 1.0:
                return local
        glob = self.global_path(q, k, v, keys_ok)
        return glob if mix == 0.0 else torch.lerp(glob, local, w)  # g * local + (1 - g) * global

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, mix: float | None = None) -> AttentionOutput:
        """x (B, T, D); pad_mask (B, T) bool, True = real token; mix overrides the gate (1.0 = local only)."""
        valid = _check_inputs(x, pad_mask, self.cfg.dim)
        _check_mix(mix)
        gate = self.gate(x, valid)  # (B,) or (B, T)
        w = gate if mix is None else torch.full_like(gate, float(mix))
        w = w[:, None, None] if w.dim() == 1 else w[:, :, None]  # (B, 1, 1) or (B, T, 1)
        mixed = self.mix_paths(x, _nonempty_keys(valid), w, mix)  # (B, T, D)
        out = self.o_proj(self.dropout(mixed))  # (B, T, D)
        if pad_mask is not None:
            out = out * valid[..., None].to(out.dtype)
        return AttentionOutput(out, gate)


class FullAttention(nn.Module):
    """Ablation baseline: dense multi-head attention (fused SDPA) with the padding mask; gate = ones."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        _validate_cfg(cfg)
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, mix: float | None = None) -> AttentionOutput:
        """x (B, T, D); pad_mask (B, T) bool, True = real token; mix is accepted and ignored."""
        valid = _check_inputs(x, pad_mask, self.cfg.dim)
        _check_mix(mix)
        q = _split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, E)
        k = _split_heads(self.k_proj(x), self.n_heads)
        v = _split_heads(self.v_proj(x), self.n_heads)
        mask = None if pad_mask is None else _nonempty_keys(valid)[:, None, None, :]  # (B, 1, 1, T)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.o_proj(self.dropout(_merge_heads(att)))  # (B, T, D)
        if pad_mask is not None:
            out = out * valid[..., None].to(out.dtype)
        gate = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return AttentionOutput(out, gate)


# ----------------------------------------------------------------------------------------------------
# dense reference (the spec, O(T^2); for tests and benchmarks only)


def dense_reference(
    attn: AdaptiveAttention,
    x: Tensor,
    pad_mask: Tensor | None = None,
    mix: float | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """AAM's output computed with explicit band + global masks, for query rows ``rows`` (default all).

    x (B, T, D) -> (B, R, D). Eval mode only (no dropout). Uses the module's weights but none of its
    kernels: the local path is a masked softmax over the explicit band, the global path a masked
    softmax over [global tokens, all tokens].
    """
    valid = _check_inputs(x, pad_mask, attn.cfg.dim)
    b, t, d = x.shape
    h, w2 = attn.n_heads, attn.half_window
    e = d // h
    rows = torch.arange(t, device=x.device) if rows is None else rows.to(x.device)
    keys_ok = _nonempty_keys(valid)
    q = _split_heads(attn.q_proj(x), h)[:, :, rows]  # (B, H, R, E)
    k = _split_heads(attn.k_proj(x), h)  # (B, H, T, E)
    v = _split_heads(attn.v_proj(x), h)
    j = torch.arange(t, device=x.device)
    is_self = rows[:, None] == j[None, :]  # (R, T)
    band = (rows[:, None] - j[None, :]).abs() <= w2
    local_mask = band[None] & (keys_ok[:, None, :] | is_self[None])  # (B, R, T)
    s = q @ k.transpose(-1, -2) / math.sqrt(e)  # (B, H, R, T)
    local = s.masked_fill(~local_mask[:, None], float("-inf")).softmax(-1) @ v  # (B, H, R, E)

    n_g = attn.cfg.n_global
    g = attn.global_tokens.to(x.dtype).expand(b, -1, -1)  # (B, G, D)
    xs = torch.cat([g, x], dim=1)  # (B, G + T, D): global tokens first
    qa, ka, va = (_split_heads(p(xs), h) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ok = torch.cat([torch.ones(b, n_g, dtype=torch.bool, device=x.device), keys_ok], dim=1)  # (B, G + T)
    sg = qa[:, :, :n_g] @ ka.transpose(-1, -2) / math.sqrt(e)  # (B, H, G, G + T)
    summary = sg.masked_fill(~ok[:, None, None], float("-inf")).softmax(-1) @ va  # (B, H, G, E)
    g2 = g + attn.o_proj(_merge_heads(summary))  # (B, G, D)
    k2 = torch.cat([_split_heads(attn.k_proj(g2), h), k], dim=2)  # (B, H, G + T, E)
    v2 = torch.cat([_split_heads(attn.v_proj(g2), h), v], dim=2)
    glob_mask = torch.cat([torch.ones(len(rows), n_g, dtype=torch.bool, device=x.device), is_self], dim=1)
    s2 = q @ k2.transpose(-1, -2) / math.sqrt(e)  # (B, H, R, G + T)
    glob = s2.masked_fill(~glob_mask, float("-inf")).softmax(-1) @ v2  # (B, H, R, E)

    gate = attn.gate(x, valid)
    w = gate if mix is None else torch.full_like(gate, float(mix))
    w = w[:, None, None] if w.dim() == 1 else w[:, rows, None]  # (B, 1, 1) or (B, R, 1)
    mixed = w * _merge_heads(local) + (1.0 - w) * _merge_heads(glob)  # (B, R, D)
    return attn.o_proj(mixed) * valid[:, rows, None].to(x.dtype)
