"""Search shared by the REST routes and the CLI: query embedding, filters, result serialisation.

A query is exactly one of: ``text``, an ``image`` file, an ``audio`` file, an ``item_id``
(more-like-this: the item's own vector, the item itself excluded) or a raw ``vector``
(advanced: a precomputed query in the collection's space).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.types import Filter, Hit, Item
from mm.media import text_snippet
from service.limits import MAX_TAGS

if TYPE_CHECKING:
    from index.collection import Collection
    from index.protocol import Embedder

MODALITIES = ("text", "image", "audio")


class NotFound(LookupError):
    """An item id the collection does not hold (REST: 404)."""


def parse_time(value: str | float | int | datetime | None) -> float | None:
    """Unix seconds from unix seconds, a ``datetime`` or an ISO 8601 string (naive means UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"time must be finite, got {value!r}")
        return float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            pass
        else:
            if not math.isfinite(seconds):  # nan, inf and 1e400 parse as floats but order nothing
                raise ValueError(f"time must be finite, got {text!r}")
            return seconds
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"cannot read time {text!r}: use unix seconds or ISO 8601 such as 2024-05-01T12:00:00"
            ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def check_modalities(modalities: Sequence[str] | None) -> list[str] | None:
    if not modalities:
        return None
    wrong = [m for m in modalities if m not in MODALITIES]
    if wrong:
        raise ValueError(f"unknown modality {wrong[0]!r}; choose from {', '.join(MODALITIES)}")
    return list(dict.fromkeys(modalities))


def build_filter(
    *,
    modalities: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    path_prefix: str | None = None,
    since: Any = None,
    until: Any = None,
    exclude_ids: Sequence[int] | None = None,
) -> Filter | None:
    """A ``Filter`` from user values (times as unix seconds or ISO strings); ``None`` when nothing filters."""
    if tags is not None and len(tags) > MAX_TAGS:  # each tag is one SQL clause; SQLite caps the depth
        raise ValueError(f"filter by at most {MAX_TAGS} tags, got {len(tags)}")
    t0, t1 = parse_time(since), parse_time(until)
    if t0 is not None and t1 is not None and t0 > t1:
        raise ValueError("since is after until: nothing can match")
    f = Filter(
        modalities=check_modalities(modalities),
        tags=[t for t in tags if t] or None if tags is not None else None,
        path_prefix=path_prefix or None,
        since=t0,
        until=t1,
        exclude_ids=list(exclude_ids) if exclude_ids else None,
    )
    return None if f.is_empty() else f


@dataclass
class Query:
    """What was searched for, as echoed back to the caller."""

    kind: str  # "text" | "image" | "audio" | "item" | "vector"
    value: str | int | None = None  # the text, the file name, the item id; None for a raw vector

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}


def embed_query(
    collection: Collection,
    embedder: Embedder,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    item_id: int | None = None,
    vector: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, Query]:
    """The ``(dim,)`` query vector for exactly one kind of query; raises ValueError, NotFound, MediaError."""
    given = [v for v in (text, image, audio, item_id, vector) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one query: text, an image, an audio file, an item id or a vector")
    if text is not None:
        if not text.strip():
            raise ValueError("the query text is empty")
        return embedder.encode_text([text])[0], Query("text", text)
    if image is not None:
        return embedder.encode_image([str(image)])[0], Query("image", Path(image).name)
    if audio is not None:
        return embedder.encode_audio([str(audio)])[0], Query("audio", Path(audio).name)
    if item_id is not None:
        vec = collection.vector(int(item_id))
        if vec is None:
            raise NotFound(f"item {item_id} not found (or it has no vector)")
        return np.asarray(vec, dtype=np.float32), Query("item", int(item_id))
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    # One float64 dot checks and measures at once: it is finite exactly when every value is (a float32
    # squared cannot overflow float64), and it does not overflow as a float32 norm would.
    wide = vec.astype(np.float64)
    squares = float(wide @ wide)
    if vec.shape[0] != collection.dim or not math.isfinite(squares):
        raise ValueError(f"vector must hold {collection.dim} finite numbers, got {vec.shape[0]}")
    if squares == 0.0:
        raise ValueError("vector must not be all zeros")
    return (wide / math.sqrt(squares)).astype(np.float32), Query("vector")


def search(
    collection: Collection,
    query_vector: np.ndarray,
    *,
    k: int = 10,
    filter: Filter | None = None,
    offset: int = 0,
) -> tuple[list[Hit], float]:
    """Search one ``(dim,)`` vector; returns the hits and the time taken in milliseconds."""
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    t0 = time.perf_counter()
    q = np.asarray(query_vector, dtype=np.float32)[None, :]  # (1, D)
    hits = collection.search(q, k=k, filter=filter, offset=offset)
    return hits[0] if hits else [], (time.perf_counter() - t0) * 1000.0


def media_urls(item: Item) -> tuple[str | None, str | None]:
    """REST paths of an item's original media and thumbnail (None where there is none)."""
    if item.modality == "text" or not item.uri:
        return None, None
    media = f"/items/{item.id}/media"
    return media, (f"/items/{item.id}/thumbnail" if item.modality == "image" else None)


def item_to_dict(item: Item) -> dict[str, Any]:
    media_url, thumbnail_url = media_urls(item)
    return {
        "id": int(item.id),
        "modality": item.modality,
        "uri": item.uri,
        "mime": item.mime,
        "caption": item.caption,
        "tags": list(item.tags),
        "size": item.size,
        "width": item.width,
        "height": item.height,
        "duration": item.duration,
        "sha256": item.sha256,
        "created_at": item.created_at,
        "updated_at": item.updated_at,
        "media_url": media_url,
        "thumbnail_url": thumbnail_url,
    }


def hit_to_dict(hit: Hit) -> dict[str, Any]:
    """One result as the REST API and ``mm search --json`` give it."""
    item = hit.item
    media_url, thumbnail_url = media_urls(item)
    return {
        "id": int(hit.id),
        "score": round(float(hit.score), 6),
        "modality": item.modality,
        "caption": text_snippet(item.caption),  # a hit carries a snippet; GET /items/{id} the stored text
        "media_url": media_url,
        "thumbnail_url": thumbnail_url,
        "uri": item.uri,
        "mime": item.mime,
        "duration": item.duration,
        "width": item.width,
        "height": item.height,
        "tags": list(item.tags),
    }
