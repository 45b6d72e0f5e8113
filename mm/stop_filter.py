"""Stop strings for streamed generation: hold back what could be the start of one, cut at the first."""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """Holds back text that could be the start of a stop string; cuts the stream at the first match."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in stop if s]
        self.keep = max((len(s) for s in self.stop), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to emit now ('' while undecided or after a stop)."""
        if self.stopped or not piece:
            return ""
        if not self.stop:
            return piece
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        cut = len(self.buffer) - self.keep
        if cut <= 0:
            return ""
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
