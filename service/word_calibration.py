"""Fit the word-match map of a calibration: BM25 of a lexical hit -> P(relevant), on a manifest split.

The split's images and sounds become a collection as users bring one: each file under its own name with
its English caption beside it (a sidecar ``.txt``), and its text rows become queries, in every language
the split holds. A (query, item) pair whose words matched is relevant when both carry the same concept
label. A Platt map of BM25 on those pairs says how much a word match is worth, on the same probability
scale as the vector scores, so that hybrid search can fuse the two (:mod:`service.ranking`).

It lives in the service layer because it needs a collection's lexical index (``index``) and writes the
model's calibration (``mm``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.collection import Collection
from index.types import Item
from mm.calibration import PairFit, fit_platt
from service.search_eval import gallery_files, text_queries

log = logging.getLogger(__name__)

DEPTH = 50  # word matches per query that the fit sees (what a search could show)


def fit_word_calibration(
    rows: Sequence[dict[str, Any]], max_queries: int = 4000
) -> tuple[PairFit | None, dict]:
    """The BM25 map fitted on ``rows`` (manifest rows with ``label``), and a report."""
    items = gallery_files(rows)
    queries = text_queries(rows)
    queries = queries[:max_queries]
    if not items or not queries:
        return None, {"pairs": 0}
    scores: list[float] = []
    labels: list[bool] = []
    with tempfile.TemporaryDirectory() as tmp:
        coll = Collection.create(Path(tmp) / "words", dim=2, embedder_id="word-calibration")
        try:
            keys = list(items)
            vecs = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(keys), 1))
            coll.add(
                vecs,
                [
                    Item(id=0, modality=items[k][0], uri=k, sha256=str(i), caption=items[k][1])
                    for i, k in enumerate(keys)
                ],
            )
            label_of = {k: items[k][2] for k in keys}
            for text, label in queries:
                for hit in coll.lexical_search(text, k=DEPTH):
                    scores.append(hit.score)
                    labels.append(label_of[hit.item.uri] == label)
        finally:
            coll.close()
    y = np.asarray(labels)
    report: dict[str, Any] = {
        "pairs": len(y),
        "positives": int(y.sum()),
        "queries": len(queries),
        "items": len(items),
    }
    if len(y) == 0 or y.all() or not y.any():
        return None, report
    a, b = fit_platt(np.asarray(scores), y)
    report.update(a=round(a, 4), b=round(b, 4))
    log.info("word calibration: a=%.3f b=%.3f on %d matched pairs (%d relevant)", a, b, len(y), y.sum())
    return PairFit(a, b, len(y), int(y.sum())), report
