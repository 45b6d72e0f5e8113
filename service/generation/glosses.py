"""A dictionary's glosses as evidence that a name is what a question describes.

The question rewriter's small LM knows that something croaks, hoots or has a trunk, but often ranks the
wrong animal first ("What animal neighs?" -> dog, with horse third). A dictionary says it outright: WordNet
glosses "neigh" as "the characteristic sounds made by a horse" and "penguin" as "short-legged flightless
birds of cold southern ... regions". :class:`Glosses` reads WordNet 3.0's database files (Debian
``wordnet-base``: ``/usr/share/wordnet/data.noun``, ``data.verb`` and their ``*.exc`` exception lists; our
own reader, no WordNet library) and scores a candidate name against a question two ways:

- ``forward``: the question's words found in the name's own glosses (its first noun senses and their
  hypernyms: "kangaroo" -> "marsupial", whose gloss has "pouch");
- ``reverse``: the question's words whose own glosses name the candidate or a synonym of it ("neigh" ->
  "... made by a horse").

Each matched word counts its inverse document frequency over all glosses, so "pouch" counts more than
"animal". The rewriter adds the weighted sum to the name's log-probability (``service.generation.rewrite``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/usr/share/wordnet")
MAX_FILE_BYTES = 64 << 20  # data.noun is 15 MB; a larger file is not WordNet 3.0
SENSES = 3  # a name's first noun senses looked at (WordNet orders senses by frequency)
_WORD = re.compile(r"[a-z]+")
_EXAMPLE = re.compile(r'"[^"]*"')
# words that say nothing about which thing is meant (question framing and the commonest gloss words)
_STOP_WORDS = """a an the of or and to in on at by for with from as is are be its it that this which what
    who whom how do does did can could has have having any some one two used into especially usually often
    other than very small large big thing things something makes make made sound sounds says say goes go
    called
    animal kind type sort"""
STOP = frozenset(_STOP_WORDS.split())


def stem(word: str, exceptions: dict[str, str] | None = None) -> str:
    """A crude base form for matching ("hops" -> "hop", "flies" -> "fly", "mice" -> "mouse" through
    WordNet's exception lists): the same on the question's and the glosses' side, which is what counts."""
    w = word.lower()
    if exceptions and w in exceptions:
        return exceptions[w]
    for suffix in ("ies", "es", "s", "ing", "ed"):
        if len(w) > len(suffix) + (1 if suffix == "ies" else 2) and w.endswith(suffix):
            return w[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return w


@dataclass(frozen=True)
class Synset:
    lemmas: tuple[str, ...]
    gloss: frozenset[str]  # stemmed content words of the definition (examples dropped)
    hypernyms: tuple[tuple[str, str], ...]  # (pos, offset)


class Glosses:
    """WordNet's noun and verb synsets, indexed by lemma. Build with :meth:`load`."""

    def __init__(
        self,
        synsets: dict[tuple[str, str], Synset],
        exceptions: dict[str, str],
        senses: dict[str, list[tuple[str, str]]],
    ):
        """``senses``: each lemma's synsets, commonest sense first (WordNet's ``index.*``)."""
        self.synsets = synsets
        self.exceptions = exceptions
        self.index = {lemma: [k for k in keys if k in synsets] for lemma, keys in senses.items()}
        df: dict[str, int] = defaultdict(int)
        for s in synsets.values():
            for w in s.gloss:
                df[w] += 1
        n = max(1, len(synsets))
        self._idf = {w: math.log(n / (1 + c)) for w, c in df.items()}
        self._unseen_idf = math.log(n)

    @classmethod
    def load(cls, root: str | Path = DEFAULT_ROOT) -> Glosses:
        """Read ``data.*``, ``index.*`` (nouns and verbs) and ``*.exc`` under ``root``. Raises
        FileNotFoundError (naming the Debian package) when they are missing, ValueError when a file is
        too large or not in WordNet's format."""
        root = Path(root)
        t0 = time.perf_counter()
        synsets: dict[tuple[str, str], Synset] = {}
        exceptions: dict[str, str] = {}
        for name in ("noun.exc", "verb.exc"):
            for line in _read(root / name).splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    exceptions.setdefault(parts[0], parts[1])
        senses: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for pos, noun_or_verb in (("n", "noun"), ("v", "verb")):
            for name, parse in ((f"data.{noun_or_verb}", _parse), (f"index.{noun_or_verb}", _parse_index)):
                for number, line in enumerate(_read(root / name).splitlines(), 1):
                    if not line or line.startswith(" "):  # the licence header
                        continue
                    try:
                        key, value = parse(line, exceptions)
                    except (IndexError, ValueError) as exc:
                        raise ValueError(f"{root / name}:{number}: not a WordNet line ({exc})") from None
                    if isinstance(value, Synset):
                        synsets[(pos, key)] = value
                    else:
                        senses[key].extend((pos, off) for off in value)
        glosses = cls(synsets, exceptions, senses)
        log.info("glosses: %d synsets from %s in %.1f s", len(synsets), root, time.perf_counter() - t0)
        return glosses

    def idf(self, word: str) -> float:
        return self._idf.get(word, self._unseen_idf)

    def words(self, text: str) -> set[str]:
        """``text``'s stemmed content words."""
        return {stem(w, self.exceptions) for w in _WORD.findall(text.lower()) if w not in STOP and len(w) > 2}

    def first_senses(self, word: str, pos: str) -> list[Synset]:
        """``word``'s first :data:`SENSES` senses of part of speech ``pos`` ("n" or "v")."""
        keys = [k for k in self.index.get(word.lower().strip(), []) if k[0] == pos]
        return [self.synsets[k] for k in keys[:SENSES]]

    def noun_senses(self, name: str) -> list[Synset]:
        return self.first_senses(name, "n")

    def senses(self, word: str) -> list[Synset]:
        """``word``'s first noun senses and first verb senses."""
        return self.first_senses(word, "n") + self.first_senses(word, "v")

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a noun of the dictionary."""
        return bool(self.noun_senses(name))

    def synonyms(self, name: str) -> set[str]:
        """``name`` and the lemmas of its first noun senses, stemmed."""
        out = {name.lower()}
        for s in self.noun_senses(name):
            out.update(s.lemmas)
        return {stem(w, self.exceptions) for w in out}

    def evidence(self, question: str, name: str) -> tuple[float, float]:
        """(:meth:`forward`, :meth:`reverse`) for a name the dictionary knows as a noun; (0, 0) else (a
        word piece such as "hipp" has no senses to score)."""
        if not self.knows(name):
            return 0.0, 0.0
        return self.forward(question, name), self.reverse(question, name)

    def forward(self, question: str, name: str) -> float:
        """The question's words found in the name's glosses and its hypernyms' (glosses and lemmas),
        each by its idf; the name's own words do not count."""
        evidence: set[str] = set()
        for s in self.noun_senses(name):
            evidence |= s.gloss
            for h in s.hypernyms:
                parent = self.synsets.get(h)
                if parent is not None:
                    evidence |= parent.gloss | {stem(w, self.exceptions) for w in parent.lemmas}
        asked = self.words(question) - self.synonyms(name)
        return sum(self.idf(w) for w in asked & evidence)

    def reverse(self, question: str, name: str) -> float:
        """The question's words (each by its idf) one of whose first senses' gloss names ``name`` or a
        synonym (a word's rare senses name too much: "bear" is also a verb in many glosses)."""
        names = self.synonyms(name)
        total = 0.0
        for w in self.words(question) - names:
            if any(s.gloss & names for s in self.senses(w)):
                total += self.idf(w)
        return total


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install the Debian package wordnet-base")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is {size} bytes, more than WordNet 3.0's files ({MAX_FILE_BYTES})")
    return path.read_text(encoding="latin-1")


def _parse(line: str, exceptions: dict[str, str]) -> tuple[str, Synset]:
    """One ``data.*`` line (``exceptions``: for stemming its gloss): offset, lexical file, type, word count
    (hex), words with lexical ids, pointer count, pointers (symbol, offset, pos, source/target), [verb
    frames], ``|`` gloss."""
    head, _, gloss = line.partition(" | ")
    p = head.split()
    count = int(p[3], 16)
    lemmas = tuple(re.sub(r"\(.*\)$", "", p[4 + 2 * i]).lower().replace("_", " ") for i in range(count))
    k = 4 + 2 * count
    hypernyms = []
    for i in range(int(p[k])):
        symbol, offset, pos = p[k + 1 + 4 * i], p[k + 2 + 4 * i], p[k + 3 + 4 * i]
        if symbol in ("@", "@i"):
            hypernyms.append((pos, offset))
    text = _EXAMPLE.sub(" ", gloss).lower()
    words = frozenset(stem(w, exceptions) for w in _WORD.findall(text) if w not in STOP and len(w) > 2)
    return p[0], Synset(lemmas, words, tuple(hypernyms))


def _parse_index(line: str, exceptions: dict[str, str]) -> tuple[str, list[str]]:
    """One ``index.*`` line: lemma, pos, synset count, pointer count, pointer symbols, sense count,
    tagged sense count, then the synsets' offsets, commonest sense first."""
    p = line.split()
    count = int(p[2])
    offsets = p[-count:]
    if len(p) < 6 + count or not all(o.isdigit() for o in offsets):
        raise ValueError("bad synset offsets")
    return p[0].lower().replace("_", " "), offsets
