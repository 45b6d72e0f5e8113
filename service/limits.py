"""Bounds on what one request may carry, and the body size limit (413) enforced while a body is read.

The constants are the API's documented limits (the schemas state them, so the OpenAPI schema says what
the server enforces): ids and offsets within SQLite's 64-bit INTEGER, a bounded number of tags (each
becomes one SQL clause; SQLite refuses an expression tree deeper than 1000), path names within what
the file system takes, and a length for every text a route reads.

A declared ``Content-Length`` over the limit is refused before any byte is read; a body without one
(chunked) is counted as it arrives and refused as soon as it passes the limit. Starlette's own limiter
answers in plain text, hence this middleware.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, error_body

INT64_MAX = 2**63 - 1  # SQLite INTEGER: a larger id or offset cannot even be bound to a query
MAX_TAGS = 64  # tags per filter or per item
MAX_TAG_CHARS = 200
MAX_QUERY_CHARS = 2000  # a search query or a question (the embedder sees its first tokens only)
MAX_TEXT_CHARS = 100_000  # a text item or a caption
MAX_MESSAGE_CHARS = 32_000  # one chat message (OpenAI route); the question is MAX_QUERY_CHARS of it
MAX_MESSAGES = 256  # messages of one chat request
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)


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
