"""Retrieval measured through the search path users get: a collection built from a manifest split,
queried with :func:`service.search.answer` in each ranking mode.

``mm.evaluate`` scores the model's embeddings (every direction, brute force); this scores the product:
the split's images and sounds become a collection as a user's media folder would (each file under its
own name, optionally with its English caption beside it as a sidecar would give it), and every text row
of the split (any language) is a query through ``SearchQuery`` -> ``answer`` with calibration, filters
and the lexical index, exactly as ``POST /search`` runs it. A hit is relevant when it carries the
query's concept label. Only text queries can differ between modes (words need text); other directions
rank the same in every mode, which ``mm.evaluate`` already measures.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.collection import Collection
from index.types import Item
from service.schemas import SearchQuery
from service.search import answer

MODES = ("vector", "hybrid", "keyword")


def build_gallery(
    rows: Sequence[dict[str, Any]], embedder: Any, path: Path, captions: bool
) -> tuple[Collection, dict[str, tuple[str, str]]]:
    """A collection of the rows' images and sounds (vectors from ``embedder``); uri -> (modality, label)."""
    media: dict[str, tuple[str, str, str]] = {}  # path -> (modality, English caption, label)
    for r in rows:
        english = r.get("text", "") if r.get("lang") in (None, "en") else ""
        for m in ("image", "audio"):
            p = r.get(m)
            if p and r.get("label") is not None:
                old = media.get(str(p), ("", "", ""))[1]
                media[str(p)] = (m, english or old, r["label"])
    coll = Collection.create(path, dim=embedder.dim, embedder_id="search-eval")
    for m in ("image", "audio"):
        keys = [k for k, v in media.items() if v[0] == m]
        if not keys:
            continue
        vecs = embedder.encode(m, keys)
        items = [
            Item(id=0, modality=m, uri=k, sha256=str(i), caption=media[k][1] if captions else "")
            for i, k in enumerate(keys)
        ]
        coll.add(vecs, items)
    return coll, {k: (v[0], v[2]) for k, v in media.items()}


def evaluate_search(
    rows: Sequence[dict[str, Any]],
    embedder: Any,
    modes: Sequence[str] = MODES,
    captions: bool = False,
    queries: Sequence[tuple[str, str]] | None = None,
    k: int = 10,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{mode: {"text->image" | "text->audio": {"R@1", "R@10", "n"}}}`` through :func:`answer`.

    ``queries`` (text, label) default to every text row of ``rows``; a query counts for a modality only
    when the gallery holds an item of its label in that modality.
    """
    if queries is None:
        queries = [(r["text"], r["label"]) for r in rows if r.get("text") and r.get("label") is not None]
    out: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        coll, gallery = build_gallery(rows, embedder, Path(tmp) / "gallery", captions)
        label_of = {uri: label for uri, (_, label) in gallery.items()}
        present = set(gallery.values())
        try:
            for mode in modes:
                out[mode] = {}
                for m in ("image", "audio"):
                    firsts = []
                    for text, label in queries:
                        if (m, label) not in present:
                            continue
                        q = SearchQuery(query=text, k=k, modalities=[m], mode=mode)
                        hits = answer(q, embedder, coll).hits
                        rank = next(
                            (i for i, h in enumerate(hits) if label_of.get(h.item.uri) == label), None
                        )
                        firsts.append(k + 1 if rank is None else rank + 1)
                    if firsts:
                        f = np.asarray(firsts)
                        out[mode][f"text->{m}"] = {
                            "R@1": round(float(np.mean(f <= 1)), 4),
                            "R@10": round(float(np.mean(f <= min(10, k))), 4),
                            "n": len(f),
                        }
        finally:
            coll.close()
    return out
