"""Retrieved items put into words: a phrase per item, the concept its caption names, the numbered list, the
chat prompt, and the answer that says nothing relevant was found."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from index.types import Hit

SYSTEM_PROMPT = (
    "You answer questions about a media collection. Use only the numbered items you are given and cite "
    "each item you use as [n]. If the items do not answer the question, say so briefly."
)


DECLINE = "I could not find anything about that in the collection."

# A caption's first clause names its concept: "Mercury—the planet closest to the Sun." -> "Mercury",
# "Knight. The only piece that can jump..." -> "Knight", "A dumper. It carries..." -> "A dumper".
_CLAUSE_END = re.compile(r"[.!?;:\u2014\u2013]|\s-\s|,")
_QUOTES = "\"'\u201c\u201d\u2018\u2019"


# Words that frame a question rather than say what it is about ("Which animal ...?" is about the animal):
# as search words they match captions that merely contain them ("Which way will you go?").
_FRAMING = """what which who whom whose where when why how is are was were be been do does did can could would
should will shall may might must the a an of in on at to for from by with and or but not no me my you your i
we us our it its this that these those there here have has had please show tell find give any some called
named"""
QUESTION_WORDS = frozenset(_FRAMING.split())
_WORDS = re.compile(r"[\w'-]+")


def retrieval_text(question: str) -> str:
    """The words of a question worth searching for (its framing words dropped); the question itself
    when nothing else is left ("Who is it?")."""
    words = [w for w in _WORDS.findall(question) if w.lower() not in QUESTION_WORDS]
    return " ".join(words) if words else question


def concept_of(hit: Hit) -> str:
    """The concept an item's caption names (its first clause, without end punctuation or quotes), else
    its file name's words; "" when it has neither."""
    text = " ".join((hit.item.caption or "").split())
    if not text and hit.item.uri:
        text = Path(hit.item.uri).stem.replace("_", " ").replace("-", " ")
    clause = _CLAUSE_END.split(text, maxsplit=1)[0] if text else ""
    return clause.strip().strip(_QUOTES).strip()


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
