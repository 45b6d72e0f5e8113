"""A real uvicorn server in a thread of the test process, and a capture of every log line it writes.

The access log is uvicorn's, not the app's: only a real server writes it, so tests that scan the logs for
secrets run against this rather than ``TestClient``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "service", "index", "mm", "fastapi")
CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client")  # the test's own clients, not the server


class LineCapture(logging.Handler):
    """Every record, rendered as the usual formatters would (message, arguments and traceback)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(CLIENT_LOGGERS):
            self.lines.append(self.format(record))


@contextmanager
def captured_logs() -> Iterator[LineCapture]:
    """Attach one capture to the root and to the loggers uvicorn does not propagate, at DEBUG."""
    handler = LineCapture()
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.DEBUG)
        if name in ("", "uvicorn.access", "uvicorn.error"):
            logger.addHandler(handler)
            logger.propagate = name == ""  # one copy of each line
    try:
        yield handler
    finally:
        for logger, level, propagate in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.removeHandler(handler)


@contextmanager
def live_server(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 with the access log on; yields ``http://host:port``."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=True, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
