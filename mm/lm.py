"""Grounded causal decoder: the project's attention + D-MoE blocks in causal mode, with a KV cache.

Index letters: b batch, t tokens, s cached + new positions, d width D, h heads, e head width,
p prefix slots, v vocabulary, m shared-space width (the embedder's ``dim``).

Sequence layout (one row)::

    [slot_1 .. slot_P] [BOS] "[1] caption\\n[2] caption\\nQ: question\\nA: " answer [EOS]

- prefix: the retrieved items' shared-space vectors, each mapped by ``prefix_proj`` (M -> D) plus a
  learned per-slot embedding; unused slots hold a learned "empty" vector, so P is fixed and the
  prefix positions are the same in every row.
- attention (:class:`CausalWindowAttention`): AAM's sliding-window idea made causal: position i sees
  the previous ``window`` positions and the P prefix positions, which act as always-visible "sink"
  tokens (StreamingLLM's attention sinks, Xiao et al. 2023; BigBird's global tokens in causal form).
  Sequences are a few hundred positions, so the (T, S) boolean mask is built explicitly.
- FFN: :class:`mm.moe.DMoE`, unchanged (routing is per token, so it is causal by construction).
- KV cache: per layer (B, H, S, E) keys and values; incremental decoding equals full recomputation.
- tokens: bytes (:mod:`mm.tokenizer`); sampling in :mod:`mm.sampling`, stop strings in
  :mod:`mm.stop_filter`, checkpoint files in :mod:`mm.checkpoint` (the embedder's format).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.atomic import atomic_write_text
from mm.checkpoint import CONFIG_FILE as CONFIG_FILE
from mm.checkpoint import WEIGHTS_FILE as WEIGHTS_FILE
from mm.checkpoint import read_weights, resolve_checkpoint, save_checkpoint
from mm.config import MoEConfig
from mm.errors import ConfigError
from mm.moe import DMoE
from mm.sampling import check_sampling, sample_next
from mm.stop_filter import StopFilter
from mm.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints" / "lm"


@dataclass(frozen=True)
class LMConfig:
    name: str = "custom"
    vocab: int = VOCAB_SIZE  # byte vocabulary + specials (mm.tokenizer)
    dim: int = 128  # width D
    depth: int = 4  # (attention, D-MoE) blocks
    heads: int = 4
    window: int = 128  # causal local window: position i sees i - window < j <= i ...
    prefix_len: int = 3  # ... and the P prefix slots (retrieved items), the attention sinks
    embed_dim: int = 256  # width M of the shared-space vectors that enter as prefix
    max_len: int = 384  # longest token sequence (prefix excluded)
    moe: MoEConfig = field(default_factory=MoEConfig)  # its ``dim`` is set from ``dim``
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown LMConfig keys {sorted(unknown)}; valid keys: {sorted(names)}")
        d = dict(d)
        moe = d.get("moe", {})
        if isinstance(moe, dict):
            moe_names = {f.name for f in dataclasses.fields(MoEConfig)}
            bad = set(moe) - moe_names
            if bad:
                raise ConfigError(f"unknown MoEConfig keys {sorted(bad)}; valid keys: {sorted(moe_names)}")
            moe = MoEConfig(**moe)
        d["moe"] = dataclasses.replace(moe, dim=d.get("dim", cls.dim))
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> LMConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _validate(cfg: LMConfig) -> None:
    if cfg.dim % cfg.heads:
        raise ConfigError(f"LM dim {cfg.dim} must be divisible by heads {cfg.heads}")
    if cfg.vocab < VOCAB_SIZE:
        raise ConfigError(f"LM vocab must be >= {VOCAB_SIZE} (bytes + specials), got {cfg.vocab}")
    for name in ("window", "depth", "max_len", "embed_dim"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"LMConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.prefix_len < 0:
        raise ConfigError(f"LMConfig.prefix_len must be >= 0, got {cfg.prefix_len}")


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, V) for the token positions (prefix positions excluded)
    aux_loss: Tensor  # scalar, MoE balance loss summed over layers


class KVCache:
    """Per-layer keys and values (B, H, S, E), grown by concatenation; ``length`` = S."""

    def __init__(self, depth: int) -> None:
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * depth

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, H, T, E) to layer i and return the layer's full (B, H, S, E) keys/values."""
        old = self.layers[i]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.layers[i] = (k, v)
        return k, v


def causal_window_mask(start: int, t: int, s: int, window: int, n_sink: int, device: torch.device) -> Tensor:
    """(T, S) bool: query i = start + r sees key j iff j <= i and (i - j < window or j < n_sink)."""
    i = torch.arange(start, start + t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < n_sink))


CAUSAL = "causal"  # attention mask shorthand: plain lower-triangular (SDPA's ``is_causal``)
AttnMask = Tensor | str | None  # (T, S) bool, CAUSAL, or None (every key visible)


def attention_mask(start: int, t: int, window: int, n_sink: int, device: torch.device) -> AttnMask:
    """The (T, S = start + T) mask of :func:`causal_window_mask`, or a cheaper equivalent.

    Built once per forward and shared by the layers. When the window reaches back to position 0 the
    window never bites: a prefill (``start == 0``) is plain causal and a one-token decode step sees
    everything, so SDPA can skip the explicit mask.
    """
    s = start + t
    if s <= window:
        if start == 0:
            return CAUSAL
        if t == 1:
            return None
    return causal_window_mask(start, t, s, window, n_sink, device)


class CausalWindowAttention(nn.Module):
    """Causal sliding-window attention with sink positions; projections named like AAM's (LoRA targets)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.window = cfg.window
        self.n_sink = cfg.prefix_len
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        mask: AttnMask | bool = True,
    ) -> Tensor:
        """x (B, T, D) at absolute positions start.. (after ``start`` cached ones). Returns (B, T, D).

        ``mask``: from :func:`attention_mask` (shared by the layers), or True to build it here.
        """
        b, t, d = x.shape
        h = self.heads
        q, k, v = (
            p(x).view(b, t, h, d // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, E)
        if mask is True:
            mask = attention_mask(start, t, self.window, self.n_sink, x.device)
        p = self.dropout if self.training else 0.0
        if isinstance(mask, str):  # CAUSAL; S == T here (an empty cache)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, E)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, E)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalWindowAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = DMoE(cfg.moe)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None,
        layer: int,
        start: int,
        mask: Tensor | None = None,
        attn_mask: AttnMask | bool = True,
    ) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> (B, T, D), MoE aux loss; mask (B, T) bool: the positions the MoE runs."""
        x = x + self.attn(self.norm1(x), cache, layer, start, attn_mask)
        m = self.ffn(self.norm2(x), mask)
        return x + m.output, m.aux_loss


class GroundedLM(nn.Module):
    """Byte-level causal decoder conditioned on prefix vectors from the shared embedding space."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.prefix_len + cfg.max_len, cfg.dim)
        self.prefix_proj = nn.Linear(cfg.embed_dim, cfg.dim)
        self.slot_embed = nn.Parameter(torch.randn(max(cfg.prefix_len, 1), cfg.dim) * 0.02)  # (P, D)
        self.empty_slot = nn.Parameter(torch.randn(cfg.dim) * 0.02)  # (D,) an unused prefix slot
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.tok_embed.weight  # tied (nanoGPT): halves the vocabulary parameters
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.tokenizer = ByteTokenizer()

    def embed_prefix(self, prefix: Tensor | None, prefix_mask: Tensor | None, batch: int) -> Tensor:
        """prefix (B, P', M) with P' <= P, prefix_mask (B, P') bool -> (B, P, D) slot embeddings."""
        p, d = self.cfg.prefix_len, self.cfg.dim
        out = self.empty_slot.expand(batch, p, d)
        if prefix is not None and prefix.shape[1] > 0:
            n = prefix.shape[1]
            if n > p:
                raise ValueError(f"at most {p} prefix vectors fit this model, got {n}; pass fewer items")
            if prefix.shape[0] != batch or prefix.shape[2] != self.cfg.embed_dim:
                raise ValueError(
                    f"prefix must have shape (B={batch}, P, M={self.cfg.embed_dim}), "
                    f"got {tuple(prefix.shape)}"
                )
            mask = torch.ones(batch, n, dtype=torch.bool) if prefix_mask is None else prefix_mask.bool()
            items = self.prefix_proj(prefix.to(self.prefix_proj.weight.dtype))  # (B, P', D)
            filled = torch.where(mask[..., None].to(items.device), items, self.empty_slot)  # (B, P', D)
            out = torch.cat([filled, out[:, n:]], dim=1)
        return out + self.slot_embed[:p]

    def forward(
        self,
        ids: Tensor,
        prefix: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> LMOutput:
        """ids (B, T) tokens; prefix (B, P', M); prefix_mask (B, P') bool. Returns logits (B, T, V).

        Without a cache, or with an empty one, the prefix slots come first; with a non-empty cache
        ``ids`` continue the cached sequence and the prefix arguments are ignored. ``pad_mask`` (B, T)
        bool marks real tokens of right-padded rows (training): the MoE skips padding, whose outputs
        are then meaningless; causal attention already keeps padding out of the real positions.
        ``last_only``: logits of the last position only, (B, 1, V) (generation needs no more).
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (B, T), got {tuple(ids.shape)}")
        b, t = ids.shape
        start = 0 if cache is None else cache.length
        x = self.tok_embed(ids)  # (B, T, D)
        n_pre = 0
        if start == 0:
            x = torch.cat([self.embed_prefix(prefix, prefix_mask, b), x], dim=1)  # (B, P + T, D)
            n_pre = self.cfg.prefix_len
        total = start + x.shape[1]
        if total > self.pos_embed.num_embeddings:
            raise ValueError(
                f"sequence of {total - self.cfg.prefix_len} tokens exceeds max_len {self.cfg.max_len}"
            )
        x = x + self.pos_embed(torch.arange(start, total, device=ids.device))
        mask = None
        if pad_mask is not None:
            if pad_mask.shape != (b, t):
                raise ValueError(f"pad_mask must have shape (B, T) = {(b, t)}, got {tuple(pad_mask.shape)}")
            mask = torch.cat([pad_mask.new_ones(b, n_pre), pad_mask], dim=1).bool()  # (B, P + T)
        attn_mask = attention_mask(start, x.shape[1], self.cfg.window, self.cfg.prefix_len, ids.device)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, a = block(x, cache, i, start, mask, attn_mask)
            aux = aux + a
        x = x[:, -1:] if last_only else x[:, n_pre:]
        logits = self.head(self.norm(x))  # (B, T, V), T = 1 with last_only
        return LMOutput(logits, aux)

    @torch.no_grad()
    def update_moe_biases(self) -> None:
        for block in self.blocks:
            block.ffn.update_bias()

    # ------------------------------------------------------------------------------------------------
    # prompting and generation

    def build_prompt(self, question: str, captions: Sequence[str | None] = ()) -> list[int]:
        """Token ids of ``[BOS] [1] caption\\n... Q: question\\nA: `` (the answer follows)."""
        return [BOS] + self.tokenizer.encode(format_prompt(question, captions))

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        prefix_vectors: np.ndarray | Tensor | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as they are decoded (greedy when ``temperature == 0``).

        prefix_vectors (P', M) for one sequence. Stops at EOS, ``max_new_tokens`` or the first stop
        string (which is not emitted). Prompts longer than the model's window keep their tail.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("prompt_ids is empty; start it with the BOS id (see build_prompt)")
        room = self.cfg.max_len - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens must be < max_len {self.cfg.max_len}")
        if len(ids) > room:
            ids = ids[:1] + ids[len(ids) - room + 1 :]  # keep BOS and the question at the end
        prefix = None
        if prefix_vectors is not None and len(prefix_vectors):
            prefix = torch.as_tensor(np.asarray(prefix_vectors, dtype=np.float32))[None][
                :, : self.cfg.prefix_len
            ]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.cfg.depth)
            logits = self(torch.tensor([ids]), prefix, cache=cache, last_only=True).logits[0, -1]  # (V,)
            decoder = self.tokenizer.stream_decoder()
            stopper = StopFilter(stop)
            for _ in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, gen)
                if nxt in (EOS, PAD):
                    break
                piece = stopper.push(decoder.push(nxt))
                if piece:
                    yield piece
                if stopper.stopped:
                    return
                logits = self(torch.tensor([[nxt]]), cache=cache, last_only=True).logits[0, -1]
            tail = stopper.push(decoder.flush()) + stopper.flush()
            if tail:
                yield tail
        finally:
            self.train(was_training)


def format_prompt(question: str, captions: Sequence[str | None] = ()) -> str:
    lines = [f"[{i}] {c.strip()}" for i, c in enumerate(captions, 1) if c and c.strip()]
    return "".join(line + "\n" for line in lines) + f"Q: {question.strip()}\nA: "


# ----------------------------------------------------------------------------------------------------
# configs and checkpoints


def resolve_lm(name_or_path: str | Path) -> tuple[LMConfig, Path | None]:
    """A config name (``mm/configs/lm_<name>.json`` or ``<name>.json``), a checkpoint dir or a JSON file."""
    name = str(name_or_path)
    return resolve_checkpoint(
        name_or_path,
        LMConfig.from_json,
        [CONFIG_DIR / (f"{name}.json" if name.startswith("lm_") else f"lm_{name}.json")],
        f"unknown LM {name_or_path!r}: use lm_tiny, lm_fast, lm_small or a checkpoint directory such as "
        f"{CHECKPOINT_DIR}",
        what="an LM checkpoint",
    )


def load_lm(name_or_path: str | Path = CHECKPOINT_DIR, pretrained: bool = True) -> GroundedLM:
    """Build the LM from a config/checkpoint (weights: if it has them and ``pretrained``)."""
    cfg, ckpt = resolve_lm(name_or_path)
    model = GroundedLM(cfg)
    if pretrained and ckpt is not None:
        state = {k: v.float() for k, v in read_weights(ckpt).items()}
        state.setdefault("head.weight", state.get("tok_embed.weight"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if not k.endswith("_load_acc")] or unexpected:
            raise ConfigError(
                f"LM checkpoint {ckpt} does not match its config: {missing[:3]} {unexpected[:3]}"
            )
    return model.eval()


def save_lm(model: GroundedLM, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (tied head stored once; bf16 ``dtype`` halves it)."""
    state = {
        k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous().clone()
        for k, v in model.state_dict().items()
        if k != "head.weight"
    }
    return save_checkpoint(out_dir, state, model.cfg.to_dict(), model.cfg.name)
