"""Lexical search: FTS5 + BM25 over captions, file names, tags and transcripts, kept in step by triggers."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from index.collection import Collection
from index.lexical import TABLE, match_expression
from index.types import Filter, Item

DIM = 8


def _item(uri: str, caption: str = "", modality: str = "image", tags=(), extra=None) -> Item:
    return Item(
        id=0, modality=modality, uri=uri, sha256=uri, caption=caption, tags=list(tags), extra=extra or {}
    )


@pytest.fixture
def coll(tmp_path):
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="test")
    items = [
        _item("/m/red_circle.png", "A red circle."),
        _item("/m/blue.png", "Un café très chaud.", tags=["drinks"]),
        _item(
            "/m/dog.ogg",
            "",
            modality="audio",
            extra={"transcript": {"text": "the dog barks", "language": "en"}},
        ),
        _item("/m/noise.wav", "Static noise.", modality="audio"),
    ]
    vecs = np.random.default_rng(0).normal(size=(len(items), DIM)).astype(np.float32)
    c.add(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), items)
    yield c
    c.close()


def _uris(hits) -> list[str]:
    return [h.item.uri for h in hits]


def test_words_of_captions_names_tags_and_transcripts_are_found(coll) -> None:
    assert _uris(coll.lexical_search("a red circle", k=2))[0] == "/m/red_circle.png"
    assert _uris(coll.lexical_search("circle", k=5)) == ["/m/red_circle.png"]  # caption and file name
    assert _uris(coll.lexical_search("cafe tres", k=5)) == ["/m/blue.png"]  # accents folded
    assert _uris(coll.lexical_search("DRINKS", k=5)) == ["/m/blue.png"]  # a tag, any case
    assert _uris(coll.lexical_search("barks", k=5)) == ["/m/dog.ogg"]  # a transcript
    assert coll.lexical_search("giraffe", k=5) == []
    hits = coll.lexical_search("red circle noise", k=5)
    assert hits[0].score > hits[-1].score > 0


def test_filters_and_exclusions_apply(coll) -> None:
    assert _uris(coll.lexical_search("circle noise", k=5, filter=Filter(modalities=["audio"]))) == [
        "/m/noise.wav"
    ]
    first = coll.lexical_search("circle", k=1)[0]
    assert coll.lexical_search("circle", k=5, filter=Filter(exclude_ids=[first.id])) == []


def test_index_follows_updates_and_deletes(coll) -> None:
    hit = coll.lexical_search("circle", k=1)[0]
    coll.update_metadata(hit.id, caption="A green square.")
    assert _uris(coll.lexical_search("square", k=5)) == ["/m/red_circle.png"]
    assert _uris(coll.lexical_search("red", k=5)) == ["/m/red_circle.png"]  # still in its file name
    coll.delete([hit.id])
    assert coll.lexical_search("square circle", k=5) == []


@pytest.mark.parametrize(
    "text", ['"unbalanced', "NEAR(a b)", "-x OR *", "col:value", "'; DROP TABLE items; --"]
)
def test_query_syntax_from_users_is_never_interpreted(coll, text) -> None:
    coll.lexical_search(text, k=5)  # must not raise an FTS5 syntax error
    assert coll.count() == 4


def test_match_expression_quotes_every_word() -> None:
    assert match_expression('a "b" c*') == '"a" OR "b" OR "c"'
    assert match_expression("  ?! ") is None


def test_older_collection_gets_its_index_on_open(tmp_path) -> None:
    c = Collection.create(tmp_path / "old", dim=DIM, embedder_id="test")
    c.add(np.eye(DIM, dtype=np.float32)[:1], [_item("/m/frog.png", "A frog.")])
    c.close()
    conn = sqlite3.connect(tmp_path / "old" / "meta.sqlite")  # as a collection from before FTS5
    conn.executescript(
        f"DROP TABLE {TABLE}; DROP TRIGGER items_fts_insert; DROP TRIGGER items_fts_delete;"
        "DROP TRIGGER items_fts_update;"
    )
    conn.close()
    with Collection.open(tmp_path / "old") as c:
        assert _uris(c.lexical_search("frog", k=5)) == ["/m/frog.png"]
