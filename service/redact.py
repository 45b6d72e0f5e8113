"""Secrets kept out of the logs: API keys in query strings, auth headers and the configured keys.

Browsers can only send the WebSocket key in the URL (``/ws?api_key=KEY``), and uvicorn's access log
prints every URL with its query string; a traceback or an error message can also quote a header or a
key. :class:`RedactSecrets` rewrites a log record's message, arguments and traceback text before any
handler formats it: ``api_key=`` values (and ``access_token``/``token``), ``Authorization`` and
``X-API-Key`` header values, and every configured secret wherever it appears become ``[redacted]``.

:func:`install` puts one filter on the loggers that can see a request (uvicorn's and this project's)
and on every handler present (a handler filter also sees the records that propagate to it from child
loggers, which a logger filter does not); :func:`uninstall` takes it off again when the app stops.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "[redacted]"
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "service", "mm", "index", "httpx")
KEEP_ARGS = ("uvicorn.access",)  # its formatter reads the arguments (client, method, path, ...) one by one
MIN_SECRET_CHARS = 4  # shorter configured "secrets" would mask ordinary words in every line

_PATTERNS = (
    # query parameters: ?api_key=...&, also url-encoded names are left as they are (no such route)
    re.compile(r"(?i)([?&](?:api[_-]?key|access_token|token)=)[^&\s\"'#]*"),
    # header lines and dict/tuple reprs: Authorization: Bearer X, 'x-api-key': 'X', (b'authorization', b'X')
    re.compile(
        r"(?i)(\b(?:authorization|x-api-key)\b['\"]?\s*[:,=]\s*(?:b?['\"])?)(?:bearer\s+|basic\s+)?[^\s'\",)}]+"
    ),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with key-bearing query parameters, auth header values and ``secrets`` masked."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactSecrets(logging.Filter):
    """Masks secrets in a record in place (it never drops one); see :func:`redact`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # longest first, so a key that contains another is masked whole
        found = {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}
        self.secrets = sorted(found, key=len, reverse=True)

    def _clean(self, value: object) -> object:
        if isinstance(value, str):
            return redact(value, self.secrets)
        if isinstance(value, bytes):
            return redact(value.decode("utf-8", "replace"), self.secrets)
        if isinstance(value, int | float | bool) or value is None:
            return value
        text = str(value)
        cleaned = redact(text, self.secrets)
        return value if cleaned == text else cleaned

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        if record.args and record.name not in KEEP_ARGS:
            # a key split over the arguments ("< %s: %s" % ("x-api-key", KEY), as the websockets library
            # logs a handshake) shows only in the whole message: mask that, and log it as one string
            try:
                text = record.getMessage()
            except (TypeError, ValueError):  # a malformed call: logging reports it itself
                text = None
            if text is not None and (masked := redact(text, self.secrets)) != text:
                record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True  # masking twice (a logger's filter, then a handler's) changes nothing


def _targets() -> list[logging.Filterer]:
    loggers = [logging.getLogger(name) for name in LOGGERS]
    handlers = {h for lg in (logging.getLogger(), *loggers) for h in lg.handlers}
    return [*loggers, *handlers]


def install(secrets: Iterable[str] = ()) -> RedactSecrets:
    """Attach a :class:`RedactSecrets` for ``secrets`` to the request-facing loggers and all handlers."""
    flt = RedactSecrets(secrets)
    for target in _targets():
        target.addFilter(flt)
    return flt


def uninstall(flt: RedactSecrets) -> None:
    for target in _targets():
        target.removeFilter(flt)
