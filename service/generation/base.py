"""What every generator backend shares: the protocol, the "cannot answer now" error, parameter checks
and the stop-string filter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from index.types import Hit


class GeneratorUnavailable(RuntimeError):
    """A backend cannot answer now (not installed, model missing, endpoint down): HTTP 503."""

    def __init__(self, backend: str, message: str):
        super().__init__(f"{backend} backend unavailable: {message}")
        self.backend = backend


class Generator(Protocol):
    name: str

    @property
    def max_items(self) -> int | None:  # how many retrieved items it can use; None = all
        ...

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]: ...


def check_params(max_tokens: int, temperature: float, stop: Sequence[str] | None) -> list[str]:
    if not 1 <= max_tokens <= 4096:
        raise ValueError(f"max_tokens must be between 1 and 4096, got {max_tokens}")
    if not 0.0 <= temperature <= 2.0:
        raise ValueError(f"temperature must be between 0 and 2, got {temperature}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop must be at most 4 non-empty strings")
    return stops


def with_stop(pieces: Iterable[str], stop: Sequence[str]) -> Iterator[str]:
    """Cut a stream of pieces at the first stop string (not emitted); closes the source when stopped."""
    from mm.stop_filter import StopFilter

    f = StopFilter(stop)
    source = iter(pieces)
    try:
        for piece in source:
            out = f.push(piece)
            if out:
                yield out
            if f.stopped:
                return
        tail = f.flush()
        if tail:
            yield tail
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
