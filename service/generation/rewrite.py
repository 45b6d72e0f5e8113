"""Question rewriting: the packaged small LM turns a question into the name of the thing it asks for.

Questions describe what they ask for without naming it ("What animal croaks?"), and the embedding model
does not bridge that: the answer is rarely among the question's hits (docs/results.md, "Grounded
answers"). Opt-in (``MM_REWRITE=gguf``, or ``rewrite`` on a request), :class:`QuestionRewriter` asks the
packaged Gemma 3 270M (a base model: a few-shot completion prompt) for that name: its greedy name ("frog")
and the other words among its likeliest first tokens, each with a dictionary's evidence for it
(:mod:`service.generation.glosses`: WordNet's "neigh: the characteristic sounds made by a horse" lifts
"horse" over the model's first guess "dog"). :func:`ground` searches the best-scored names through the one
search path, in turn, and keeps the hits that *are* that thing; the answer backend answers the name from
them. When no name scores high enough (:class:`Choice`, chosen on the dev questions), or none has such
hits, the question's own search (``GenerateParams.retrieval()``) grounds the answer, as without rewriting.

The worked examples are ours: none is a question or an answer of the fixed or the dev questions
(``tests/test_rewrite.py`` checks it).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

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
from service.generation.glosses import DEFAULT_ROOT as DEFAULT_GLOSSES
from service.generation.glosses import Glosses
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
TOP_K = 10  # first tokens looked at: the right name is among them for most questions the greedy one misses
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


@dataclass(frozen=True)
class Candidate:
    """A name the model may mean: ``logprob`` of its first token after the prompt; ``forward`` and
    ``reverse``: the dictionary's evidence for it (:class:`~service.generation.glosses.Glosses`; 0 without
    a dictionary or for a name it does not know)."""

    name: str
    logprob: float
    forward: float = 0.0
    reverse: float = 0.0
    greedy: bool = False  # the model's own completion (the others are single first tokens)


@dataclass(frozen=True)
class Choice:
    """How :func:`ground` chooses among the candidates: each scores ``logprob + forward_weight * forward +
    reverse_weight * reverse``; the best ``tries`` of those scoring at least ``min_score`` are searched in
    turn, and the first with items that are it grounds the answer. Chosen on the dev questions
    (``benchmarks/bench_generate.py --tune``, ``sweep_choice``)."""

    forward_weight: float = 0.1
    reverse_weight: float = 0.0  # the dev questions chose none (docs/results.md, "Grounded answers")
    min_score: float = -2.5
    tries: int = 3
    greedy_only: bool = False  # the model's greedy name alone (how rewriting chose before the candidates)

    def score(self, c: Candidate) -> float:
        return c.logprob + self.forward_weight * c.forward + self.reverse_weight * c.reverse


CHOICE = Choice()
# the model's greedy name alone, as rewriting chose before the candidates (for comparison)
GREEDY = Choice(forward_weight=0.0, reverse_weight=0.0, min_score=-math.inf, tries=1, greedy_only=True)


class Rewriter(Protocol):
    def candidates(self, question: str) -> list[Candidate]: ...


class QuestionRewriter:
    """The packaged Gemma 3 270M (``mm.gemma``) as a question rewriter, loaded on first use (or by
    :meth:`load` at start). One rewrite at a time: one llama.cpp context, whose cache keeps the few-shot
    prefix between calls (only the question's tokens are evaluated).

    :meth:`candidates`: the model's greedy name and the other words among its :data:`TOP_K` likeliest
    first tokens, each with the dictionary's evidence for it (``glosses``: WordNet when installed, else
    none); :func:`ground` chooses among them.

    ``n_threads``: llama.cpp threads. One: a rewrite evaluates ~10 new tokens and writes a few; measured
    ~80 ms p50 on one thread of the 2-core machine (docs/results.md).
    """

    name = "rewrite"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        n_threads: int = 1,
        n_ctx: int = 512,
        glosses: str | Path | None = DEFAULT_GLOSSES,
    ):
        self.cache_dir = cache_dir
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.glosses_root = glosses
        self.glosses: Glosses | None = None
        self._llm: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the model (and the dictionary) now. Raises ``GeneratorUnavailable`` when llama-cpp-python
        or the packaged model is missing (the install hint in its message); a missing dictionary is
        logged, and the model's names are then chosen by their probability alone."""
        with self._lock:
            if self._llm is None:
                self._llm, _ = load_llama(
                    None, n_ctx=self.n_ctx, cache_dir=self.cache_dir, n_threads=self.n_threads, who="rewrite"
                )
                if self.glosses_root is not None:
                    try:
                        self.glosses = Glosses.load(self.glosses_root)
                    except (OSError, ValueError) as exc:
                        log.warning("rewrite: no dictionary evidence (%s)", exc)

    def candidates(self, question: str) -> list[Candidate]:
        self.load()
        with self._lock:
            logprobs = self._first_token(few_shot_prompt(question))
            best = np.argpartition(-logprobs, TOP_K)[:TOP_K]
            top = [int(t) for t in best[np.argsort(-logprobs[best])]]
            greedy = self._piece(top[0]) + self._complete(top[0])
            texts = [(greedy, top[0])] + [(self._piece(t), t) for t in top[1:]]
        out: dict[str, Candidate] = {}
        for i, (text, token) in enumerate(texts):
            name = clean_name(text)
            if name is None or name in out:
                continue
            forward, reverse = (0.0, 0.0) if self.glosses is None else self.glosses.evidence(question, name)
            out[name] = Candidate(name, float(logprobs[token]), forward, reverse, greedy=i == 0)
        return list(out.values())

    def _first_token(self, prompt: str) -> Any:
        """Log-probabilities of the token after ``prompt`` (shape ``(n_vocab,)``), evaluating only what
        the context does not hold yet (the few-shot prefix stays cached)."""
        llm = self._llm
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        held = list(llm.input_ids[: llm.n_tokens])
        keep = 0
        for a, b in zip(held, tokens[:-1], strict=False):  # at least one token is evaluated
            if a != b:
                break
            keep += 1
        if keep < llm.n_tokens:
            if keep == 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
                llm.reset()
                keep = 0
            llm.n_tokens = keep
        llm.eval(tokens[keep:])
        return self._logprobs()

    def _logits(self) -> Any:
        """The last evaluated position's logits (a view of llama.cpp's buffer: read before the next eval)."""
        llm = self._llm
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    def _logprobs(self) -> Any:
        logits = self._logits().astype(np.float64)
        top = logits.max()
        return logits - (top + np.log(np.exp(logits - top).sum()))

    def _complete(self, first: int) -> str:
        """Greedy continuation of the name after its first token, to the line's end (at most MAX_TOKENS)."""
        llm = self._llm
        pieces: list[str] = []
        token = first
        for _ in range(MAX_TOKENS - 1):
            llm.eval([token])
            token = int(np.argmax(self._logits()))
            piece = self._piece(token)
            if token == llm.token_eos() or "\n" in piece:
                pieces.append(piece.split("\n", 1)[0])
                break
            pieces.append(piece)
        return "".join(pieces)

    def _piece(self, token: int) -> str:
        return self._llm.detokenize([token]).decode("utf-8", errors="replace")


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
    rewriter: Rewriter,
    question: str,
    query: SearchQuery,
    search: Callable[[SearchQuery], list[Hit]],
    choice: Choice = CHOICE,
) -> Grounding:
    """Ask ``rewriter`` for the names ``question`` may ask for, and search them (``query`` with its text
    replaced) best first by ``choice``, keeping the hits that are that thing; the first name with such
    hits grounds the answer (the backend then answers the name). A name the question itself names is
    not its answer (and uses up its try). Without a name scoring ``choice.min_score``, or with no such
    hit, ``query`` (the question's own search) grounds the question itself. Blocking (the model and the
    searches)."""
    found = [c for c in rewriter.candidates(question) if c.greedy or not choice.greedy_only]
    ranked = sorted(found, key=choice.score, reverse=True)
    for c in ranked[: choice.tries]:
        if choice.score(c) < choice.min_score:
            break
        if names_its_answer(question, c.name):  # it uses up its try, as the model's first name did alone
            log.info("rewrite: %r names %r: not its answer", question[:80], c.name)
            continue
        hits = [h for h in search(query.model_copy(update={"query": c.name})) if is_the_thing(c.name, h)]
        log.info(
            "rewrite: %r -> %r (score %.2f; %d items are it)",
            question[:80],
            c.name,
            choice.score(c),
            len(hits),
        )
        if hits:
            return Grounding(c.name, hits, c.name)
    if not ranked or choice.score(ranked[0]) < choice.min_score:
        log.info("rewrite: %r -> no name scores %.2f", question[:80], choice.min_score)
    return Grounding(question, search(query), None)
