"""Token counts of one answer (OpenAI's ``usage``), counted by the backend that makes the answer.

A backend that can count returns its pieces wrapped in :class:`Metered`: the prompt's tokens are known
when it starts (what the model really reads, after any truncation), the completion's are counted in
its own units from the text its pieces made. A backend that cannot count (an upstream endpoint that
does not report usage) returns plain pieces, and the answer then has no usage rather than an invented
one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {**self._asdict(), "total_tokens": self.total_tokens}


class Metered:
    """``pieces`` passed through unchanged; ``count`` gives the tokens of the text they made so far."""

    def __init__(self, pieces: Iterator[str], prompt_tokens: int, count: Callable[[str], int]) -> None:
        self._pieces = pieces
        self._count = count
        self._text: list[str] = []  # counted whole: a piece may end inside a token (a word, a character)
        self.prompt_tokens = prompt_tokens

    def __iter__(self) -> Metered:
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self._text.append(piece)
        return piece

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self._count("".join(self._text)))


def usage_of(pieces: Any) -> Usage | None:
    """The counts of a backend's pieces, when the backend counted them."""
    return pieces.usage if isinstance(pieces, Metered) else None
