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
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from index.types import Hit
from service import search
from service.body import parse_json, schema_ref, validate
from service.deps import CollectionDep, EmbedderDep, SettingsDep
from service.errors import APIError
from service.generation import Answer, GeneratorUnavailable, answer_request
from service.generation import generators_of as generators_of  # re-exported: tests reach the registry here
from service.generation.rewrite import Grounding
from service.generation.usecases import rewritten_hits, unavailable
from service.limits import MAX_QUERY_CHARS, MODALITIES_CSV
from service.schemas import (
    MAX_GROUNDING_K,
    MAX_NEW_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    GenerateRequest,
    GenerateResponse,
    SearchQuery,
    error_responses,
)
from service.search import answer_http
from service.settings import BACKENDS

router = APIRouter(tags=["generate"])

DEFAULT_QUESTION = "What is this?"


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def sse_events(answer: Answer) -> AsyncIterator[str]:
    stream = answer.rest()
    try:
        async for piece in stream:
            yield sse("token", {"text": piece})
        yield sse("citations", [c.model_dump() for c in answer.citations])
        yield sse("done", answer.done_fields())
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
    body = GenerateResponse(
        answer=text, citations=answer.citations, backend=answer.backend, rewritten=answer.rewritten
    )
    return JSONResponse(body.model_dump())


def _form_list(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    return [p.strip() for p in str(value).split(",") if p.strip()]


async def _from_form(request: Request, collection: Any, embedder: Any, settings: Any):
    from service.store import query_file

    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(422, "multipart /generate needs a 'file' (an image or audio clip)", "validation_error")
    fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file"}
    fields["query"] = fields.pop("question", None) or DEFAULT_QUESTION
    fields["modalities"] = _form_list(fields.get("modalities"))
    stop = fields.get("stop")
    if isinstance(stop, str) and len(stop) > FORM_STOP_CHARS:  # as the schema says (empty parts count)
        raise APIError(422, f"stop: at most {FORM_STOP_CHARS} characters", "validation_error")
    fields["stop"] = _form_list(stop)
    fields = {k: v for k, v in fields.items() if v is not None}
    req = validate(GenerateRequest, fields)
    with query_file(upload, settings.max_upload_bytes, prefix="mm-ask-") as media:
        query = SearchQuery(media=media, k=req.k, modalities=req.modalities)
        hits = (await answer_http(query, embedder, collection)).hits
    return req, hits


FORM_STOP_CHARS = MAX_STOPS * (MAX_STOP_CHARS + 1)  # the form's comma-separated stop strings, raw

# The multipart form, with the bounds GenerateRequest enforces on the same fields (the form's text
# fields are validated as GenerateRequest): the schema says what the server takes.
FORM_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "additionalProperties": False,  # GenerateRequest forbids unknown fields
    "properties": {
        "file": {"type": "string", "format": "binary", "minLength": 1},
        "question": {
            "type": "string",
            "maxLength": MAX_QUERY_CHARS,
            "pattern": r"^$|\S",
            "description": f"empty or omitted: {DEFAULT_QUESTION!r}",
        },
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_GROUNDING_K},
        "modalities": {"type": "string", "pattern": MODALITIES_CSV, "description": "comma-separated"},
        "backend": {"type": "string", "enum": list(BACKENDS)},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stop": {
            "type": "string",
            "maxLength": FORM_STOP_CHARS,
            "description": f"comma-separated, at most {MAX_STOPS} of at most {MAX_STOP_CHARS} characters",
        },
    },
}


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
                "multipart/form-data": {"schema": FORM_SCHEMA},
            },
            "required": True,
        }
    },
)
async def generate(request: Request, collection: CollectionDep, embedder: EmbedderDep, settings: SettingsDep):
    """Answer a question (or describe an uploaded image/audio clip) from the closest items, citing them."""
    # a text query is embedded in the generation thread (and rewritten there, when asked)
    hits: list[Hit] | Callable[[], list[Hit] | Grounding]
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        req, hits = await _from_form(request, collection, embedder, settings)
    else:
        req = await parse_json(request, GenerateRequest)
        query = req.retrieval()
        hits = rewritten_hits(request.app, req.query, query, req.rewrite) or (
            lambda: search.answer(query, embedder, collection).hits
        )
    answer = await answer_request(request.app, req, hits)
    return await respond(answer, req.stream)
