"""Request body size limit (413), enforced while the body is read, with the service's JSON error body.

A declared ``Content-Length`` over the limit is refused before any byte is read; a body without one
(chunked) is counted as it arrives and refused as soon as it passes the limit. Starlette's own limiter
answers in plain text, hence this middleware.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, error_body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        mb = self.max_bytes / (1 << 20)
        return APIError(413, f"request body is larger than the {mb:g} MB limit (MM_MAX_UPLOAD_MB)")

    async def _reply(self, send: Send, err: APIError) -> None:
        body = json.dumps(error_body(err.status_code, err.detail, err.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reply(send, self._error())
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # inside a route's body parsing this reaches the JSON handler
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except APIError as err:
            if started or err.status_code != 413:
                raise
            await self._reply(send, err)
