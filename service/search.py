"""Search: one :class:`~service.schemas.SearchQuery` answered by one function, :func:`answer`.

Every entry point builds a ``SearchQuery`` (which holds every rule of a query: exactly one of text,
item, vector or file; ``k`` and ``offset`` bounds; filters; the item's own exclusion in more-like-this;
vector normalisation) and hands it here: ``POST /search`` and its fast path, ``POST /search/upload``, the
WebSocket, generation's retrieval and ``mm search``. Nothing below it checks the query again.

Answering is two steps, so that an async caller can run only the model in a thread:

1. :func:`embed`: the query in the collection's space (the model for text and files, an audio file's
   transcript fused in, the stored vector for an item, the given vector checked against the
   collection's dim), its modality, and what a spoken query was heard to say;
2. :func:`rank`: the collection searched with the query's filter, ranked by its ``mode``.

:class:`SearchAnswer` holds the hits; :func:`hit_to_dict` makes the one result shape
(:class:`~service.schemas.SearchResult`) that the REST API, the WebSocket and ``mm search --json`` give.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from index.api import fans_out, reader
from index.ingest import heard_in
from index.types import Hit, Item
from mm.errors import MediaError
from mm.media import text_snippet
from service.errors import APIError
from service.ranking import Ranked, rank_hits
from service.schemas import QueryMedia, SearchQuery, SearchResult, Transcript

if TYPE_CHECKING:
    from collections.abc import Sequence

    from index.api import CollectionAPI as Collection
    from index.protocol import Embedder
    from mm.calibration import Calibration


log = logging.getLogger(__name__)


class NotFound(LookupError):
    """An item id the collection does not hold (REST: 404)."""


def http_error(exc: NotFound | ValueError) -> APIError:
    """The HTTP error for what :func:`answer` raises, but for a MediaError, which callers re-raise for the
    app's own handler (415/413/422)."""
    if isinstance(exc, NotFound):
        return APIError(404, str(exc))
    return APIError(422, str(exc), "validation_error")


def needs_model(query: SearchQuery) -> bool:
    """Whether step 1 runs the model (text or a file), i.e. is worth a thread hand-off in async code."""
    return query.query is not None or query.media is not None


@dataclass(frozen=True)
class QueryVector:
    """Step 1's result: the ``(D,)`` query vector and, for a spoken query, what was heard."""

    vector: np.ndarray
    heard: dict[str, str] | None = None  # {"text", "language"} of the speech in an audio query
    modality: str | None = None  # what the query is (calibration is per query modality); None: a raw vector


def embed_file(embedder: Embedder, media: QueryMedia) -> QueryVector:
    """An image or audio file decoded by the embedder's reader exactly as ingest and ``POST /items`` decode
    (same limits, checked from the header), then embedded. An audio file with speech, when the embedder
    carries a recogniser (``embedder.transcribe``, attached by :func:`service.embedding.load_embedder`),
    is also transcribed and searched by the fusion of its clip and its transcript. Raises
    :class:`MediaError`."""
    try:
        info = embedder.media.sniff(media.path, media.name, media.modality)
        payload = embedder.media.decode(media.path, info, media.name)
        encode = embedder.encode_image if media.modality == "image" else embedder.encode_audio
        vector = np.asarray(encode([payload])[0], dtype=np.float32)
    except MediaError:
        raise
    except (ValueError, OSError) as exc:  # a decoder error the model did not wrap: still bad input
        raise MediaError(f"cannot read {media.name}: {exc}", kind="corrupt", path=str(media.path)) from exc
    transcribe = getattr(embedder, "transcribe", None) if media.modality == "audio" else None
    heard = heard_in(payload, transcribe, media.name) if transcribe is not None else None
    if heard is None:
        return QueryVector(vector, modality=media.modality)
    from mm.speech import fuse_spoken  # one fusion for the service and the benchmarks (mm.speech)

    return QueryVector(fuse_spoken(vector, embedder.encode_text([heard["text"]])[0]), heard, "audio")


def embed(query: SearchQuery, embedder: Embedder, collection: Collection) -> QueryVector:
    """Step 1: the ``(D,)`` float32 query vector, the query's modality (calibration is per modality pair)
    and what a spoken query was heard to say. Raises NotFound, ValueError (a vector of the wrong length)
    and MediaError."""
    if query.query is not None:
        return QueryVector(embedder.encode_text([query.query])[0], modality="text")
    if query.media is not None:
        return embed_file(embedder, query.media)  # a spoken query: clip and transcript fused
    if query.item_id is not None:
        item = collection.get(query.item_id)
        vec = collection.vector(query.item_id) if item is not None else None
        if item is None or vec is None:
            raise NotFound(f"item {query.item_id} not found (or it has no vector)")
        return QueryVector(np.asarray(vec, dtype=np.float32), modality=item.modality)
    unit = query.unit
    assert unit is not None  # SearchQuery: exactly one kind of query
    if unit.shape[0] != collection.dim:
        raise ValueError(f"vector must hold {collection.dim} finite numbers, got {unit.shape[0]}")
    return QueryVector(unit)


def query_vector(query: SearchQuery, embedder: Embedder, collection: Collection) -> np.ndarray:
    """Step 1's vector alone (see :func:`embed`)."""
    return embed(query, embedder, collection).vector


@dataclass
class SearchAnswer:
    """The hits of one query, best first, and the time the search itself took (not the embedding).

    ``hits[i].score`` is the final score (calibrated and fused, see :mod:`service.ranking`); ``ranked[i]``
    holds the raw cosine and the word-match score beside it.
    """

    query: SearchQuery
    hits: list[Hit]
    took_ms: float
    heard: dict[str, str] | None = None  # a spoken query's transcript {"text", "language"}
    ranked: list[Ranked] | None = None
    no_good_match: bool = False  # the best hit is under the model's no-match threshold (or nothing matched)
    missing: dict[int, str] | None = None  # allow_partial: shards left out (shard -> why); None: not allowed

    def partial_fields(self) -> dict[str, Any]:
        """``{"partial", "missing_shards"}`` of an answer that was allowed to be partial, else nothing."""
        if self.missing is None:
            return {}
        out: dict[str, Any] = {"partial": bool(self.missing)}
        if self.missing:
            out["missing_shards"] = {str(s): why for s, why in sorted(self.missing.items())}
        return out

    def results(self) -> list[SearchResult]:
        if self.ranked is None:
            return [hit_to_dict(h) for h in self.hits]
        return [hit_to_dict(r.hit, r.raw, r.words) for r in self.ranked]

    def to_dict(self) -> dict[str, Any]:
        """The ``SearchResponse`` body: results, took_ms, query, no_good_match (+ heard for speech)."""
        out = {
            "results": self.results(),
            "took_ms": round(self.took_ms, 3),
            "query": self.query.echo(),
            "no_good_match": self.no_good_match,
        }
        if self.heard is not None:
            out["heard"] = self.heard
        return out | self.partial_fields()


def rank(
    query: SearchQuery,
    qv: QueryVector,
    collection: Collection,
    calibration: Calibration | None = None,
) -> SearchAnswer:
    """Step 2: the collection searched under the query's filter, ``k`` hits after ``offset``, ranked by
    ``query.mode`` through :func:`service.ranking.rank_hits` (calibrated scores across modalities; words
    fused in for a text query, or a spoken query's transcript)."""
    t0 = time.perf_counter()
    text = query.query if query.query is not None else (qv.heard or {}).get("text")
    view, missing = reader(collection, allow_partial=query.allow_partial)  # a shard may fail: 503, or marked
    ranked = rank_hits(
        view,
        qv.vector,
        k=query.k,
        offset=query.offset,
        filter=query.filter,
        mode=query.mode,
        text=text,
        query_modality=qv.modality,
        calibration=calibration,
    )
    fitted = calibration is not None and calibration.fitted and qv.modality is not None
    no_match = (not ranked and query.offset == 0) or (
        fitted and bool(ranked) and not calibration.is_match(ranked[0].hit.score)  # type: ignore[union-attr]
    )
    took = (time.perf_counter() - t0) * 1000.0
    partial = missing if query.allow_partial else None
    return SearchAnswer(query, [r.hit for r in ranked], took, qv.heard, ranked, no_match, partial)


def calibration_of(embedder: Embedder) -> Calibration | None:
    """The embedder's score calibration (``mm.calibration``), when it carries one."""
    return getattr(embedder, "calibration", None)


def answer(query: SearchQuery, embedder: Embedder, collection: Collection) -> SearchAnswer:
    """The answer to ``query``: embedded (step 1), then searched and ranked (step 2). Blocking.

    Raises NotFound (an unknown item), ValueError (a vector of the wrong length) and MediaError (a file
    that cannot be read); every other rule was checked when the ``SearchQuery`` was made.
    """
    qv = embed(query, embedder, collection)
    return rank(query, qv, collection, calibration_of(embedder))


async def answer_async(query: SearchQuery, embedder: Embedder, collection: Collection) -> SearchAnswer:
    """:func:`answer` for the event loop: only the model runs in the thread pool. A FAISS search of a
    served collection takes well under a millisecond, less than the two thread hand-offs it would cost,
    so it (and an item or vector query's step 1) runs on the loop; a sharded one's waits on its shards (up
    to the deadline), so all of it runs in the thread pool."""
    if fans_out(collection):
        return await run_in_threadpool(answer, query, embedder, collection)
    if needs_model(query):
        qv = await run_in_threadpool(embed, query, embedder, collection)
    else:
        qv = embed(query, embedder, collection)
    return rank(query, qv, collection, calibration_of(embedder))


async def answer_http(query: SearchQuery, embedder: Embedder, collection: Collection) -> SearchAnswer:
    """:func:`answer_async` for a route or a WebSocket: NotFound and ValueError become HTTP errors
    (:func:`http_error`); a MediaError goes on to the app's own handler."""
    try:
        return await answer_async(query, embedder, collection)
    except MediaError:
        raise
    except (NotFound, ValueError) as exc:
        raise http_error(exc) from exc


def embed_query(
    collection: Collection,
    embedder: Embedder,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    item_id: int | None = None,
    vector: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, SearchQuery]:
    """Step 1 for a query given as keywords (notebooks, scripts): the ``(D,)`` vector and the query.

    Raises ValueError (pydantic's ValidationError for a rule of ``SearchQuery``), NotFound, MediaError.
    """
    if image is not None and audio is not None:  # one media field holds one file
        raise ValueError("give one file: an image or an audio clip, not both")
    media = QueryMedia("image", image) if image is not None else None
    media = QueryMedia("audio", audio) if audio is not None else media
    values = None if vector is None else np.asarray(vector, dtype=np.float64).reshape(-1).tolist()
    query = SearchQuery(query=text, item_id=item_id, vector=values, media=media)
    return query_vector(query, embedder, collection), query


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
        "transcript": transcript_of(item),
    }


def transcript_of(item: Item) -> Transcript | None:
    """The ``{"text", "language"}`` ingest stored for an audio item's speech, or None."""
    t = item.extra.get("transcript") if isinstance(item.extra, dict) else None
    if not isinstance(t, dict) or not isinstance(t.get("text"), str):
        return None
    return {"text": t["text"], "language": str(t.get("language") or "")}


def hit_to_dict(hit: Hit, raw: float | None = None, words: float | None = None) -> SearchResult:
    """One result, in the one shape every answer uses (a dict literal that mypy checks against
    :class:`~service.schemas.SearchResult`; no validation pass per result on the hot path)."""
    item = hit.item
    media_url, thumbnail_url = media_urls(item)
    return {
        "id": int(hit.id),
        "score": round(float(hit.score), 6),
        "score_raw": None if raw is None else round(float(raw), 6),
        "lexical_score": None if words is None else round(float(words), 4),
        "modality": item.modality,  # type: ignore[typeddict-item]  # the collection stores only these
        "caption": text_snippet(item.caption),  # a hit carries a snippet; GET /items/{id} the stored text
        "media_url": media_url,
        "thumbnail_url": thumbnail_url,
        "uri": item.uri,
        "mime": item.mime,
        "duration": item.duration,
        "width": item.width,
        "height": item.height,
        "tags": list(item.tags),
        "transcript": transcript_of(item),
    }
