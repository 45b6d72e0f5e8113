"""What every modality encoder shares: the output tuple, freezing, device moves and batch collation.

An encoder does its CPU-side work in ``prepare(raw: list) -> dict[str, Tensor]`` (tokenising, decoding
through :mod:`mm.media`, resizing, log-mel) and returns a padded batch; ``collate`` merges batches that
were prepared separately (e.g. one item at a time in data-loader workers) by zero-padding every
non-batch dimension to the largest and concatenating. Zero is each encoder's padding value, and every
padded position is False in its mask. ``forward(batch)`` returns an :class:`EncoderOutput`.

Index letters: b batch, t tokens, c encoder width (``out_dim``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.media import text_for_embedding


class EncoderOutput(NamedTuple):
    tokens: Tensor  # (B, T, C), C = encoder.out_dim
    mask: Tensor  # (B, T) bool, True = real token
    pooled: Tensor  # (B, C) summary of the item (masked mean or the encoder's own pooled output)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens: (B, T, C), (B, T) -> (B, C); an all-padding row gives zeros."""
    w = mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)


def collate(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Merge prepared batches: zero-pad every dimension after the first to the largest, then concatenate."""
    if not batches:
        raise ValueError("collate needs at least one prepared batch")
    keys = batches[0].keys()
    if any(b.keys() != keys for b in batches):
        raise ValueError("collate: prepared batches have different keys; were they made by the same encoder?")
    out: dict[str, Tensor] = {}
    for key in keys:
        parts = [b[key] for b in batches]
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        padded = []
        for p in parts:
            pad: list[int] = []
            for d in reversed(range(1, p.dim())):
                pad += [0, shape[d - 1] - p.shape[d]]
            padded.append(F.pad(p, pad) if any(pad) else p)
        out[key] = torch.cat(padded, dim=0)
    return out


class Encoder(nn.Module):
    """Base class. Subclasses set ``out_dim`` and implement ``prepare`` and ``encode``.

    A frozen encoder has ``requires_grad=False`` everywhere, runs under ``torch.no_grad()`` and stays in
    eval mode when a parent module calls ``.train()`` (its BatchNorm/dropout must not change).
    """

    out_dim: int
    frozen: bool = False
    # True when the weights come from outside the model checkpoint (an installed package, a local
    # folder or an open_clip checkpoint) and are reloaded from there; a frozen from-scratch encoder
    # (trainable=False) is False here and its random weights must be saved with the model.
    external_weights: bool = False

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        raise NotImplementedError

    def collate(self, batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate(batches)

    def freeze(self) -> Encoder:
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def forward(self, batch: dict[str, Tensor]) -> EncoderOutput:
        device = self.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if self.frozen:
            with torch.no_grad():
                return self.encode(batch)
        return self.encode(batch)


def create_open_clip(model_name: str, pretrained: str | None) -> nn.Module:
    """An open_clip model with a separate ``.text`` tower; ``pretrained`` is a checkpoint file or a tag.

    ``model_name`` is a built-in architecture ("ViT-B-32") or ``local-dir:/folder`` holding an
    ``open_clip_config.json`` (and optionally weights). Tags need a network; files do not.
    """
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("open_clip encoders need: pip install open_clip_torch") from e
    if pretrained is not None and not model_name.startswith(("hf-hub:", "local-dir:")):
        looks_like_file = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_file and not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
    return open_clip.create_model(
        model_name,
        pretrained=pretrained,
        force_custom_text=True,  # puts the text tower in .text, converting OpenAI-layout checkpoints
        pretrained_text=False,
        pretrained_image=False,
    )


def check_texts(texts: list[Any]) -> list[str]:
    """The texts as every text encoder embeds them: strings, each cut to ``mm.media.MAX_EMBED_CHARS``
    characters before the tokenizer sees it (a tokenizer reads a whole text before it truncates to
    ``max_len`` tokens)."""
    if isinstance(texts, str):
        raise TypeError("prepare expects a list of strings, got a single str; wrap it in a list")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"text encoders take strings, got {bad[0]}")
    return [text_for_embedding(t) for t in texts]
