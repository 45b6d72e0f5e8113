"""OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /v1/models``, grounded in retrieval.

The last user message is the retrieval query and the question. ``model`` names a backend
(``extractive``, ``local``, ``openai``, ``gguf``) or ``mm`` for the server's default. The cited items
are in the extension field ``mm_citations`` of the response (and of the final stream chunk). Optional
extension request fields: ``mm_k`` (items retrieved, default 5) and ``mm_modalities``. Unknown OpenAI
fields (``n``, ``presence_penalty``, ...) are accepted and ignored. ``GET /v1/models`` lists the
backends that are set up (an LM checkpoint, an endpoint, llama-cpp-python with a GGUF file or the packaged
model of the ``llm`` extra). ``usage`` holds the backend's own token counts (the local LM's prompt as it
read it, prefix vectors included; the extractive backend's words), in the answer and in the last stream
chunk; a backend that cannot count (the upstream ``openai`` and ``gguf`` ones) gives none. See docs/api.md.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.deps import CollectionDep, EmbedderDep, SettingsDep
from service.errors import APIError
from service.generation import Answer, GeneratorUnavailable, start_answer
from service.generation.prompts import retrieval_text
from service.generation.usecases import rewritten_hits
from service.limits import MAX_QUERY_CHARS
from service.schemas import DEFAULT_CHAT_MODEL, ChatRequest, ContentPart, SearchQuery, error_responses
from service.search import answer_http
from service.settings import BACKENDS, Settings

router = APIRouter(prefix="/v1", tags=["openai"])


def _text(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p.text or "" for p in content if p.type == "text").strip()
    return (content or "").strip()


def _backend(model: str) -> str | None:
    if model in BACKENDS:
        return model
    if model in (DEFAULT_CHAT_MODEL, ""):
        return None
    raise APIError(
        404, f"model {model!r} not found; GET /v1/models lists: mm, {', '.join(BACKENDS)}", "not_found"
    )


def set_up(settings: Settings) -> list[str]:
    """The backends that can answer as configured (checked without loading any model)."""
    from mm import gemma
    from mm.lm import WEIGHTS_FILE
    from service.generation.backends.local import DEFAULT_LM_PATH

    lm = Path(settings.lm_path or DEFAULT_LM_PATH)
    ready = {
        "extractive": True,
        "local": lm.suffix == ".json" and lm.is_file() or (lm / WEIGHTS_FILE).is_file(),
        "openai": bool(settings.openai_base_url),
        # MM_GGUF_PATH's file, else the packaged Gemma of the `llm` extra (mm.gemma; found, not read)
        "gguf": importlib.util.find_spec("llama_cpp") is not None
        and (Path(settings.gguf_path).is_file() if settings.gguf_path is not None else gemma.installed()),
    }
    return [name for name in BACKENDS if ready[name]]


@router.get("/models")
async def list_models(settings: SettingsDep) -> JSONResponse:
    """The backends that are set up, as OpenAI model objects (``mm`` = the server's default backend)."""
    names = (DEFAULT_CHAT_MODEL, *set_up(settings))
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "mm"} for m in names]
    return JSONResponse({"object": "list", "data": data})


@router.post(
    "/chat/completions",
    responses={
        **error_responses(401, 404, 422, 503),
        200: {
            "content": {"text/event-stream": {}},
            "description": "a completion, or chunks when stream=true",
        },
    },
)
async def chat_completions(
    req: ChatRequest, request: Request, collection: CollectionDep, embedder: EmbedderDep
):
    """Chat completion whose answer is grounded in the items retrieved for the last user message."""
    backend = _backend(req.model)
    # the last user message with text (one holding only an image, say, is skipped), as the schema says
    users = [text for m in req.messages if m.role == "user" and (text := _text(m.content))]
    # bounded as /generate's query: 64 parts of a message add up to 2 MB, which a backend would scan whole
    question = users[-1][:MAX_QUERY_CHARS].strip() if users else ""
    if not question:
        raise APIError(
            422, "messages need a user message with text: it is the retrieval query", "validation_error"
        )
    # the question's content words are the retrieval query, as for POST /generate
    # (GenerateParams.retrieval)
    text = retrieval_text(question)
    query = SearchQuery(query=text, k=req.mm_k, modalities=req.mm_modalities)
    # MM_REWRITE: the name of the thing asked for is searched (service.generation.rewrite)
    hits = (
        rewritten_hits(request.app, question, query, None)
        or (await answer_http(query, embedder, collection)).hits
    )
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    answer = await start_answer(
        request.app,
        question,
        hits,
        backend=backend,
        max_tokens=req.max_completion_tokens or req.max_tokens or 256,
        temperature=req.temperature or 0.0,
        stop=stop,
    )
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    model = req.model or DEFAULT_CHAT_MODEL
    if req.stream:
        return StreamingResponse(
            _chunks(answer, cid, created, model),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        text = "".join([p async for p in answer.rest()])
    except GeneratorUnavailable as exc:
        raise APIError(503, str(exc), "generator_unavailable") from exc
    body = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "system_fingerprint": answer.backend,
        "mm_citations": [c.model_dump() for c in answer.citations],
    }
    usage = answer.usage()
    if usage is not None:  # the backend's own counts; a backend that cannot count reports none
        body["usage"] = usage.to_dict()
    return JSONResponse(body)


async def _chunks(answer: Answer, cid: str, created: int, model: str) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": answer.backend,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    stream = answer.rest()
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in stream:
            yield chunk({"content": piece})
        usage = answer.usage()
        counts = {"usage": usage.to_dict()} if usage is not None else {}
        yield chunk({}, "stop", mm_citations=[c.model_dump() for c in answer.citations], **counts)
    except GeneratorUnavailable as exc:
        err = {"error": {"code": "generator_unavailable", "message": str(exc)}}
        yield f"data: {json.dumps(err)}\n\n"
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"
