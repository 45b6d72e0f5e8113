"""One ranking across modalities and retrieval modes: calibrated vector scores fused with word matches.

Raw cosines are not comparable across modality pairs (``mm.calibration``), so results are ranked by the
calibrated ``P(relevant)`` of each hit, per (query modality, item modality). Since each map is monotone,
the top ``n`` of that ranking is the merge of each modality's own top ``n``; one joint FAISS search of a
few times ``n`` holds them almost always, and a modality whose unseen hits could still rank (its map of
the lowest raw score fetched beats the ``n``-th calibrated score) is searched on its own. The result is
exactly the calibrated top ``n``.

Modes (``SearchQuery.mode``):

- ``vector``: nearest neighbours of the query vector, calibrated;
- ``keyword``: the collection's lexical index (FTS5, BM25) alone, for a text query;
- ``hybrid`` (the default for text): both, fused per item as independent evidence,
  ``P = 1 - (1 - P_vector)(1 - P_words)``, where ``P_words`` is the calibrated BM25 of the item's word
  match. Plain rank fusion (RRF) would throw away the scores that the no-match threshold reads.

Without a fitted calibration (an untrained config, an old checkpoint) scores stay raw cosines, keyword
scores stay BM25, and hybrid falls back to reciprocal rank fusion of the two lists: the only fusion that
needs no common scale, at the price of a score that says nothing about relevance (no no-match signal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from index.types import Filter, Hit

if TYPE_CHECKING:
    from index.api import CollectionAPI as Collection
    from mm.calibration import Calibration

MODALITIES = ("text", "image", "audio")
RRF_K = 60  # reciprocal rank fusion's constant, for hybrid search without a calibration
FETCH_FACTOR = 3  # a joint search fetches this many times k + offset before checking each modality's bound

Mode = Literal["vector", "keyword", "hybrid"]


@dataclass(frozen=True)
class Ranked:
    """One ranked hit: ``hit.score`` is the final (calibrated, fused) score; the parts beside it."""

    hit: Hit
    raw: float | None  # cosine of the query vector and the item (None: keyword search only)
    words: float | None  # BM25 of the item's word match (None: its words did not match)


def rank_hits(
    collection: Collection,
    vector: np.ndarray | None,
    *,
    k: int,
    offset: int = 0,
    filter: Filter | None = None,
    mode: Mode = "vector",
    text: str | None = None,
    query_modality: str | None = None,
    calibration: Calibration | None = None,
) -> list[Ranked]:
    """The ``k`` best hits after ``offset`` for ``vector`` (``(D,)``) and/or ``text``, best first."""
    n = k + offset
    cal = calibration if calibration is not None and calibration.fitted else None
    pairs = cal is not None and query_modality in MODALITIES
    vec_hits: dict[int, tuple[Hit, float, float]] = {}  # id -> (hit, raw, calibrated)
    if mode != "keyword" and vector is not None:
        q = np.asarray(vector, dtype=np.float32)[None, :]  # (1, D)
        if pairs:
            assert cal is not None and query_modality is not None
            vec_hits = _calibrated_top(collection, q, n, filter, query_modality, cal)
        else:
            vec_hits = {h.id: (h, h.score, h.score) for h in collection.search(q, k=n, filter=filter)[0]}
    word_hits: dict[int, tuple[Hit, float]] = {}
    if mode != "vector" and text:
        word_hits = {h.id: (h, h.score) for h in collection.lexical_search(text, k=n, filter=filter)}
    lexical = cal.lexical if cal is not None else None
    ranked: list[Ranked] = []
    raw: float | None  # the vector's cosine; None: a word match only
    bm25: float | None  # the word match's score; None: a vector match only
    if mode == "keyword":
        for hit, bm25 in word_hits.values():
            score = float(lexical(bm25)) if lexical is not None else bm25
            ranked.append(Ranked(Hit(hit.id, score, hit.item), None, bm25))
    elif mode == "hybrid" and word_hits and lexical is not None and pairs:
        assert cal is not None and query_modality is not None and vector is not None
        # word matches the vector search did not reach: their vectors scored too, read in one query
        stored = collection.vectors(i for i in word_hits if i not in vec_hits)
        for id_, (hit, _) in word_hits.items():
            if id_ not in vec_hits:
                raw = float(np.dot(stored[id_], vector)) if id_ in stored else -1.0
                vec_hits[id_] = (hit, raw, float(cal.score(query_modality, hit.item.modality, raw)))
        for id_, (hit, raw, p_vec) in vec_hits.items():
            bm25 = word_hits[id_][1] if id_ in word_hits else None
            p_words = float(lexical(bm25)) if bm25 is not None else 0.0
            fused = 1.0 - (1.0 - p_vec) * (1.0 - p_words)
            ranked.append(Ranked(Hit(id_, fused, hit.item), raw, bm25))
    elif mode == "hybrid" and word_hits:  # no calibration: reciprocal rank fusion (Cormack et al. 2009)
        by_vector = sorted(vec_hits.values(), key=lambda t: (-t[2], t[0].id))
        rrf: dict[int, float] = {}
        for pos, (hit, _, _) in enumerate(by_vector):
            rrf[hit.id] = 1.0 / (RRF_K + pos + 1)
        for pos, (hit, _) in enumerate(sorted(word_hits.values(), key=lambda t: (-t[1], t[0].id))):
            rrf[hit.id] = rrf.get(hit.id, 0.0) + 1.0 / (RRF_K + pos + 1)
        for id_, score in rrf.items():
            hit = vec_hits[id_][0] if id_ in vec_hits else word_hits[id_][0]
            raw = vec_hits[id_][1] if id_ in vec_hits else None
            bm25 = word_hits[id_][1] if id_ in word_hits else None
            ranked.append(Ranked(Hit(id_, score, hit.item), raw, bm25))
    else:  # vector (word matches of the same items reported beside them)
        for id_, (hit, raw, p) in vec_hits.items():
            bm25 = word_hits[id_][1] if id_ in word_hits else None
            ranked.append(Ranked(Hit(id_, p, hit.item), raw, bm25))
    ranked.sort(key=lambda r: (-r.hit.score, -(r.raw if r.raw is not None else -2.0), r.hit.id))
    return ranked[offset:n]


def _calibrated_top(
    collection: Collection, q: np.ndarray, n: int, filter: Filter | None, src: str, cal: Calibration
) -> dict[int, tuple[Hit, float, float]]:
    """Exactly the ``n`` best hits by calibrated score (more when ties straddle), keyed by id."""
    fetch = max(n * FETCH_FACTOR, n + 16)
    hits = collection.search(q, k=fetch, filter=filter)[0]
    out = {h.id: (h, h.score, float(cal.score(src, h.item.modality, h.score))) for h in hits}
    if len(hits) < fetch:  # everything the filter allows was fetched
        return out
    wanted = filter.modalities if filter is not None and filter.modalities else MODALITIES
    nth = sorted((c for _, _, c in out.values()), reverse=True)[n - 1]
    lowest_raw = hits[-1].score
    for m in wanted:
        seen = sum(1 for h, _, _ in out.values() if h.item.modality == m)
        # an unseen hit of modality m has raw <= lowest_raw, so calibrated <= cal(lowest_raw) (monotone)
        if seen >= n or float(cal.score(src, m, lowest_raw)) < nth:
            continue
        only_m = dataclasses.replace(filter, modalities=[m]) if filter is not None else Filter(modalities=[m])
        for h in collection.search(q, k=n, filter=only_m)[0]:
            out.setdefault(h.id, (h, h.score, float(cal.score(src, m, h.score))))
    return out
