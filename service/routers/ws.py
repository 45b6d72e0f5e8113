"""``WebSocket /ws``: search and streamed generation, several requests per connection.

Client messages (JSON text frames), each with a client-chosen ``id`` echoed in every answer::

    {"type": "search",   "id": "1", "query": "a frog", "k": 5, "modalities": ["image"]}
    {"type": "generate", "id": "2", "query": "what croaks?", "k": 3, "backend": "local",
     "max_tokens": 64, "temperature": 0, "stop": ["\\n"]}
    {"type": "cancel",   "id": "2"}

A search takes any ``POST /search`` body (``query``, ``item_id`` or ``vector``, ``k``, ``offset``,
``modalities``, ``filters``: :class:`service.schemas.WSSearch` is that ``SearchQuery``); a generation
takes ``POST /generate``'s fields but ``stream`` (:class:`service.schemas.WSGenerate`).

Server messages: ``results`` (``{"results": [...]}`` as ``POST /search``, with ``partial`` and
``missing_shards`` when the search set ``allow_partial``), ``token`` (``{"text"}``),
``citations`` (``{"citations": [...]}``), ``done`` (``{"backend"}``, or ``{"cancelled": true}``) and
``error`` (``{"code", "message", "status"}``). Every accepted request gets exactly one terminal
message: ``results`` (search), ``done`` (generate; ``cancelled: true`` when cancelled, whenever the
cancel arrived) or ``error``. A malformed message (an id that is not a string or a number included)
gets an ``error`` with ``id`` null when the id is unusable, and the connection stays open; a cancel of
an id that is not running is ignored. Requests run concurrently; when the client disconnects,
running generations are cancelled (their generators are closed). With ``MM_API_KEYS`` set, the key
goes in the query string (``/ws?api_key=KEY``, browsers cannot set headers here) or in
``Authorization``/``X-API-Key``; a wrong key closes the connection with code 1008 before it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from index.sharded import ShardUnavailable
from mm.errors import MediaError
from service.auth import bearer_token, key_matches
from service.generation import GeneratorUnavailable, answer_request
from service.generation.usecases import rewritten_hits
from service.schemas import WSCancel, WSGenerate, WSSearch
from service.search import answer_http

log = logging.getLogger(__name__)

router = APIRouter(tags=["websocket"])

MAX_MESSAGE = 64 * 1024  # bytes of one client message
MAX_RUNNING = 8  # concurrent requests per connection
# a message's ``type`` -> its model (service.schemas)
MESSAGES: dict[str, type[WSSearch] | type[WSGenerate] | type[WSCancel]] = {
    "search": WSSearch,
    "generate": WSGenerate,
    "cancel": WSCancel,
}


def _authorised(ws: WebSocket, keys: list[str]) -> bool:
    if not keys:
        return True
    bearer = bearer_token(ws.headers.get("authorization"))
    given = (ws.query_params.get("api_key"), ws.headers.get("x-api-key"), bearer)
    return any(key_matches(k, keys) for k in given)


class Connection:
    """One client: a reader loop plus one task per running request, sharing a send lock."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.app = ws.app
        self.tasks: dict[str | int, asyncio.Task] = {}
        self.notices: set[asyncio.Task] = set()  # "cancelled" messages being sent (see _finished)
        self.lock = asyncio.Lock()

    async def send(self, msg: dict[str, Any]) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(msg))

    async def error(self, rid: Any, code: str, message: str, status: int = 400) -> None:
        await self.send({"type": "error", "id": rid, "code": code, "message": message, "status": status})

    async def run(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                try:
                    await self.dispatch(raw)
                except Exception:  # one message must never end the connection or its other requests
                    log.exception("websocket message could not be dispatched")
                    await self._safe_error(None, "internal_error", "internal server error", 500)
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            if self.notices:
                await asyncio.gather(*self.notices, return_exceptions=True)

    async def dispatch(self, raw: str | bytes | None) -> None:
        if raw is None or len(raw) > MAX_MESSAGE:
            return await self.error(
                None, "bad_message", f"send JSON text messages of at most {MAX_MESSAGE} bytes"
            )
        try:
            msg = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return await self.error(None, "bad_message", "messages must be JSON objects")
        if not isinstance(msg, dict):
            return await self.error(None, "bad_message", "messages must be JSON objects")
        kind = msg.get("type")
        rid = msg.get("id")
        if not isinstance(rid, str | int | None) or isinstance(rid, bool):
            rid = None  # not echoed: it could not name a request
        if not isinstance(kind, str) or kind not in MESSAGES:  # a list or an object is not hashable
            return await self.error(rid, "bad_message", "type must be 'search', 'generate' or 'cancel'")
        try:
            req = MESSAGES[kind].model_validate(msg)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            return await self.error(rid, "validation_error", f"{where}: {err['msg']}", 422)
        if isinstance(req, WSCancel):
            task = self.tasks.get(req.id)
            if task is not None:
                task.cancel()  # _finished answers "cancelled", even if the task never got to run
            return None
        if req.id in self.tasks:
            return await self.error(rid, "bad_message", f"request id {req.id!r} is still running")
        if len(self.tasks) >= MAX_RUNNING:
            return await self.error(
                rid, "too_many_requests", f"at most {MAX_RUNNING} requests at a time", 429
            )
        task = asyncio.create_task(self.handle(req))
        self.tasks[req.id] = task
        task.add_done_callback(functools.partial(self._finished, req.id))
        return None

    def _finished(self, rid: str | int, task: asyncio.Task) -> None:
        """A request's task ended. A cancelled one is answered here, not in :meth:`handle`: a task
        cancelled before its first step never runs its body (a cancel sent in the same write as its
        request lands there), so only this callback sees every cancellation."""
        if self.tasks.get(rid) is task:
            del self.tasks[rid]
        if task.cancelled():
            notice = asyncio.get_running_loop().create_task(
                self._safe_send({"type": "done", "id": rid, "cancelled": True})
            )
            self.notices.add(notice)
            notice.add_done_callback(self.notices.discard)

    async def handle(self, req: WSSearch | WSGenerate) -> None:
        rid = req.id
        try:
            coll, emb = self.app.state.collection, self.app.state.embedder
            if isinstance(req, WSSearch):
                found = await answer_http(req, emb, coll)
                results = {"type": "results", "id": rid, "results": found.results()}
                return await self.send(results | found.partial_fields())
            query = req.retrieval()
            hits = (
                rewritten_hits(self.app, req.query, query, req.rewrite)
                or (await answer_http(query, emb, coll)).hits
            )
            answer = await answer_request(self.app, req, hits)
            stream = answer.rest()
            try:
                async for piece in stream:
                    await self.send({"type": "token", "id": rid, "text": piece})
            finally:
                await stream.aclose()
            cites = [c.model_dump() for c in answer.citations]
            await self.send({"type": "citations", "id": rid, "citations": cites})
            await self.send({"type": "done", "id": rid, **answer.done_fields()})
        except HTTPException as exc:
            await self._safe_error(rid, getattr(exc, "code", "error"), str(exc.detail), exc.status_code)
        except GeneratorUnavailable as exc:
            await self._safe_error(rid, "generator_unavailable", str(exc), 503)
        except ShardUnavailable as exc:  # its message names the shards
            await self._safe_error(rid, "shard_unavailable", str(exc), 503)
        except MediaError as exc:
            await self._safe_error(rid, "invalid_media", str(exc), 422)
        except Exception:
            log.exception("websocket request %r failed", rid)
            await self._safe_error(rid, "internal_error", "internal server error", 500)

    async def _safe_send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # the client is gone
            await self.send(msg)

    async def _safe_error(self, rid: Any, code: str, message: str, status: int) -> None:
        await self._safe_send(
            {"type": "error", "id": rid, "code": code, "message": message, "status": status}
        )


@router.websocket("/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    if not _authorised(ws, ws.app.state.settings.api_keys):
        await ws.close(code=1008, reason="a valid API key is required (?api_key=KEY)")
        return
    await ws.accept()
    await Connection(ws).run()
