"""``POST /search`` (text, more-like-this or vector query as JSON) and ``POST /search/upload`` (a file).

Both build a :class:`~service.schemas.SearchQuery` and answer it with :mod:`service.search`; the
routes only map its errors to HTTP (404 an unknown item, 422 a query that cannot be used; a file that
cannot be read goes to the app's MediaError handler: 415/413/422).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile

from mm.errors import MediaError
from mm.media import describe_limits
from service.body import json_body_doc, parse_json, validate
from service.deps import CollectionDep, EmbedderDep, SettingsDep
from service.limits import MAX_PATH_CHARS, MAX_TAG_CHARS, MAX_TAGS, MODALITIES_CSV
from service.responses import FastJSONResponse
from service.routing import LeanRoute
from service.schemas import (
    MAX_K,
    MAX_OFFSET,
    SearchMode,
    SearchQuery,
    SearchRequest,
    SearchResponse,
    error_responses,
)
from service.search import NotFound, SearchAnswer, answer, answer_http, http_error
from service.store import query_file

# LeanRoute: /search takes only the request, so FastAPI's per-request dependency solving is skipped
# (unless include_router adds one, e.g. the API key check; /search/upload keeps FastAPI's handler).
router = APIRouter(tags=["search"], route_class=LeanRoute)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def respond(found: SearchAnswer) -> FastJSONResponse:
    # The dicts already have the SearchResponse shape (hit_to_dict); answering them directly skips a
    # second validation pass per result, which is a measurable share of a sub-millisecond search.
    return FastJSONResponse(found.to_dict())


FILE_DOC = f"an image or audio file to search with ({describe_limits()})"
# A file query has no text, so SearchQuery refuses 'keyword' for it: the form's schema lists the others.
FILE_MODES = ["hybrid", "vector"]
MODE_DOC = (
    "ranking: 'vector' (nearest neighbours of the file) or 'hybrid' (the default; a spoken query's "
    "transcript also matches words of captions, file names, tags and transcripts). 'keyword' needs a "
    "text query: use POST /search"
)


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(401, 404, 422),
    openapi_extra=json_body_doc(SearchRequest),
)
async def search_json(request: Request) -> FastJSONResponse:
    """Search by text, by an existing item (more-like-this, the item excluded) or by a raw vector.

    The body is a :class:`SearchRequest` (a :class:`SearchQuery`). The hottest route parses it in one
    pass with pydantic-core and reads the app's objects directly: FastAPI's own body parsing and
    per-request dependency resolution cost more than the FAISS search of a small collection. Most
    requests do not even get here: :mod:`service.fastpath` answers them in front of the framework,
    through the same :func:`service.search.answer_async`.
    """
    query = await parse_json(request, SearchRequest)
    state = request.app.state
    return respond(await answer_http(query, state.embedder, state.collection))


def _bounds(low: int, high: int) -> dict[str, Any]:
    """The schema's statement of a bound that :class:`SearchQuery` enforces (one check, stated twice)."""
    return {"minimum": low, "maximum": high}


@router.post("/search/upload", response_model=SearchResponse, responses=error_responses(401, 413, 415, 422))
def search_upload(
    file: Annotated[UploadFile, File(description=FILE_DOC)],
    collection: CollectionDep,
    embedder: EmbedderDep,
    settings: SettingsDep,
    modalities: Annotated[
        str | None, Form(description="comma-separated: text,image,audio", pattern=MODALITIES_CSV)
    ] = None,
    k: Annotated[int, Form(json_schema_extra=_bounds(1, MAX_K))] = 10,
    offset: Annotated[int, Form(json_schema_extra=_bounds(0, MAX_OFFSET))] = 0,
    tags: Annotated[
        str | None,
        Form(description="comma-separated; items must carry all", max_length=MAX_TAGS * (MAX_TAG_CHARS + 1)),
    ] = None,
    path_prefix: Annotated[str | None, Form(max_length=MAX_PATH_CHARS)] = None,
    since: Annotated[datetime | float | None, Form(description="ISO 8601 or unix seconds")] = None,
    until: Annotated[datetime | float | None, Form(description="ISO 8601 or unix seconds")] = None,
    mode: Annotated[
        SearchMode, Form(description=MODE_DOC, json_schema_extra={"enum": FILE_MODES})
    ] = "hybrid",
    allow_partial: Annotated[
        bool, Form(description="a sharded collection: answer from the shards that can, marked partial")
    ] = False,
) -> FastJSONResponse:
    """Search with an uploaded image or audio clip; the file is only used for the query, never stored."""
    try:
        with query_file(file, settings.max_upload_bytes) as media:
            filters = {"tags": _split(tags), "path_prefix": path_prefix, "since": since, "until": until}
            fields = {
                "media": media,
                "modalities": _split(modalities),
                "k": k,
                "offset": offset,
                "mode": mode,
                "allow_partial": allow_partial,
                "filters": {key: v for key, v in filters.items() if v not in (None, "")} or None,
            }
            found = answer(validate(SearchQuery, fields), embedder, collection)
    except MediaError:
        raise
    except (NotFound, ValueError) as exc:
        raise http_error(exc) from exc
    return respond(found)
