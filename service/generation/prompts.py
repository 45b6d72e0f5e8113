"""Retrieved items put into words for a model: a phrase per item, the numbered list, the chat prompt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from index.types import Hit

SYSTEM_PROMPT = (
    "You answer questions about a media collection. Use only the numbered items you are given and cite "
    "each item you use as [n]. If the items do not answer the question, say so briefly."
)


def describe(hit: Hit) -> str:
    """A short noun phrase for an item: its caption without the final period, else its file name."""
    text = " ".join((hit.item.caption or "").split())
    if not text and hit.item.uri:
        text = Path(hit.item.uri).stem.replace("_", " ")
    if not text:
        return f"item {hit.id}"
    if len(text) > 80:
        text = text[:77].rsplit(" ", 1)[0] + "..."
    text = text.rstrip(".")
    return text[0].lower() + text[1:] if text[:2].istitle() or len(text) == 1 else text


def numbered_items(hits: Sequence[Hit]) -> str:
    return "\n".join(
        f"[{i}] ({h.item.modality}, score {h.score:.2f}) {describe(h)}" for i, h in enumerate(hits, 1)
    )


def chat_messages(question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
    items = numbered_items(hits) or "(no items were found)"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Items:\n{items}\n\nQuestion: {question}"},
    ]
