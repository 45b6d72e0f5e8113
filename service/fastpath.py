"""``SearchFastPath``: ``POST /search`` answered in front of the framework, everything else left to it.

Over a real socket, the layers a request passes before and after the route (Starlette's error and
exception middleware, FastAPI's telemetry and body-limit wrappers, our metrics and body-limit
middleware, route matching, the route handler) run cold between requests: a no-op route measured
~0.4 ms slower than a bare ASGI answer over loopback, against ~0.1 ms for the same layers called back
to back in process. Answering ``/search`` here took its HTTP p50 from 1.41 to 1.22 ms (5,000 vectors,
alternating servers, 6 rounds).

It answers a ``POST /search`` that declares a Content-Length within ``MM_MAX_UPLOAD_MB`` and carries a
valid API key when keys are set, on an app without CORS origins and without OpenTelemetry configured:
it reads the body, validates it as a :class:`~service.schemas.SearchRequest` and answers it as the route
does (:func:`service.search.answer_async`), then records the request in the latency histogram as
:class:`service.metrics.MetricsMiddleware` does.

Everything else goes to the full app untouched: other requests, requests it does not take (no
Content-Length or a chunked body, too large, a missing or wrong key: the app answers 413 / 401, and
middleware added to the app after ``create_app``), and every request that fails here. A failed request
(including a body that grows past the limit, or a client that goes away while it is read) is handed
over with the messages read so far replayed, so its answer (422, 404, 413, a 500 with its log line) and
its metrics come from the app's own handlers, exactly as without the fast path; the price is that such
a request is validated twice (and a text query that fails after being embedded is embedded twice).
``MM_FAST_SEARCH=false`` turns it off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette._utils import get_route_path
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from index.sharded import ShardUnavailable
from service.auth import bearer_token, key_matches
from service.body import validate
from service.errors import shard_unavailable
from service.metrics import STARTED_KEY
from service.responses import FastJSONResponse
from service.schemas import SearchRequest
from service.search import answer_async

if TYPE_CHECKING:
    from fastapi import FastAPI

PATH = "/search"
ASGICall = Callable[[Scope, Receive, Send], Awaitable[None]]


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` (already read) again, then defers to ``receive``."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The messages read and the whole body; the body is None when the client went away first or the
    body grew past ``limit`` bytes (reading stops there)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > limit:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


class SearchFastPath:
    def __init__(self, app: FastAPI) -> None:
        settings = app.state.settings
        self.app = app
        self.enabled = settings.fast_search and not settings.cors_origins
        self.keys = list(settings.api_keys)
        self.max_bytes = settings.max_upload_bytes
        # middleware added after create_app (an OpenTelemetry instrumentor, say) must see every request
        self.middleware = len(app.user_middleware)

    def handles(self, scope: Scope) -> bool:
        """Whether ``scope`` is a request this fast path looks at (it may still hand it over)."""
        if not self.enabled or scope["type"] != "http" or scope["method"] != "POST":
            return False
        path = get_route_path(scope) if scope.get("root_path") else scope["path"]  # mounted: prefix off
        return path == PATH and len(self.app.user_middleware) == self.middleware

    def _keyed(self, authorization: str | None, header_key: str | None) -> bool:
        """A valid key as ``Authorization: Bearer`` or ``X-API-Key``, read as service.auth reads them."""
        return key_matches(bearer_token(authorization), self.keys) or key_matches(header_key, self.keys)

    def _admits(self, scope: Scope) -> bool:
        """A Content-Length within the limit, a valid key when keys are set, and no telemetry to feed."""
        length = bearer = header_key = None
        for name, value in scope["headers"]:
            if name == b"content-length":  # the last one, as service.limits reads it
                length = value
            elif name == b"transfer-encoding":
                return False  # chunked: the app reads it, counting against the limit as it arrives
            elif name == b"authorization" and bearer is None:  # the first, as Starlette's headers.get
                bearer = value.decode("latin-1")
            elif name == b"x-api-key" and header_key is None:
                header_key = value.decode("latin-1")
        if length is None or not length.isdigit() or int(length) > self.max_bytes:
            return False
        if self.keys and not self._keyed(bearer, header_key):
            return False
        telemetry = getattr(self.app, "_native_telemetry", None)  # FastAPI's OpenTelemetry spans
        return telemetry is None or not telemetry.enabled()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, full: ASGICall) -> None:
        """Answer the request, or hand it to ``full`` (the app without the fast path)."""
        t0 = time.perf_counter()
        if not self._admits(scope):
            await full(scope, receive, send)
            return
        messages, body = await _read_body(receive, self.max_bytes)
        response: Response | None = None
        if body is not None:
            with contextlib.suppress(Exception):  # the app answers every failure itself (module docstring)
                state = self.app.state
                try:
                    query = validate(SearchRequest, body)
                    found = await answer_async(query, state.embedder, state.collection)
                    response = FastJSONResponse(found.to_dict())
                except ShardUnavailable as exc:  # answered here: the app would wait out the deadline again
                    response = shard_unavailable(exc)
        if response is None:  # a failure, a body past the limit or a client gone: the app's own answer
            scope[STARTED_KEY] = t0  # its latency histogram counts the time spent here too
            await full(scope, _replay(messages, receive), send)
            return
        try:
            await response(scope, receive, send)
        finally:
            self.app.state.metrics.observe("POST", PATH, response.status_code, time.perf_counter() - t0)
