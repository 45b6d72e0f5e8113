"""The shape of an embedder as the index layer sees it. ``index`` never imports ``mm``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps media to ``(n, dim)`` float32 L2-normalised vectors in one shared space.

    ``encode_image`` takes paths or PIL images; ``encode_audio`` takes paths or ``(waveform, rate)``
    pairs. Bad media raise a ``ValueError`` subclass (``mm.errors.MediaError``) naming the file.
    """

    # read-only (properties), so that an embedder may compute them or store them as plain attributes
    @property
    def dim(self) -> int: ...

    @property
    def modalities(self) -> tuple[str, ...]: ...

    @property
    def model_id(self) -> str:  # identifies the weights; stored in collection.json so vectors are never mixed
        ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_image(self, images: Sequence[Any]) -> np.ndarray: ...

    def encode_audio(self, clips: Sequence[Any]) -> np.ndarray: ...
