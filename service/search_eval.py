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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.collection import Collection
from index.types import Item
from service.schemas import SearchQuery
from service.search import answer

MODES = ("vector", "hybrid", "keyword")


def cached_encoder(embedder: Any) -> Callable[[str, list[str]], np.ndarray]:
    """``embedder.encode`` that encodes each (modality, path) once, however many galleries ask for it."""
    seen: dict[tuple[str, str], np.ndarray] = {}

    def encode(modality: str, keys: list[str]) -> np.ndarray:
        todo = [k for k in dict.fromkeys(keys) if (modality, k) not in seen]
        if todo:
            seen.update(zip(((modality, k) for k in todo), embedder.encode(modality, todo), strict=True))
        if not keys:
            return np.zeros((0, embedder.dim), np.float32)
        return np.stack([seen[(modality, k)] for k in keys])

    return encode


def gallery_files(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    """The rows' images and sounds as a user's folder holds them: path -> (modality, English caption, label)
    (the caption is the English text of any row naming the file; "" when it has none)."""
    files: dict[str, tuple[str, str, str]] = {}
    for r in rows:
        english = r.get("text", "") if r.get("lang") in (None, "en") else ""
        for m in ("image", "audio"):
            p = r.get(m)
            if p and r.get("label") is not None:
                files[str(p)] = (m, english or files.get(str(p), ("", "", ""))[1], r["label"])
    return files


def text_queries(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(text, label) of every labelled text row, in every language."""
    return [(r["text"], r["label"]) for r in rows if r.get("text") and r.get("label") is not None]


def build_gallery(
    rows: Sequence[dict[str, Any]],
    embedder: Any,
    path: Path,
    captions: bool,
    encode: Callable[[str, list[str]], np.ndarray] | None = None,
) -> tuple[Collection, dict[str, tuple[str, str]]]:
    """A collection of the rows' images and sounds, their vectors from ``encode(modality, paths)``
    (default ``embedder.encode``); returns it and uri -> (modality, label)."""
    media = gallery_files(rows)
    encode = encode or embedder.encode
    coll = Collection.create(path, dim=embedder.dim, embedder_id="search-eval")
    for m in ("image", "audio"):
        keys = [k for k, v in media.items() if v[0] == m]
        if not keys:
            continue
        items = [
            Item(id=0, modality=m, uri=k, sha256=str(i), caption=media[k][1] if captions else "")
            for i, k in enumerate(keys)
        ]
        coll.add(encode(m, keys), items)
    return coll, {k: (v[0], v[2]) for k, v in media.items()}


def evaluate_search(
    rows: Sequence[dict[str, Any]],
    embedder: Any,
    modes: Sequence[str] = MODES,
    captions: bool = False,
    queries: Sequence[tuple[str, str]] | None = None,
    k: int = 10,
    encode: Callable[[str, list[str]], np.ndarray] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{mode: {"text->image" | "text->audio": {"R@1", "R@10", "n"}}}`` through :func:`answer`.

    ``queries`` (text, label) default to every text row of ``rows``; a query counts for a modality only
    when the gallery holds an item of its label in that modality. ``encode(modality, paths)`` embeds the
    gallery (default ``embedder.encode``; pass a cached one to measure several query sets on one gallery).
    """
    if queries is None:
        queries = text_queries(rows)
    out: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        coll, gallery = build_gallery(rows, embedder, Path(tmp) / "gallery", captions, encode)
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
