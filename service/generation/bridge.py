"""``iterate_in_thread``: a blocking iterator (a backend's pieces) driven from the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

_END = object()
FIRST_PIECE_WAIT_S = 0.1  # longest pause of the generation thread while its first piece is sent


async def iterate_in_thread(pieces: Iterator[str] | Callable[[], Iterator[str]]) -> AsyncGenerator[str, None]:
    """Drive a blocking iterator in its own thread; stopping early (a client gone) closes the iterator.

    ``pieces`` may be a function that makes the iterator: it then runs in that thread too (one thread
    hand-off less before the first piece) and its exceptions reach the consumer like the iterator's.
    The thread checks a cancel flag between pieces and closes the source itself (a generator cannot
    be closed from another thread while it runs), so a cancelled generation ends after the piece in
    progress. After the first piece the thread waits (at most ``FIRST_PIECE_WAIT_S``) until the
    consumer asks for the next one, i.e. has sent the first: otherwise the next decoding steps keep
    the GIL busy while the event loop tries to send it, and the first token reaches the client late.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()
    first_sent = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens any more
            cancel.set()

    def work() -> None:
        source: Iterator[str] | None = None
        try:
            source = pieces() if callable(pieces) else pieces
            for piece in source:
                if cancel.is_set():
                    break
                put(piece)
                if not first_sent.is_set():
                    first_sent.wait(FIRST_PIECE_WAIT_S)
                    first_sent.set()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            put(_END)

    threading.Thread(target=work, name="mm-generate", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            first_sent.set()  # the consumer is back for more: the piece has gone out
    finally:
        cancel.set()
        first_sent.set()
