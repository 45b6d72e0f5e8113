"""mm: the multimodal model library (encoders, AAM attention, D-MoE, backbone, embedder, training).

Nothing is loaded at import time; import what you need from the submodules, or use the lazy
attributes ``mm.create_model`` and ``mm.MultimodalEmbedder``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_model", "MultimodalEmbedder", "MediaError"]


def __getattr__(name: str) -> Any:
    if name in ("create_model", "MultimodalEmbedder"):
        from mm import model

        return getattr(model, name)
    if name == "MediaError":
        from mm.errors import MediaError

        return MediaError
    raise AttributeError(f"module 'mm' has no attribute {name!r}")
