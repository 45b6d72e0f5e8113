"""Question rewriting: the packaged small LM turns a question into the name of the thing it asks for.

Questions describe what they ask for without naming it ("What animal croaks?"), and the embedding model
does not bridge that: the answer is rarely among the question's hits (docs/results.md, "Grounded
answers"). Opt-in (``MM_REWRITE=gguf``, or ``rewrite`` on a request), :class:`QuestionRewriter` asks the
packaged Gemma 3 270M (a base model: a few-shot completion prompt, greedy, a few tokens, cut at the line's
end) for that name ("frog"); :func:`ground` searches the name through the one search path and keeps the
hits that *are* that thing, and the answer backend answers the name from them. When the rewriter gives
no name, or no hit is that thing, the question's own search (``GenerateParams.retrieval()``) grounds
the answer, as without rewriting.

The worked examples are ours: none is a question or an answer of the fixed or the dev questions
(``tests/test_rewrite.py`` checks it).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.generation.backends.extractive import (
    WORD,
    ExtractiveGenerator,
    asks_for_unnamed,
    concept_key,
    content_words,
    names,
    word_forms,
)
from service.generation.backends.gguf import load_llama
from service.generation.prompts import QUESTION_WORDS, concept_of

if TYPE_CHECKING:
    from index.types import Hit
    from service.schemas import SearchQuery

log = logging.getLogger(__name__)

INSTRUCTION = "Each question asks for one thing. Write the name of that thing."
EXAMPLES: tuple[tuple[str, str], ...] = (  # (question, the thing it asks for); none from either question set
    ("Which bird can copy the words people say?", "parrot"),
    ("What insect has bright wings and was once a caterpillar?", "butterfly"),
    ("Which instrument has black and white keys?", "piano"),
    ("What vehicle travels under the sea?", "submarine"),
    ("Which animal moves slowly and carries its shell?", "tortoise"),
    ("What do you use to sweep the floor?", "broom"),
    ("Which wild animal howls at the moon?", "wolf"),
    ("Show me a picture of a lighthouse.", "lighthouse"),
    ("a sound of rain", "rain"),
)
MAX_QUESTION_CHARS = 300  # of the question put in the prompt (a question may have 2,000; names come early)
MAX_TOKENS = 8  # a name is one to three words
MAX_NAME_WORDS = 4
MAX_NAME_CHARS = 40
_NAME = re.compile(r"[a-z][a-z' -]*")
_ARTICLES = ("a ", "an ", "the ")


def few_shot_prompt(question: str) -> str:
    """The completion prompt: the instruction, the worked examples, then the question (bounded, on one
    line) and ``Thing:`` for the model to complete."""
    shots = "".join(f"Question: {q}\nThing: {a}\n\n" for q, a in EXAMPLES)
    asked = " ".join(question.split())[:MAX_QUESTION_CHARS]
    return f"{INSTRUCTION}\n\n{shots}Question: {asked}\nThing:"


def clean_name(text: str) -> str | None:
    """The name in a completion ("  a Frog.\\n..." -> "frog"), or None when it is empty, not a plain name
    (digits, symbols), a single letter, or too long to be one."""
    line = text.strip().split("\n", 1)[0].strip().lower().rstrip(".!?,;:").strip().strip("\"'").strip()
    for article in _ARTICLES:
        if line.startswith(article):
            line = line[len(article) :].strip()
    if not _NAME.fullmatch(line) or len(line) < 2 or len(line) > MAX_NAME_CHARS:
        return None
    if len(line.split()) > MAX_NAME_WORDS or not content_words(line):
        return None
    return line


class Rewriter(Protocol):
    def rewrite(self, question: str) -> str | None: ...


class QuestionRewriter:
    """The packaged Gemma 3 270M (``mm.gemma``) as a question rewriter, loaded on first use (or by
    :meth:`load` at start). One rewrite at a time: one llama.cpp context, whose cache keeps the few-shot
    prefix between calls (only the question's tokens are evaluated).

    ``n_threads``: llama.cpp threads. One: a rewrite evaluates ~10 new tokens and writes a few; measured
    ~230 ms p50 on one thread of a busy 2-core machine (docs/results.md).
    """

    name = "rewrite"

    def __init__(self, cache_dir: str | Path | None = None, n_threads: int = 1, n_ctx: int = 512):
        self.cache_dir = cache_dir
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self._llm: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the model now. Raises ``GeneratorUnavailable`` when llama-cpp-python or the packaged
        model is missing (the install hint in its message)."""
        with self._lock:
            if self._llm is None:
                self._llm, _ = load_llama(
                    None, n_ctx=self.n_ctx, cache_dir=self.cache_dir, n_threads=self.n_threads, who="rewrite"
                )

    def rewrite(self, question: str) -> str | None:
        self.load()
        with self._lock:
            out = self._llm.create_completion(
                few_shot_prompt(question), max_tokens=MAX_TOKENS, temperature=0.0, stop=["\n"]
            )
        return clean_name(out["choices"][0]["text"])


def is_the_thing(name: str, hit: Hit) -> bool:
    """Whether an item is the thing ``name`` names, or a kind of it: its concept has every word of the
    name and ends in the same word ("A frog." and "A snare drum." for "drum"; not "A train sign." for
    "train", nor "A Christmas tree." for "eucalyptus tree")."""
    key = concept_key(concept_of(hit))
    words = _name_words(name)
    if not key or not words:
        return False
    return names(content_words(key), name) and bool(word_forms(key.split()[-1]) & word_forms(words[-1]))


def names_its_answer(question: str, name: str) -> bool:
    """Whether a wh-question names the thing ``name`` is (its last word): "What bird crows at dawn?" is not
    answered by "crow", nor "What long yellow fruit do monkeys like?" by "monkey" (the extractive
    backend's rule for its own answers, :func:`~service.generation.backends.extractive.asks_for_unnamed`).
    A request ("Show me a frog") names what it asks for, and a name's other words may come from the
    question ("What rings in a church tower?" -> "church bell")."""
    words = _name_words(name)
    return (
        bool(words) and asks_for_unnamed(question) and bool(word_forms(words[-1]) & content_words(question))
    )


def _name_words(name: str) -> list[str]:
    """A name's words without framing words ("a", "the", ...); its last is the thing it is."""
    return [w for w in WORD.findall(name) if w.lower() not in QUESTION_WORDS]


@dataclass(frozen=True)
class Grounding:
    """What an answer is grounded in: the question the backend answers, the hits, and the rewrite used
    (None: the question's own search)."""

    question: str
    hits: list[Hit]
    rewritten: str | None = None


def answerer(gen: Any, grounding: Grounding) -> Any:
    """The backend that answers ``grounding``: for hits that are the thing a rewrite named, the extractive
    backend with its rules' own floor for them (``Rules.rewritten_min``); ``gen`` otherwise."""
    if grounding.rewritten is not None and isinstance(gen, ExtractiveGenerator):
        return gen.for_rewritten()
    return gen


def ground(
    rewriter: Rewriter, question: str, query: SearchQuery, search: Callable[[SearchQuery], list[Hit]]
) -> Grounding:
    """Rewrite ``question``, search the name (``query`` with its text replaced) and keep the hits that
    are that thing; the backend then answers the name. Without a name, or with no such hit, ``query``
    (the question's own search) grounds the question itself. Blocking (the model and the search)."""
    name = rewriter.rewrite(question)
    if name is not None and names_its_answer(question, name):
        log.info("rewrite: %r -> %r, which the question names: not its answer", question[:80], name)
        name = None
    if name is not None:
        hits = [h for h in search(query.model_copy(update={"query": name})) if is_the_thing(name, h)]
        log.info("rewrite: %r -> %r (%d items are it)", question[:80], name, len(hits))
        if hits:
            return Grounding(name, hits, name)
    else:
        log.info("rewrite: %r -> nothing", question[:80])
    return Grounding(question, search(query), None)
