"""Retrieval measured through the search path users get: a collection built from a manifest split,
queried with :func:`service.search.answer` in each ranking mode.

``mm.evaluate`` scores the model's embeddings (every direction, brute force); this scores the product:
the split's images and sounds become a collection as a user's media folder would (each file under its
own name, optionally with its English caption beside it as a sidecar would give it), and every text row
of the split (any language) is a query through ``SearchQuery`` -> ``answer`` with calibration, filters
and the lexical index, exactly as ``POST /search`` runs it. A hit is relevant when it carries the
query's concept label. Only text queries can differ between modes (words need text); other directions
rank the same in every mode, which ``mm.evaluate`` already measures.

Spoken queries (:func:`evaluate_spoken`): each clip of speech in the split (a caption spoken by espeak-ng,
a human recording of a word) is a file query answered as ``POST /search/upload`` answers it, its
transcript fused in (``service.search.embed_file``), against a collection of the split's other images
and sounds and its English captions as text items; side by side with the same queries without a
recogniser (the clip's embedding alone), in each mode a file query takes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.collection import Collection
from index.types import Item
from service.schemas import QueryMedia, SearchQuery
from service.search import calibration_of, embed, rank

MODES = ("vector", "hybrid", "keyword")
MEDIA = ("image", "audio")
FILE_MODES = ("vector", "hybrid")  # a file query has no text of its own: no 'keyword' (SearchQuery's rule)


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


def usable_rows(
    rows: Sequence[dict[str, Any]], embedder: Any, batch: int = 64
) -> tuple[list[dict[str, Any]], Callable[[str, list[str]], np.ndarray], dict[str, str]]:
    """The rows whose media all encode, a cached encoder that already holds them, and the refused files.

    A corpus may carry a file the decoder refuses (a truncated recording in a Debian package): training
    skips it, and so must every metric, instead of one file stopping a whole evaluation or calibration.
    Returns ``(rows, encode, {path: reason})``; each refusal is logged once.
    """
    import logging

    from mm.errors import MediaError

    log = logging.getLogger(__name__)
    encode = cached_encoder(embedder)
    bad: dict[str, str] = {}
    for m in ("image", "audio"):
        keys = list(dict.fromkeys(str(r[m]) for r in rows if r.get(m)))
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            try:
                encode(m, chunk)
            except MediaError:
                for k in chunk:  # find the file that failed; the others are cached one by one
                    try:
                        encode(m, [k])
                    except MediaError as e:
                        bad[k] = str(e)
                        log.warning("skipping %s: %s", k, e)
    kept = [r for r in rows if not any(r.get(m) and str(r[m]) in bad for m in ("image", "audio"))]
    return kept, encode, bad


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
    """``{mode: {"text->image" | "text->audio": {"R@1", "R@10", "n"}}}`` through the two steps of
    :func:`service.search.answer`: each query embedded once (:func:`~service.search.embed`), then ranked
    (:func:`~service.search.rank`) in each mode and modality, which only the second step reads.

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
            firsts: dict[tuple[str, str], list[int]] = {}
            for text, label in queries:
                wanted = [m for m in MEDIA if (m, label) in present]
                if not wanted:
                    continue
                qv = embed(SearchQuery(query=text, k=k), embedder, coll)  # step 1 is the same in every mode
                for mode in modes:
                    for m in wanted:
                        q = SearchQuery(query=text, k=k, modalities=[m], mode=mode)
                        hits = rank(q, qv, coll, calibration_of(embedder)).hits
                        at = next((i for i, h in enumerate(hits) if label_of.get(h.item.uri) == label), k)
                        firsts.setdefault((mode, m), []).append(at + 1)
            for mode in modes:
                out[mode] = {f"text->{m}": _recall(firsts[mode, m], k) for m in MEDIA if (mode, m) in firsts}
        finally:
            coll.close()
    return out


def spoken_queries(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(clip path, label) of every labelled row whose sound is speech: a caption spoken by espeak-ng
    (source ``speech``) or a human recording of a word (``meta.speech_lang``, the ktuberling source)."""
    out: dict[str, str] = {}
    for r in rows:
        spoken = r.get("source") == "speech" or bool((r.get("meta") or {}).get("speech_lang"))
        if spoken and r.get("audio") and r.get("label") is not None:
            out.setdefault(str(r["audio"]), r["label"])
    return list(out.items())


class _Hearing:
    """``embedder`` as the search path sees it with ``transcribe`` as its recogniser (None: none), as
    ``service.embedding.load_embedder`` attaches one; everything else is the embedder's own."""

    def __init__(self, embedder: Any, transcribe: Callable[[Any], dict[str, str] | None] | None):
        self._embedder = embedder
        self.transcribe = transcribe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)


def _spread(items: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` of ``items``, evenly spread (a manifest is ordered by category)."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def evaluate_spoken(
    rows: Sequence[dict[str, Any]],
    embedder: Any,
    transcribe: Callable[[Any], dict[str, str] | None] | None = None,
    modes: Sequence[str] = FILE_MODES,
    captions: bool = False,
    queries: Sequence[tuple[str, str]] | None = None,
    limit: int | None = None,
    k: int = 10,
    encode: Callable[[str, list[str]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Spoken queries through the search path of ``POST /search/upload``, with and without its transcript.

    ``queries`` (clip path, label) default to :func:`spoken_queries` of ``rows``, at most ``limit`` of
    them. The gallery is every other image and sound of ``rows`` (the clips themselves are queries, not
    items) and their English captions as text items. ``transcribe`` is the recogniser (default the
    embedder's own, ``embedder.transcribe``). Each query is embedded once per setting by
    :func:`service.search.embed` (decode, encode, transcribe, fuse: what ``/search/upload`` runs) and
    ranked by :func:`service.search.rank` in each mode (``answer`` is exactly these two steps; the mode
    only changes the second).

    Returns ``{"clip" | "fused": {mode: {"spoken->image" | "spoken->text": {"R@1", "R@10", "n"}}},
    "transcribed": share of the queries given a transcript, "n": queries}``.
    """
    if transcribe is None:
        transcribe = getattr(embedder, "transcribe", None)
    if queries is None:
        queries = spoken_queries(rows)
    queries = _spread(list(queries), limit)
    clips = {path for path, _ in queries}
    others = [dict(r, audio=None) if str(r.get("audio")) in clips else r for r in rows]  # not items
    settings = {"clip": _Hearing(embedder, None), "fused": _Hearing(embedder, transcribe)}
    firsts: dict[tuple[str, str, str], list[int]] = {}
    heard = 0
    with tempfile.TemporaryDirectory() as tmp:
        coll, gallery = build_gallery(others, embedder, Path(tmp) / "gallery", captions, encode)
        try:
            label_of = _add_captions(coll, others, embedder, encode)
            label_of.update({uri: label for uri, (_, label) in gallery.items()})
            present = set(gallery.values()) | {("text", label) for label in label_of.values()}
            for path, label in queries:
                media = QueryMedia("audio", path)
                wanted = [m for m in ("image", "text") if (m, label) in present]
                for setting, hearing in settings.items():
                    qv = embed(SearchQuery(media=media, k=k), hearing, coll)
                    heard += setting == "fused" and qv.heard is not None
                    for mode in modes:
                        for m in wanted:
                            q = SearchQuery(media=media, k=k, modalities=[m], mode=mode)
                            hits = rank(q, qv, coll, calibration_of(hearing)).hits
                            at = next((i for i, h in enumerate(hits) if label_of.get(_key(h)) == label), k)
                            firsts.setdefault((setting, mode, m), []).append(at + 1)
        finally:
            coll.close()
    out: dict[str, Any] = {s: {mode: {} for mode in modes} for s in settings}
    for (setting, mode, m), f in firsts.items():
        out[setting][mode][f"spoken->{m}"] = _recall(f, k)
    out["transcribed"] = round(heard / len(queries), 4) if queries else 0.0
    out["n"] = len(queries)
    return out


def _recall(firsts: list[int], k: int) -> dict[str, float]:
    """R@1, R@10 and n of the 1-based ranks of each query's first relevant hit (``k + 1``: none in ``k``)."""
    f = np.asarray(firsts)
    return {
        "R@1": round(float(np.mean(f <= 1)), 4),
        "R@10": round(float(np.mean(f <= min(10, k))), 4),
        "n": len(f),
    }


def _key(hit: Any) -> str:
    """What identifies a gallery hit: a file's uri, or ``#id`` for a text item (which has no file)."""
    return hit.item.uri or f"#{hit.id}"


def _add_captions(
    coll: Collection,
    rows: Sequence[dict[str, Any]],
    embedder: Any,
    encode: Callable[[str, list[str]], np.ndarray] | None,
) -> dict[str, str]:
    """The rows' English texts added to ``coll`` as text items (each distinct text once); ``#id`` -> label."""
    texts: dict[str, str] = {}
    for r in rows:
        if r.get("text") and r.get("lang") in (None, "en") and r.get("label") is not None:
            texts.setdefault(r["text"], r["label"])
    if not texts:
        return {}
    keys = list(texts)
    vectors = (encode or embedder.encode)("text", keys)
    items = [
        Item(id=0, modality="text", uri="", sha256=f"text-{i}", mime="text/plain", caption=t)
        for i, t in enumerate(keys)
    ]
    ids = coll.add(vectors, items)
    return {f"#{i}": texts[t] for i, t in zip(ids, keys, strict=True)}
