"""``POST /search`` (text, more-like-this or vector query as JSON) and ``POST /search/upload`` (a file)."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from mm.errors import MediaError
from mm.media import require_modality
from service.body import json_body_doc, parse_json
from service.deps import CollectionDep, EmbedderDep, SettingsDep
from service.errors import APIError
from service.responses import FastJSONResponse
from service.routing import LeanRoute
from service.schemas import SearchRequest, SearchResponse, error_responses
from service.search import NotFound, Query, build_filter, embed_query, hit_to_dict, search
from service.store import copy_limited, safe_suffix

# LeanRoute: /search takes only the request, so FastAPI's per-request dependency solving is skipped
# (unless include_router adds one, e.g. the API key check; /search/upload keeps FastAPI's handler).
router = APIRouter(tags=["search"], route_class=LeanRoute)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _respond(collection, vector, query, *, k, offset, **filter_kw) -> FastJSONResponse:
    try:
        flt = build_filter(**filter_kw)
        hits, took_ms = search(collection, vector, k=k, filter=flt, offset=offset)
    except ValueError as exc:
        raise APIError(422, str(exc), "validation_error") from exc
    # The dicts already have the SearchResponse shape (hit_to_dict); answering them directly skips a
    # second validation pass per result, which is a measurable share of a sub-millisecond search.
    body = {"results": [hit_to_dict(h) for h in hits], "took_ms": round(took_ms, 3), "query": query.to_dict()}
    return FastJSONResponse(body)


async def answer_search(state: Any, req: SearchRequest) -> FastJSONResponse:
    """The answer to ``req`` over ``state.collection`` with ``state.embedder`` (an app's ``state``).

    Raises :class:`APIError` (404 unknown item, 422 a query or filter that cannot be used). Shared by the
    route below and :mod:`service.fastpath`, so both answer alike.
    """
    collection, embedder = state.collection, state.embedder
    # Only the model runs in the thread pool; a FAISS search takes well under a millisecond, less than
    # the two thread hand-offs it would cost, so it runs on the event loop.
    embed = functools.partial(
        embed_query, collection, embedder, text=req.query, item_id=req.item_id, vector=req.vector
    )
    try:
        vector, query = await run_in_threadpool(embed) if req.query is not None else embed()
    except NotFound as exc:
        raise APIError(404, str(exc)) from exc
    except ValueError as exc:  # MediaError is handled by the app's handler before reaching here
        raise APIError(422, str(exc), "validation_error") from exc
    f = req.filters
    return _respond(
        collection,
        vector,
        query,
        k=req.k,
        offset=req.offset,
        modalities=req.modalities,
        tags=f.tags if f else None,
        path_prefix=f.path_prefix if f else None,
        since=f.since if f else None,
        until=f.until if f else None,
        exclude_ids=[req.item_id] if req.item_id is not None else None,
    )


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(401, 404, 422),
    openapi_extra=json_body_doc(SearchRequest),
)
async def search_json(request: Request) -> FastJSONResponse:
    """Search by text, by an existing item (more-like-this, the item excluded) or by a raw vector.

    The body is a :class:`SearchRequest`. The hottest route parses it in one pass with pydantic-core
    and reads the app's objects directly: FastAPI's own body parsing and per-request dependency
    resolution cost more than the FAISS search of a small collection. Most requests do not even get
    here: :mod:`service.fastpath` answers them in front of the framework, through the same
    :func:`answer_search`.
    """
    return await answer_search(request.app.state, await parse_json(request, SearchRequest))


def embed_upload(embedder: Any, path: Path, modality: str, name: str) -> np.ndarray:
    """The ``(dim,)`` query vector of an uploaded file, decoded by the embedder's reader exactly as ingest
    and ``POST /items`` decode (same limits, checked from the header); messages call it ``name``."""
    try:
        info = embedder.media.sniff(path, name, modality)
        payload = embedder.media.decode(path, info, name)
        encode = embedder.encode_image if modality == "image" else embedder.encode_audio
        return np.asarray(encode([payload])[0], dtype=np.float32)
    except MediaError:
        raise
    except (ValueError, OSError) as exc:  # a decoder error the model did not wrap: still bad input
        raise APIError(422, f"cannot read {name}: {exc}", "invalid_media") from exc


@router.post("/search/upload", response_model=SearchResponse, responses=error_responses(401, 413, 415, 422))
def search_upload(
    file: Annotated[UploadFile, File(description="an image or audio file to search with")],
    collection: CollectionDep,
    embedder: EmbedderDep,
    settings: SettingsDep,
    modalities: Annotated[str | None, Form(description="comma-separated: text,image,audio")] = None,
    k: Annotated[int, Form(ge=1, le=100)] = 10,
    offset: Annotated[int, Form(ge=0, le=10_000)] = 0,
    tags: Annotated[str | None, Form(description="comma-separated; items must carry all")] = None,
    path_prefix: Annotated[str | None, Form()] = None,
    since: Annotated[str | None, Form(description="ISO 8601 or unix seconds")] = None,
    until: Annotated[str | None, Form(description="ISO 8601 or unix seconds")] = None,
) -> FastJSONResponse:
    """Search with an uploaded image or audio clip; the file is only used for the query, never stored."""
    modality = require_modality(file.filename, file.content_type, ("image", "audio"))
    name = file.filename or "upload"
    fd, tmp = tempfile.mkstemp(prefix="mm-query-", suffix=safe_suffix(file.filename, file.content_type))
    try:
        with os.fdopen(fd, "wb") as dst:
            copy_limited(file.file, dst, settings.max_upload_bytes)
        vector = embed_upload(embedder, Path(tmp), modality, name)
    finally:
        os.unlink(tmp)
    query = Query(modality, name)
    return _respond(
        collection,
        vector,
        query,
        k=k,
        offset=offset,
        modalities=_split(modalities),
        tags=_split(tags),
        path_prefix=path_prefix,
        since=since,
        until=until,
    )
