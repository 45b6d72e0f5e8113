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

import asyncio
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
# A form's comma-separated modalities ("image, audio"; empty: all), as a schema pattern (anchored).
MODALITIES_CSV = r"^[\s,]*(?:(?:text|image|audio)\s*(?:,[\s,]*|$))*$"
BODY_IDLE_S = 30.0  # a request body that stops arriving for this long is answered 408 (a slow client)


class BodyTimeout(APIError):
    """A request body that stopped arriving before its declared end."""

    def __init__(self, seconds: float) -> None:
        message = f"the request body stopped arriving (nothing for {seconds:g} s)"
        # close: the rest of the body may still come, and the connection cannot carry another request
        super().__init__(408, message, "request_timeout", headers={"Connection": "close"})


def has_body(scope: Scope) -> bool:
    """Whether an HTTP request declares a body (a non-zero Content-Length, or chunked)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length" and value not in (b"0", b""):
            return True
        if name == b"transfer-encoding":
            return True
    return False


def idle_limited(receive: Receive, seconds: float) -> Receive:
    """``receive`` that raises :class:`BodyTimeout` when the next piece of the body takes longer than
    ``seconds``: a body shorter than its Content-Length would otherwise hold the request (and its
    connection) until the client gives up. Once the body is complete it waits as long as asked (a
    streamed answer listens for the client's disconnect that way)."""
    complete = False

    async def receive_limited() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout(seconds):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(seconds) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return receive_limited


async def reply(send: Send, err: APIError) -> None:
    """Send ``err`` as the service's JSON error answer (for code that runs outside the app's handlers)."""
    body = json.dumps(error_body(err.status_code, err.detail, err.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        mb = self.max_bytes / (1 << 20)
        return APIError(413, f"request body is larger than the {mb:g} MB limit (MM_MAX_UPLOAD_MB)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await reply(send, self._error())
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
            await reply(send, err)
