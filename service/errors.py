"""HTTP errors: every error answer is JSON ``{"error": {"code": ..., "message": ...}}``.

``code`` is a short stable slug (``not_found``, ``unauthorized``, ``payload_too_large``,
``unsupported_media``, ``invalid_media``, ``forbidden``, ``validation_error``, ...). Validation errors
(422) also carry ``"details"``: FastAPI's list of field errors. A shard of a sharded collection that
failed or missed the deadline answers 503 ``shard_unavailable`` with ``"shards"``: shard number -> why.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mm.errors import MediaError

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media",
    416: "range_not_satisfiable",
    422: "validation_error",
    500: "internal_error",
    503: "unavailable",
}

MEDIA_STATUS = {"unsupported": 415, "corrupt": 422, "empty": 422, "too_large": 413}


class APIError(StarletteHTTPException):
    """An HTTP error with a stable ``code`` slug; raise it from routes and dependencies."""

    def __init__(self, status_code: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code or _CODES.get(status_code, "error")


def media_error(exc: MediaError) -> APIError:
    """Map a ``MediaError`` to 415 (unsupported), 422 (corrupt, empty) or 413 (too large)."""
    kind = getattr(exc, "kind", "corrupt")
    status = MEDIA_STATUS.get(kind, 422)
    code = {415: "unsupported_media", 413: "payload_too_large"}.get(status, "invalid_media")
    return APIError(status, str(exc), code=code)


def error_body(status: int, message: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code or _CODES.get(status, "error"), "message": message, **extra}}


def shard_unavailable(exc: Any) -> JSONResponse:
    """503 for an ``index.sharded.ShardUnavailable``: its message and the shards it names, with why."""
    shards = {str(s): why for s, why in sorted(exc.shards.items())}
    return JSONResponse(error_body(503, str(exc), "shard_unavailable", shards=shards), 503)


PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this path (Starlette's 405 names only the first route's).

    Each method is asked of the router's own matching (routes may be nested in included routers)."""
    from starlette.routing import Match

    scope = {k: v for k, v in request.scope.items() if k not in ("endpoint", "route", "path_params")}
    methods = {"OPTIONS"}
    for method in PROBED_METHODS:
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            methods.add(method)
    return ", ".join(sorted(methods))


class InternalErrorMiddleware:
    """A 500 that keeps the connection: an unexpected error before the answer started is logged and
    answered here. Starlette's outermost error middleware would answer it too, but then re-raise it, and
    the server drops the connection (the client's next request on it is reset)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except StarletteHTTPException:  # an answer meant for the handlers around (413, 408)
            raise
        except Exception:
            if started:  # part of an answer is out: only closing the connection can tell the client
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            body = json.dumps(error_body(500, "internal server error")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
            if request.method == "OPTIONS":  # a plain OPTIONS (CORS preflights never get here): the answer
                return Response(status_code=204, headers=headers)
        code = getattr(exc, "code", None)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message, code), exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
        first = details[0] if details else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid")
        return JSONResponse(error_body(422, message, "validation_error", details=details), 422)

    @app.exception_handler(MediaError)
    async def _media(request: Request, exc: MediaError) -> JSONResponse:
        err = media_error(exc)
        return JSONResponse(error_body(err.status_code, err.detail, err.code), err.status_code)

    from index.sharded import ShardUnavailable

    @app.exception_handler(ShardUnavailable)
    async def _shard(request: Request, exc: ShardUnavailable) -> JSONResponse:
        return shard_unavailable(exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error"), 500)
