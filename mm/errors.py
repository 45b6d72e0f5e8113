"""The project's error types. User-facing problems raise these with a message that says how to fix them."""

from __future__ import annotations


class MMError(Exception):
    """Base class of every error mm raises on purpose."""


class MediaError(MMError, ValueError):
    """A media file (or bytes) cannot be used: unsupported format, corrupt, truncated, empty or too large.

    ``kind`` is one of ``"unsupported"``, ``"corrupt"``, ``"empty"``, ``"too_large"`` so that callers
    (the REST service) can map it to a status code (415, 422, 422, 413).
    """

    def __init__(self, message: str, kind: str = "corrupt", path: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.path = path


class ConfigError(MMError, ValueError):
    """A model config or checkpoint is invalid or missing."""
