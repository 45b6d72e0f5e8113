"""The shape of an embedder as the index layer sees it. ``index`` never imports ``mm``.

Media are sniffed, bounded and decoded by the embedder's ``media`` reader (``mm.media.MediaReader`` for
the real model), so ingest decodes exactly as the encoders and the service's uploads do, with the same
limits, and ``index`` holds no decoder of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# A speech recogniser for ingest: a decoded audio payload -> {"text", "language"}, or None when the clip
# holds no speech (``mm.speech.Transcriber`` behind the service's adapter).
Transcribe = Callable[[Any], Mapping[str, str] | None]


class MediaInfo(Protocol):
    """What a file's header says (``mm.media.MediaInfo``, a frozen dataclass: hence read-only here)."""

    @property
    def modality(self) -> str: ...  # "image" | "audio" | "text"

    @property
    def mime(self) -> str: ...

    @property
    def size(self) -> int: ...  # bytes

    @property
    def width(self) -> int | None: ...

    @property
    def height(self) -> int | None: ...

    @property
    def duration(self) -> float | None: ...  # seconds (audio)


class MediaReader(Protocol):
    """Sniffs, bounds and decodes media files. Every refusal is a ``ValueError`` subclass
    (``mm.errors.MediaError``) whose message names the file by the ``name`` given, never a temp path."""

    @property
    def media_suffixes(self) -> frozenset[str]:  # lower-case image and audio suffixes (a .txt captions)
        ...

    def modality_of(self, path: str | Path) -> str | None:
        """``"image"``, ``"audio"``, ``"text"`` or None (not a file we index), from the name."""
        ...

    def sniff(self, src: Path | bytes, name: str | None = None, modality: str | None = None) -> MediaInfo:
        """The header only: refuses empty, oversized (bytes, pixels, seconds), lying or unknown files
        before they are read whole or decoded."""
        ...

    def decode(self, src: Path | bytes, info: Any, name: str | None = None) -> Any:  # info: what sniff gave
        """What ``encode_<info.modality>`` takes: an image, ``(waveform, rate)`` or the text as stored."""
        ...

    def read_caption(self, path: Path) -> str | None:
        """A sidecar caption, bounded at the read; None when unreadable."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps media to ``(n, dim)`` float32 L2-normalised vectors in one shared space.

    ``encode_image`` takes paths or PIL images; ``encode_audio`` takes paths or ``(waveform, rate)``
    pairs. Bad media raise a ``ValueError`` subclass (``mm.errors.MediaError``) naming the file.
    ``media`` decodes files into what the encoders take (ingest's decoding runs in worker threads).
    """

    # Read-only properties, so that an embedder may hold them as plain attributes or compute them.
    @property
    def dim(self) -> int: ...

    @property
    def modalities(self) -> tuple[str, ...]: ...

    @property
    def model_id(self) -> str:  # identifies the weights; stored in collection.json so vectors are never mixed
        ...

    @property
    def media(self) -> MediaReader: ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_image(self, images: Sequence[Any]) -> np.ndarray: ...

    def encode_audio(self, clips: Sequence[Any]) -> np.ndarray: ...
