"""``POST /generate``: an answer grounded in retrieved items, as JSON or as Server-Sent Events.

The query is JSON text (``{"query": ...}``) or, as multipart, an uploaded image/audio file with an
optional ``question``. With ``stream=true`` the answer comes as ``text/event-stream``::

    event: token       data: {"text": "The"}          (one per piece)
    event: citations   data: [{"id", "modality", "score", "caption"}, ...]
    event: done        data: {"backend": "extractive"}

A backend that cannot answer gives 503 (``generator_unavailable``) before any event is sent; a failure
after the first piece is sent as ``event: error``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from index.types import Hit
from mm.errors import MediaError
from service import search
from service.body import parse_json, schema_ref, validate
from service.deps import CollectionDep, EmbedderDep, SettingsDep
from service.errors import APIError
from service.generation import (
    Generators,
    GeneratorUnavailable,
    iterate_in_thread,
    start_stream,
)
from service.schemas import (
    Citation,
    GenerateRequest,
    GenerateResponse,
    QueryMedia,
    SearchQuery,
    error_responses,
)
from service.search import NotFound, SearchAnswer, answer_async, http_error

router = APIRouter(tags=["generate"])

DEFAULT_QUESTION = "What is this?"


def generators_of(app: Any) -> Generators:
    """The app's backend registry, made on first use (item vectors come from its collection)."""
    gens = getattr(app.state, "generators", None)
    if gens is None:
        gens = app.state.generators = Generators(app.state.settings, app.state.collection.vector)
    return gens


@dataclass
class Answer:
    """A started generation: its first piece (already made, so failures surface before any byte is sent)."""

    pieces: AsyncIterator[str]
    first: str | None  # None: the answer is empty
    citations: list[Citation]
    backend: str

    async def rest(self) -> AsyncIterator[str]:
        try:
            if self.first is None:
                return
            yield self.first
            async for piece in self.pieces:
                yield piece
        finally:
            await self.pieces.aclose()  # type: ignore[attr-defined]


def unavailable(exc: GeneratorUnavailable) -> APIError:
    return APIError(503, str(exc), "generator_unavailable")


async def start_answer(
    app: Any,
    question: str,
    hits: list[Hit] | Callable[[], list[Hit]],
    *,
    backend: str | None,
    max_tokens: int,
    temperature: float,
    stop: list[str] | None,
) -> Answer:
    """Pick the backend, start it in a thread and wait for its first piece. Raises APIError 422/503.

    The backend starts (model loading, parameter checks) in the thread that then makes the pieces:
    one thread hand-off from here to the first piece. ``hits`` may be a function that retrieves them
    (e.g. :func:`service.search.answer`'s hits): it then runs in that thread too.
    """
    try:
        gen = generators_of(app).get(backend)
    except ValueError as exc:
        raise APIError(422, str(exc), "validation_error") from exc
    cites: list[Citation] = []

    def begin() -> Iterator[str]:
        found = hits() if callable(hits) else hits
        pieces, used = start_stream(
            gen, question, found, max_tokens=max_tokens, temperature=temperature, stop=stop
        )
        cites.extend(used)
        return pieces

    agen = iterate_in_thread(begin)
    try:
        first: str | None = await agen.__anext__()
    except StopAsyncIteration:
        first = None
    except GeneratorUnavailable as exc:
        await agen.aclose()
        raise unavailable(exc) from exc
    except MediaError:  # from retrieval; the app's handler maps it to 415/422/413
        await agen.aclose()
        raise
    except ValueError as exc:
        await agen.aclose()
        raise APIError(422, str(exc), "validation_error") from exc
    return Answer(agen, first, cites, gen.name)


async def find(query: SearchQuery, embedder: Any, collection: Any) -> SearchAnswer:
    """:func:`service.search.answer_async` with its errors as HTTP errors (MediaError: the app's handler)."""
    try:
        return await answer_async(query, embedder, collection)
    except MediaError:
        raise
    except (NotFound, ValueError) as exc:
        raise http_error(exc) from exc


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def sse_events(answer: Answer) -> AsyncIterator[str]:
    stream = answer.rest()
    try:
        async for piece in stream:
            yield sse("token", {"text": piece})
        yield sse("citations", [c.model_dump() for c in answer.citations])
        yield sse("done", {"backend": answer.backend})
    except GeneratorUnavailable as exc:
        yield sse("error", {"code": "generator_unavailable", "message": str(exc)})
    finally:
        await stream.aclose()


async def respond(answer: Answer, stream: bool):
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(sse_events(answer), media_type="text/event-stream", headers=headers)
    try:
        text = "".join([p async for p in answer.rest()])
    except GeneratorUnavailable as exc:
        raise unavailable(exc) from exc
    body = GenerateResponse(answer=text, citations=answer.citations, backend=answer.backend)
    return JSONResponse(body.model_dump())


def _form_list(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    return [p.strip() for p in str(value).split(",") if p.strip()]


async def _from_form(request: Request, collection: Any, embedder: Any, settings: Any):
    from mm.media import require_modality
    from service.store import copy_limited, safe_suffix

    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(422, "multipart /generate needs a 'file' (an image or audio clip)", "validation_error")
    fields = {k: v for k, v in form.items() if k != "file"}
    fields["query"] = fields.pop("question", None) or DEFAULT_QUESTION
    fields["modalities"] = _form_list(fields.get("modalities"))
    fields["stop"] = _form_list(fields.get("stop"))
    fields = {k: v for k, v in fields.items() if v is not None}
    req = validate(GenerateRequest, fields)
    modality = require_modality(upload.filename, upload.content_type, ("image", "audio"))
    fd, tmp = tempfile.mkstemp(prefix="mm-ask-", suffix=safe_suffix(upload.filename, upload.content_type))
    try:
        with os.fdopen(fd, "wb") as dst:
            copy_limited(upload.file, dst, settings.max_upload_bytes)
        media = QueryMedia(modality, tmp, upload.filename)
        query = SearchQuery(media=media, k=req.k, modalities=req.modalities)
        hits = (await find(query, embedder, collection)).hits
    finally:
        os.unlink(tmp)
    return req, hits


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **error_responses(401, 413, 415, 422, 503),
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": schema_ref(GenerateRequest)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "question": {"type": "string"},
                            "k": {"type": "integer"},
                            "modalities": {"type": "string", "description": "comma-separated"},
                            "backend": {"type": "string"},
                            "stream": {"type": "boolean"},
                        },
                    }
                },
            },
            "required": True,
        }
    },
)
async def generate(request: Request, collection: CollectionDep, embedder: EmbedderDep, settings: SettingsDep):
    """Answer a question (or describe an uploaded image/audio clip) from the closest items, citing them."""
    hits: list[Hit] | Callable[[], list[Hit]]  # a text query is embedded in the generation thread
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        req, hits = await _from_form(request, collection, embedder, settings)
    else:
        req = await parse_json(request, GenerateRequest)
        query = req.retrieval()
        hits = lambda: search.answer(query, embedder, collection).hits  # noqa: E731
    answer = await start_answer(
        request.app,
        req.query,
        hits,
        backend=req.backend,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        stop=req.stop,
    )
    return await respond(answer, req.stream)
