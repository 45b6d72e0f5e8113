"""The ``extractive`` backend: no model; a short answer naming the concept the retrieved items agree on.

Retrieval hands over the closest items with their relevance: a search result's ``score``, which the
search path calibrates to P(relevant) with the model's ``calibration.json`` (``mm.calibration``; word
matches fused in as independent evidence, ``service.ranking``). Decisions read only that probability and
the question's own words, never a raw cosine, so they mean the same thing for every calibrated model:

1. an item counts only when its relevance clears ``item_min``;
2. items are grouped by the concept their caption names ("A frog." and a frog's sound "A frog." are one
   concept, "frog"); a concept's support is the noisy-OR of its items' relevance, so a picture, a sound
   and a note that agree count for more than one stray hit;
3. lexical evidence: when the question itself names every word of the concept ("Is there a sound of a
   goat?" names "goat"), that counts as one more piece of evidence worth ``named`` in the noisy-OR;
4. a wh-question ("What bird crows at dawn on a farm?") asks for something it describes, not for what
   it names: a concept that shares a content word with it ("a farm") is not its answer. A request
   ("Show me a dolphin.", "Is there a sound of a goat?", a bare phrase) asks for what it names. On the
   dev questions every wrong answer of the tuned rules was such a named concept;
5. the best-supported concept is the answer when its support clears ``answer_min`` and beats the
   runner-up by ``margin`` (a ratio); otherwise the answer says nothing relevant was found and cites
   nothing.

Hits that are the thing a question rewrite named (``service.generation.rewrite``: their concept is that
name, so the words already agree) may have a floor of their own, ``rewritten_min``, for both the item and
the support (:meth:`Rules.for_rewritten`); without it they meet the rules above.

The answer names that concept and cites only its items (at most ``max_cited``), numbered as the
citations the service returns (:meth:`ExtractiveGenerator.select` gives them, in that order): "A frog:
the collection has a picture [1] and a sound [2] of it."

The thresholds (:class:`Rules`) are tuned per model on ``benchmarks/questions_dev.jsonl`` (never on the
fixed question set) by ``python benchmarks/bench_generate.py --tune``, which writes them beside the
checkpoint as ``answer_rules.json`` together with a fingerprint of the calibration they were tuned with.
:func:`load_rules` checks the file on load and warns when the model's calibration has changed since (a
retrained default): the rules stay on the probability scale, so they still apply, but were not tuned for
it. Without a file the module's constants hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm.atomic import atomic_write_text
from service.generation.base import with_stop
from service.generation.prompts import DECLINE, QUESTION_WORDS, concept_of
from service.generation.usage import Metered

if TYPE_CHECKING:
    from index.types import Hit
    from mm.calibration import Calibration

log = logging.getLogger(__name__)

RULES_FILE = "answer_rules.json"  # beside the checkpoint (and its calibration.json)
RULES_VERSION = 1
TUNE_COMMAND = "python benchmarks/bench_generate.py --tune --no-latency"

# The defaults: tuned on the dev questions for the default model shipped with this file (see
# docs/results.md, "Grounded answers"); a checkpoint's answer_rules.json overrides them.
ITEM_MIN = 0.5  # relevance an item needs to count at all
ANSWER_MIN = 0.7  # support the answer's concept needs
MARGIN = 1.0  # ...and its lead over the next concept (support ratio)
NAMED = 0.3  # the evidence of a question naming the concept's words (a probability)
MAX_CITED = 3  # items of the answer's concept cited

NOUN = {"image": "a picture", "audio": "a sound", "text": "a note"}
WORD = re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class Rules:
    """The grounding rules' thresholds, on the calibrated (probability) scale.

    ``calibration`` fingerprints the calibration they were tuned with (:func:`fingerprint`; "" when they
    were not tuned for a model); ``tuned_on`` says on what, for the record.
    """

    item_min: float = ITEM_MIN
    answer_min: float = ANSWER_MIN
    margin: float = MARGIN
    named: float = NAMED
    max_cited: int = MAX_CITED
    calibration: str = ""
    tuned_on: str = ""
    # the item and support floor for hits that are the thing a question rewrite named (their concept is that
    # name: the words already agree; service.generation.rewrite); None: item_min and answer_min as above
    rewritten_min: float | None = None

    def for_rewritten(self) -> Rules:
        """The rules for hits grounded in a rewrite's name (:attr:`rewritten_min`, when set)."""
        if self.rewritten_min is None:
            return self
        floor = self.rewritten_min
        return replace(self, item_min=floor, answer_min=min(self.answer_min, floor), rewritten_min=None)

    def to_dict(self) -> dict[str, Any]:
        return {"version": RULES_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> Rules:
        """Rules from a file's content; ValueError says what is wrong (the file is never half-read)."""
        if not isinstance(data, dict):
            raise ValueError("answer rules must be a JSON object")
        if data.get("version") != RULES_VERSION:
            raise ValueError(f"answer rules version {data.get('version')!r} is not {RULES_VERSION}: re-tune")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise ValueError(f"answer rules have unknown fields {unknown}")
        values: dict[str, Any] = {}
        for name in ("item_min", "answer_min", "named"):
            values[name] = _number(data, name, 0.0, 1.0)
        if data.get("rewritten_min") is not None:
            values["rewritten_min"] = _number(data, "rewritten_min", 0.0, 1.0)
        values["margin"] = _number(data, "margin", 0.0, 100.0)
        cited = data.get("max_cited", MAX_CITED)
        if not isinstance(cited, int) or isinstance(cited, bool) or not 1 <= cited <= 20:
            raise ValueError(f"answer rules: max_cited must be an integer in 1..20, got {cited!r}")
        values["max_cited"] = cited
        for name in ("calibration", "tuned_on"):
            if not isinstance(data.get(name, ""), str):
                raise ValueError(f"answer rules: {name} must be a string")
            values[name] = data.get(name, "")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _number(data: dict[str, Any], name: str, lo: float, hi: float) -> float:
    value = data.get(name, getattr(Rules, name))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"answer rules: {name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"answer rules: {name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def fingerprint(calibration: Calibration | None) -> str:
    """A short digest of a fitted calibration's score maps (what a score means; not its no-match
    threshold, which the rules do not read); "" for none or an unfitted one."""
    if calibration is None or not calibration.fitted:
        return ""
    maps = {k: v for k, v in calibration.to_dict().items() if k not in ("threshold", "split")}
    text = json.dumps(maps, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_rules(directory: str | Path | None, calibration: Calibration | None = None) -> Rules:
    """The rules stored in a checkpoint directory (``answer_rules.json``), checked; the defaults without.

    Raises ValueError for a file that is not valid rules. Warns (once per load) when the rules were tuned
    with another calibration than ``calibration`` (the model was retrained or recalibrated since), and
    when the model has no fitted calibration at all (scores are then raw cosines, not probabilities).
    """
    path = Path(directory) / RULES_FILE if directory is not None else None
    if path is None or not path.is_file():
        rules = Rules()
    else:
        try:
            rules = Rules.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    current = fingerprint(calibration)
    if calibration is not None and not current:
        log.warning("the model has no fitted calibration: extractive answers read raw scores as P(relevant)")
    elif path is not None and current and rules.calibration != current:
        where = path if path.is_file() else f"{path} (missing; using the defaults)"
        log.warning(
            "extractive answer rules %s were tuned for another calibration (%s, the model's is %s): "
            "re-tune them on the dev questions with `%s`",
            where,
            rules.calibration or "none",
            current,
            TUNE_COMMAND,
        )
    return rules


def _score(hit: Hit) -> float:
    return float(hit.score)


def concept_key(concept: str) -> str:
    """The grouping key of a concept phrase: lower case, without a leading article ("A frog" -> "frog")."""
    words = re.sub(r"[^\w\s'-]", " ", concept.lower()).split()
    if len(words) > 1 and words[0] in ("a", "an", "the", "some"):
        words = words[1:]
    return " ".join(words)


def word_forms(word: str) -> set[str]:
    """A word and its forms without a plural ending ("horses": horse; "boxes": box), for matching."""
    w = word.lower()
    forms = {w}
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        forms.add(w[:-1])
        if len(w) > 4 and w.endswith("es"):
            forms.add(w[:-2])
    return forms


def content_words(text: str) -> set[str]:
    """A text's words that say what it is about, each with its singular forms (framing words such as
    "which", "is", "a" dropped)."""
    return {f for w in WORD.findall(text) if w.lower() not in QUESTION_WORDS for f in word_forms(w)}


WH_WORDS = frozenset(["what", "which", "who", "whom", "whose", "where", "when", "why", "how"])


# "What is the ocean like?", "What does a frog sound like?": "like" after these asks what a thing is like
_BE = frozenset(["is", "are", "was", "were", "be", "'s"])
_SENSES = frozenset(
    [
        "sound",
        "sounds",
        "look",
        "looks",
        "feel",
        "feels",
        "taste",
        "tastes",
        "smell",
        "smells",
        "seem",
        "seems",
    ]
)


def asks_for_unnamed(question: str) -> bool:
    """Whether a question is a wh-question (its first word is what/which/who/...): its answer is a thing
    it describes, so a concept it names is not the answer. One that ends in "like" after a form of "be"
    or a sense ("What is the ocean like?", "What does a frog sound like?") asks about the thing it names,
    not for another; "What fruit do monkeys like?" asks for another."""
    words = [w.lower() for w in WORD.findall(question)]
    if not words or words[0] not in WH_WORDS:
        return False
    about_the_named = words[-1] == "like" and len(words) > 2 and (words[-2] in _SENSES or words[1] in _BE)
    return not about_the_named


def shares_a_word(question_words: set[str], key: str) -> bool:
    """Whether a concept key has any content word the question (its :func:`content_words`) has."""
    return any(word_forms(w) & question_words for w in WORD.findall(key) if w.lower() not in QUESTION_WORDS)


def names(question_words: set[str], key: str) -> bool:
    """Whether a question (its :func:`content_words`) names every content word of a concept key."""
    words = [w for w in WORD.findall(key) if w.lower() not in QUESTION_WORDS]
    return bool(words) and all(word_forms(w) & question_words for w in words)


class ExtractiveGenerator:
    """No model: the concept the relevant items agree on, cited by those items only, or "not found"."""

    name = "extractive"
    max_items = None

    def __init__(self, relevance: Callable[[Hit], float] | None = None, rules: Rules | None = None):
        self.relevance = relevance or _score  # a hit's P(relevant); default: its (calibrated) score
        self.rules = rules or Rules()

    def for_rewritten(self) -> ExtractiveGenerator:
        """This backend with :meth:`Rules.for_rewritten` (itself when the rules set no floor of their own)."""
        rules = self.rules.for_rewritten()
        return self if rules is self.rules else ExtractiveGenerator(self.relevance, rules)

    def support(self, question: str, hits: Sequence[Hit]) -> list[tuple[str, float, list[Hit]]]:
        """Each concept among ``hits`` that clears ``item_min``: (key, support, its items best first),
        best supported first."""
        r = self.rules
        groups: dict[str, list[tuple[float, Hit]]] = {}
        for h in hits:
            p = self.relevance(h)
            concept = concept_of(h)
            if p >= r.item_min and concept and (key := concept_key(concept)):
                groups.setdefault(key, []).append((p, h))
        asked = content_words(question)
        describes = asks_for_unnamed(question)
        out = []
        for key, members in groups.items():
            if describes and shares_a_word(asked, key):
                continue  # "What bird crows on a farm?" is not answered by "a farm"
            miss = 1.0
            for p, _ in members:
                miss *= 1.0 - min(max(p, 0.0), 1.0)
            if r.named > 0 and names(asked, key):
                miss *= 1.0 - r.named
            ranked = [h for _, h in sorted(members, key=lambda m: m[0], reverse=True)]
            out.append((key, 1.0 - miss, ranked))
        out.sort(key=lambda t: t[1], reverse=True)
        return out

    def select(self, question: str, hits: Sequence[Hit]) -> list[Hit]:
        """The items the answer uses, in citation order ([1] first); empty when it declines."""
        r = self.rules
        concepts = self.support(question, hits)
        if not concepts:
            return []
        _, best, members = concepts[0]
        runner_up = concepts[1][1] if len(concepts) > 1 else 0.0
        if best < r.answer_min or best < r.margin * runner_up:
            return []
        return members[: r.max_cited]

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
