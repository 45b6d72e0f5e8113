"""index.sharded: S in-process shards behave as one collection (ids, search, writes, failures)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from index.collection import Collection
from index.sharded import (
    ID_BITS,
    ShardedCollection,
    ShardUnavailable,
    global_id,
    is_sharded,
    shard_of,
    split_id,
)
from index.types import Filter, Item

DIM = 16


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, start: int = 0) -> list[Item]:
    mods = ("image", "audio", "text")
    return [
        Item(
            id=0,
            modality=mods[i % 3],
            uri=f"/lib/{i}.dat",
            sha256=f"s{i}",
            caption=f"item number {i} {'red' if i % 2 else 'blue'}",
            created_at=1000.0 + i,
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
def pair(tmp_path):
    """The same 120 items in one collection and in 3 shards (both exact: Flat)."""
    x = unit(120, seed=1)
    single = Collection.create(tmp_path / "one", dim=DIM, embedder_id="f")
    single.add(x, items(120))
    sharded = ShardedCollection.create(tmp_path / "sh", shards=3, dim=DIM, embedder_id="f")
    gids = sharded.add(x, items(120))
    yield single, sharded, x, gids
    single.close()
    sharded.close()


def test_shard_of_is_stable_and_ids_round_trip():
    assert shard_of("/a/b.jpg", 7) == shard_of("/a/b.jpg", 7)  # no per-process hash seed
    spread = np.bincount([shard_of(f"/m/{i}", 4) for i in range(4000)], minlength=4)
    assert spread.min() > 800  # roughly even
    g = global_id(5, 123)
    assert g == (5 << ID_BITS) + 123 and split_id(g) == (5, 123) and global_id(0, 9) == 9


def test_items_go_to_the_shard_their_uri_hashes_to(pair):
    _, sharded, _, gids = pair
    assert is_sharded(sharded.path) and sharded.count() == 120
    for i, g in enumerate(gids):
        shard, local = split_id(g)
        assert shard == shard_of(f"/lib/{i}.dat", 3)
        assert sharded.shards[shard].get(local).uri == f"/lib/{i}.dat"
    assert sorted(c.count() for c in sharded.shards) != [0, 0, 120]


def test_sharded_search_equals_one_collection(pair):
    single, sharded, x, _ = pair
    q = unit(15, seed=2)
    for flt, offset in (
        (None, 0),
        (None, 5),
        (Filter(modalities=["image", "text"]), 0),
        (Filter(since=1030.0, until=1090.0), 3),
    ):
        a = single.search(q, k=8, filter=flt, offset=offset)
        b = sharded.search(q, k=8, filter=flt, offset=offset)
        for ra, rb in zip(a, b, strict=True):
            assert [h.item.uri for h in ra] == [h.item.uri for h in rb]
            np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], atol=1e-6)
            assert all(h.id == h.item.id and sharded.get(h.id).uri == h.item.uri for h in rb)


def test_get_vector_delete_and_more_like_this_by_global_id(pair):
    _, sharded, x, gids = pair
    g = gids[42]
    assert split_id(g)[0] > 0 or split_id(gids[43])[0] > 0  # some ids carry a shard number
    assert sharded.get(g).uri == "/lib/42.dat" and sharded.get(g).id == g
    np.testing.assert_allclose(sharded.vector(g), x[42], atol=1e-6)
    hits = sharded.search(sharded.vector(g), k=3, filter=Filter(exclude_ids=[g]))[0]
    assert g not in [h.id for h in hits] and len(hits) == 3
    assert sharded.find_by_uri("/lib/42.dat").id == g
    assert sharded.delete([g, gids[7], (99 << ID_BITS) | 1]) == 2
    assert sharded.get(g) is None and sharded.count() == 118
    assert sharded.search(x[42], k=1)[0][0].id != g
    assert sharded.get(-1) is None and sharded.vector((99 << ID_BITS) | 1) is None


def test_upsert_keeps_the_global_id_and_items_page_in_id_order(pair):
    _, sharded, x, gids = pair
    again = sharded.upsert(-x[10:11], [dataclasses.replace(items(1, start=10)[0])])
    assert again == [gids[10]] and sharded.search(-x[10], k=1)[0][0].id == gids[10]
    listed = sharded.items(limit=1000)
    assert [it.id for it in listed] == sorted(gids)
    assert [it.id for it in sharded.items(limit=25, offset=30)] == sorted(gids)[30:55]
    assert sharded.stats()["items"] == 120 and sharded.stats()["shards"] == 3
    with pytest.raises(ValueError, match="uri or a sha256"):
        sharded.add(x[:1], [dataclasses.replace(items(1)[0], uri="", sha256="")])
    (by_content,) = sharded.add(x[:1], [dataclasses.replace(items(1)[0], uri="")])  # a text: by sha256
    assert split_id(by_content)[0] == shard_of("s0", 3)
    assert {it.id for it in sharded.find_by_sha256("s0")} == {gids[0], by_content}


def test_a_failed_shard_is_named_unless_partial_answers_are_allowed(pair, monkeypatch):
    _, sharded, x, gids = pair

    def broken(*a, **kw):
        raise OSError("disk gone")

    monkeypatch.setattr(sharded.shards[1], "search", broken)
    with pytest.raises(ShardUnavailable, match="shard 1") as err:
        sharded.search(x[0], k=5)
    assert set(err.value.shards) == {1}
    ans = sharded.search_shards(x[:2], k=5, allow_partial=True)
    assert ans.partial and set(ans.failed) == {1}
    assert all(split_id(h.id)[0] != 1 for row in ans.hits for h in row) and len(ans.hits[0]) == 5


def test_a_late_shard_misses_the_deadline(pair, monkeypatch):
    _, sharded, x, _ = pair
    real = sharded.shards[2].search

    def slow(*a, **kw):
        time.sleep(0.5)
        return real(*a, **kw)

    monkeypatch.setattr(sharded.shards[2], "search", slow)
    t = time.monotonic()
    with pytest.raises(ShardUnavailable, match="shard 2"):
        sharded.search_shards(x[0], k=5, deadline_s=0.1)
    assert time.monotonic() - t < 0.45
    ans = sharded.search_shards(x[0], k=5, deadline_s=0.1, allow_partial=True)
    assert ans.failed.keys() == {2} and "0.100" in ans.failed[2]


def test_reopen_and_lexical_search_merge(tmp_path):
    x = unit(30, seed=3)
    with ShardedCollection.create(tmp_path / "s", shards=4, dim=DIM, embedder_id="f") as sc:
        gids = sc.add(x, items(30))
    with ShardedCollection.open(tmp_path / "s", readonly=True) as sc:
        assert sc.count() == 30 and sc.search(x[17], k=1)[0][0].id == gids[17]
        hits = sc.lexical_search("red", k=50)
        assert {sc.get(h.id).uri for h in hits} == {f"/lib/{i}.dat" for i in range(1, 30, 2)}
    with pytest.raises(ValueError, match="4 shards"):
        ShardedCollection.open_or_create(tmp_path / "s", shards=2, dim=DIM, embedder_id="f")


def test_sharded_ingest_equals_single_ingest_and_resumes(tmp_path, media_root):
    from conftest import FakeEmbedder

    from index.ingest import ingest
    from index.sharded import ingest_sharded

    emb = FakeEmbedder()
    with Collection.create(tmp_path / "one", dim=emb.dim, embedder_id=emb.model_id) as one:
        r1 = ingest(one, emb, [media_root], progress=False)
        ids, vecs = one.all_vectors()
        single = {one.get(int(i)).uri: v for i, v in zip(ids, vecs, strict=True)}
        single_errors = {e.uri for e in one.errors()}
    sc = ShardedCollection.create(tmp_path / "sh", shards=3, dim=emb.dim, embedder_id=emb.model_id)
    r2 = ingest_sharded(sc, emb, [media_root], progress=False)
    assert (r2.added, r2.failed, r2.seen) == (r1.added, r1.failed, r1.seen) and r2.added > 3
    gids, gvecs = sc.all_vectors()
    sharded = {sc.get(int(g)).uri: v for g, v in zip(gids, gvecs, strict=True)}
    assert sharded.keys() == single.keys()
    for uri, v in sharded.items():
        np.testing.assert_allclose(v, single[uri], atol=1e-6)
    assert {e.uri for c in sc.shards for e in c.errors()} == single_errors
    # every file sits in the shard its uri hashes to (which shards that fills depends on tmp_path's name)
    assert all(split_id(int(g))[0] == shard_of(sc.get(int(g)).uri, 3) for g in gids)
    assert sum(c.count() for c in sc.shards) == len(single)
    again = ingest_sharded(sc, emb, [media_root], progress=False)
    assert again.added == again.updated == 0 and again.skipped >= r2.added  # unchanged files skipped
    sc.close()
    with pytest.raises(ValueError, match="unsharded"):
        ShardedCollection.create(tmp_path / "one", shards=2, dim=emb.dim, embedder_id=emb.model_id)
