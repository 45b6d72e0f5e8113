"""The ``extractive`` backend: no model, a deterministic sentence naming each item with its citation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from service.generation.base import with_stop
from service.generation.prompts import describe
from service.generation.usage import Metered

if TYPE_CHECKING:
    from index.types import Hit


class ExtractiveGenerator:
    """No model: "The closest matches are a frog [1] (image), a croak [2] (audio) and ...", word by word."""

    name = "extractive"
    max_items = None

    def compose(self, question: str, hits: Sequence[Hit]) -> str:
        if not hits:
            return "Nothing in the collection matches this question."
        parts = [f"{describe(h)} [{i}] ({h.item.modality})" for i, h in enumerate(hits, 1)]
        if len(parts) == 1:
            return f"The closest match is {parts[0]}."
        return f"The closest matches are {', '.join(parts[:-1])} and {parts[-1]}."

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        words = self.compose(question, hits).split(" ")
        pieces = (w if i == 0 else " " + w for i, w in enumerate(words[:max_tokens]))
        # its tokens are words (max_tokens counts them); it reads no prompt
        return Metered(with_stop(pieces, stop), 0, lambda text: len(text.split()))
