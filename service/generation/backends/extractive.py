"""The ``extractive`` backend: no model; a short answer naming the concept the retrieved items agree on.

Retrieval hands over the closest items with their relevance (a search result's ``score``: calibrated to
P(relevant) by the model's ``calibration.json`` where the search path calibrates). The answer is grounded
by three rules, each a constant below, chosen on ``benchmarks/questions_dev.jsonl`` (never on the fixed
question set):

1. an item counts only when its relevance clears ``ITEM_MIN``;
2. items are grouped by the concept their caption names ("A frog." and a frog's sound "A frog." are one
   concept, "frog"); a concept's support is the noisy-OR of its items' relevance, so a picture, a sound
   and a note that agree count for more than one stray hit;
3. the best-supported concept is the answer when its support clears ``ANSWER_MIN`` and beats the
   runner-up by ``MARGIN`` (a wide gap between a confident concept and scattered weak hits); otherwise
   the answer says nothing relevant was found and cites nothing.

The answer names that concept and cites only its items (at most ``MAX_CITED``), numbered as the
citations the service returns (:meth:`ExtractiveGenerator.select` gives them, in that order): "A frog:
the collection has a picture [1] and a sound [2] of it."
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.generation.base import with_stop
from service.generation.prompts import DECLINE, concept_of
from service.generation.usage import Metered

if TYPE_CHECKING:
    from index.types import Hit

ITEM_MIN = 0.1  # relevance an item needs to count at all
ANSWER_MIN = 0.7  # support the answer's concept needs
MARGIN = 2.0  # ...and its lead over the next concept (support ratio)
MAX_CITED = 3  # items of the answer's concept cited

NOUN = {"image": "a picture", "audio": "a sound", "text": "a note"}


@dataclass(frozen=True)
class Rules:
    """The grounding rules' thresholds (module constants by default; the benchmark sweeps them)."""

    item_min: float = ITEM_MIN
    answer_min: float = ANSWER_MIN
    margin: float = MARGIN
    max_cited: int = MAX_CITED


def _score(hit: Hit) -> float:
    return float(hit.score)


def _key(concept: str) -> str:
    """The grouping key of a concept phrase: lower case, without a leading article ("A frog" -> "frog")."""
    words = re.sub(r"[^\w\s'-]", " ", concept.lower()).split()
    if len(words) > 1 and words[0] in ("a", "an", "the", "some"):
        words = words[1:]
    return " ".join(words)


class ExtractiveGenerator:
    """No model: the concept the relevant items agree on, cited by those items only, or "not found"."""

    name = "extractive"
    max_items = None

    def __init__(self, relevance: Callable[[Hit], float] | None = None, rules: Rules | None = None):
        self.relevance = relevance or _score  # a hit's P(relevant); default: its (calibrated) score
        self.rules = rules or Rules()

    def select(self, question: str, hits: Sequence[Hit]) -> list[Hit]:
        """The items the answer uses, in citation order ([1] first); empty when it declines."""
        r = self.rules
        groups: dict[str, list[tuple[float, Hit]]] = {}
        for h in hits:
            p = self.relevance(h)
            concept = concept_of(h)
            if p >= r.item_min and concept:
                groups.setdefault(_key(concept), []).append((p, h))
        if not groups:
            return []
        support = {}
        for key, members in groups.items():
            miss = 1.0
            for p, _ in members:
                miss *= 1.0 - min(max(p, 0.0), 1.0)
            support[key] = 1.0 - miss
        ranked = sorted(support, key=lambda k: support[k], reverse=True)
        best = ranked[0]
        runner_up = support[ranked[1]] if len(ranked) > 1 else 0.0
        if support[best] < r.answer_min or support[best] < r.margin * runner_up:
            return []
        members = sorted(groups[best], key=lambda m: m[0], reverse=True)
        return [h for _, h in members[: r.max_cited]]

    def compose(self, question: str, hits: Sequence[Hit]) -> str:
        """The answer over ``hits`` as :meth:`select` leaves them ([n] is the n-th item it keeps)."""
        used = self.select(question, hits)
        if not used:
            return DECLINE
        concept = concept_of(used[0])
        parts = [f"{NOUN.get(h.item.modality, 'an item')} [{i}]" for i, h in enumerate(used, 1)]
        if len(parts) == 1:
            what = parts[0].replace(" [1]", "") + " of it [1]"
        else:
            what = f"{', '.join(parts[:-1])} and {parts[-1]} of it"
        return f"{concept[0].upper()}{concept[1:]}: the collection has {what}."

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        words = self.compose(question, hits).split(" ")
        pieces = (w if i == 0 else " " + w for i, w in enumerate(words[:max_tokens]))
        # its tokens are words (max_tokens counts them); it reads no prompt
        return Metered(with_stop(pieces, stop), 0, lambda text: len(text.split()))
