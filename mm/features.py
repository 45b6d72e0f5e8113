"""Per-item input caching for training and evaluation.

Frozen pretrained encoders (MiniLM, EfficientNet-Lite0) are run once per unique item and their token
outputs kept (fp16); trainable encoders keep the decoded input (waveform, image, text) so that each
step only pays for the cheap, trainable part. Everything is keyed by the raw input (path or text).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mm.atomic import atomic_write
from mm.encoders import EncoderOutput
from mm.errors import MediaError

log = logging.getLogger(__name__)


class FeatureCache:
    """Holds, for one modality, either frozen encoder outputs or decoded inputs per item key."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        modality: str,
        batch_size: int = 32,
        sample_rate: int = 16000,
        crop_seconds: float | None = None,
    ):
        self.encoder = encoder
        self.modality = modality
        self.frozen = bool(getattr(encoder, "frozen", False))
        self.batch_size = batch_size
        self.sample_rate = sample_rate
        self.crop_seconds = crop_seconds  # audio longer than this keeps its centre (as the encoder would)
        self.items: dict[str, Any] = {}
        self.failed: dict[str, str] = {}

    def fill(self, keys: Sequence[str], progress: bool = False) -> None:
        """Decode (and, for frozen encoders, encode) every key not cached yet; bad media are skipped."""
        from tqdm.auto import tqdm

        todo = [k for k in dict.fromkeys(keys) if k not in self.items and k not in self.failed]
        bar = tqdm(total=len(todo), desc=f"cache {self.modality}", disable=not progress or not todo)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            decoded = []
            for k in chunk:
                try:
                    decoded.append((k, self._decode(k)))
                except MediaError as e:
                    self.failed[k] = str(e)
                    log.warning("skipping %s: %s", k, e)
            if self.frozen and decoded:
                with torch.inference_mode():
                    out = self.encoder(self.encoder.prepare([d for _, d in decoded]))
                for i, (k, _) in enumerate(decoded):
                    n = int(out.mask[i].sum())
                    self.items[k] = (out.tokens[i, :n].to(torch.float16).clone(), out.pooled[i].clone())
            else:
                self.items.update(decoded)
            bar.update(len(chunk))
        bar.close()

    @property
    def persistent(self) -> bool:
        return self.frozen or self.modality == "audio"

    def save(self, path: str | Path) -> None:
        """Persist frozen-encoder features, and decoded audio (slow to decode and resample; images and
        text are cheap to redo)."""
        if not self.persistent:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"items": self.items, "failed": self.failed}, tmp))

    def load(self, path: str | Path) -> int:
        """Load a cache written by :meth:`save`; returns how many items it held (0 when absent)."""
        path = Path(path)
        if not self.persistent or not path.exists():
            return 0
        state = torch.load(path, weights_only=False)
        self.items.update(state["items"])
        self.failed.update(state["failed"])
        return len(state["items"])

    def _decode(self, key: str) -> Any:
        if self.modality == "text":
            return key
        from mm import media

        if self.modality == "image":
            img = media.load_image(key)
            img.load()
            return img
        wave = media.load_audio(key, target_rate=self.sample_rate, crop_seconds=self.crop_seconds)
        return (wave.astype(np.float16), self.sample_rate)  # half the memory; log-mel input is robust to it

    def batch(self, keys: Sequence[str]) -> EncoderOutput:
        """Encoder outputs for ``keys`` (all cached), with gradients for trainable encoders."""
        if not self.frozen:
            return self.encoder(self.encoder.prepare([self.items[k] for k in keys]))
        toks = [self.items[k][0] for k in keys]
        t = max(x.shape[0] for x in toks)
        c = toks[0].shape[1]
        tokens = torch.zeros(len(keys), t, c)
        mask = torch.zeros(len(keys), t, dtype=torch.bool)
        for i, x in enumerate(toks):
            tokens[i, : x.shape[0]] = x.float()
            mask[i, : x.shape[0]] = True
        pooled: Tensor = torch.stack([self.items[k][1] for k in keys]).float()
        return EncoderOutput(tokens, mask, pooled)
