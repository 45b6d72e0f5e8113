"""Loading the embedder (``mm`` is imported lazily: importing the service costs no model load)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from index.protocol import Embedder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
FALLBACK_MODEL = "small"  # used when no shipped "default" checkpoint/config exists


def load_embedder(name_or_path: str = DEFAULT_MODEL, adapter: str | Path | None = None) -> Embedder:
    """Build the embedder named ``name_or_path`` (a config name in ``mm/configs`` or a checkpoint path).

    ``"default"`` falls back to ``"small"`` when the package ships no default checkpoint. ``adapter``:
    a LoRA adapter directory (``mm finetune``) merged into the weights.
    """
    from mm.errors import ConfigError
    from mm.model import create_model

    try:
        model = create_model(name_or_path)
    except (ConfigError, FileNotFoundError) as exc:
        if name_or_path != DEFAULT_MODEL:
            raise
        log.info("no %r model shipped (%s); using %r", DEFAULT_MODEL, exc, FALLBACK_MODEL)
        model = create_model(FALLBACK_MODEL)
    if adapter is not None:
        from mm.adapter import load_adapter

        load_adapter(model, adapter)
    from service.transcription import LazyTranscriber, transcription_enabled

    if "audio" in model.modalities and transcription_enabled():
        # spoken queries are transcribed and fused (service.search.embed_file); loads on first use
        model.transcribe = LazyTranscriber()
    log.info("loaded embedder %s (dim %d)", getattr(model, "model_id", name_or_path), model.dim)
    return model
