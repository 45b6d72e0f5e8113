"""Modality encoders: each turns raw input into tokens ``(B, T, C)`` for the shared backbone.

Every encoder is an :class:`Encoder` with ``out_dim``, ``frozen``, ``prepare(raw: list) -> batch``
(CPU work: decoding, tokenising, resizing, log-mel; pads to the longest item in the list),
``collate(list_of_batches) -> batch`` (merges separately prepared batches) and
``forward(batch) -> EncoderOutput(tokens, mask, pooled)``.

The factories import their heavy dependencies (transformers, open_clip, torchaudio) only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mm.encoders.base import Encoder, EncoderOutput, collate, masked_mean

if TYPE_CHECKING:
    from mm.config import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig

__all__ = [
    "Encoder",
    "EncoderOutput",
    "collate",
    "masked_mean",
    "build_text_encoder",
    "build_image_encoder",
    "build_audio_encoder",
]


def build_text_encoder(cfg: TextEncoderConfig, pretrained: str | None = None) -> Encoder:
    """``cfg.kind``: "minilm", "use_multilingual", "e5_small" (frozen, packaged), "open_clip" or "bpe"."""
    from mm.encoders.text import build_text_encoder as build

    return build(cfg, pretrained)


def build_image_encoder(cfg: ImageEncoderConfig, pretrained: str | None = None) -> Encoder:
    """``cfg.kind``: "efficientnet_lite0/1/2" (frozen, packaged weights), "open_clip" or "patch" (scratch)."""
    from mm.encoders.image import build_image_encoder as build

    return build(cfg, pretrained)


def build_audio_encoder(cfg: AudioEncoderConfig) -> Encoder:
    """``cfg.kind``: "logmel_patch" (log-mel patches, from scratch), "whisper" (Whisper's encoder, frozen,
    packaged weights), "sfx" (aisfx sound-effects CNN, frozen), or a list of them (tokens combined)."""
    from mm.encoders.audio import build_audio_encoder as build

    return build(cfg)
