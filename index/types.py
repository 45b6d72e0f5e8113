"""Plain data types shared by the index layer and its callers (service, CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Item:
    """One row of ``meta.sqlite``: a media file or text the collection holds."""

    id: int  # stable int64 id, also the FAISS id
    modality: str  # "text" | "image" | "audio"
    uri: str  # absolute path of the stored/original file, or "" for inline text
    sha256: str
    mime: str = ""
    caption: str = ""  # caption / sidecar text / the text itself for text items
    tags: list[str] = field(default_factory=list)
    size: int = 0  # bytes
    width: int | None = None
    height: int | None = None
    duration: float | None = None  # seconds (audio)
    mtime: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    error: str | None = None  # set when decoding/encoding failed; such items have no vector
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hit:
    """One search result."""

    id: int
    score: float  # inner product of normalised vectors (cosine), higher is better
    item: Item


def check_span(since: float | None, until: float | None) -> None:
    """ValueError when ``since`` is after ``until``, a time span nothing can match. The one place this rule
    is written: a :class:`Filter` checks it when made, and so does the service's ``SearchFilters``."""
    if since is not None and until is not None and since > until:
        raise ValueError("since is after until: nothing can match")


@dataclass
class Filter:
    """Metadata filter applied inside FAISS search (IDSelector), so k results come back after filtering."""

    modalities: list[str] | None = None  # keep only these modalities
    tags: list[str] | None = None  # keep items carrying all of these tags
    path_prefix: str | None = None  # keep items whose uri starts with this
    since: float | None = None  # created_at >= since (unix seconds)
    until: float | None = None  # created_at <= until
    exclude_ids: list[int] | None = None  # e.g. the query item for more-like-this

    def __post_init__(self) -> None:
        check_span(self.since, self.until)

    def is_empty(self) -> bool:
        return not any(
            v
            for v in (self.modalities, self.tags, self.path_prefix, self.since, self.until, self.exclude_ids)
        )


@dataclass
class ItemError:
    path: str
    error: str


@dataclass
class IngestReport:
    """What one ingest run did. ``errors`` lists files that could not be used; a run never aborts for one."""

    added: int = 0
    updated: int = 0
    skipped: int = 0  # unchanged (same sha256 + mtime) or duplicate content
    failed: int = 0
    seen: int = 0
    errors: list[ItemError] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the log: counts and time."""
        return (
            f"{self.added} added, {self.updated} updated, {self.skipped} skipped, {self.failed} failed "
            f"in {self.seconds:.1f}s"
        )
