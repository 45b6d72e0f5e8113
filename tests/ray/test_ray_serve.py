"""Sharded search with one Ray actor per shard (``mm serve --ray``): the same answers as in process, ids
that route, and a killed shard actor answered 503 (or a marked partial answer) until Ray restarts it."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.sharded import ShardedCollection, ShardUnavailable, split_id
from index.types import Filter, Item

SHARDS = 3
DIM = 16
N = 90


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int) -> list[Item]:
    mods = ("image", "audio", "text")
    return [
        Item(id=0, modality=mods[i % 3], uri=f"/lib/{i}.dat", sha256=f"s{i}", caption=f"item {i}")
        for i in range(n)
    ]


class VectorsOnly:
    """The collection's model as far as vector queries go (they never reach an encoder)."""

    dim, model_id, modalities, media = DIM, "f", ("text",), None

    def encode_text(self, texts):
        raise AssertionError("vector queries are not encoded")

    encode_image = encode_audio = encode_text


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 3-shard collection on disk (exact: Flat), its vectors and global ids."""
    path = tmp_path_factory.mktemp("ray-serve") / "sh"
    x = unit(N, seed=4)
    with ShardedCollection.create(path, shards=SHARDS, dim=DIM, embedder_id="f") as sc:
        gids = sc.add(x, items(N))
    return path, x, gids


@pytest.fixture(scope="module")
def served(built, ray_cluster):
    from service.distributed.shards import open_ray_sharded

    path = built[0]
    t0 = time.perf_counter()
    coll = open_ray_sharded(path, ray_cluster, deadline_s=10.0)
    coll.start_s = time.perf_counter() - t0
    yield coll
    coll.close()


def wait_complete(coll: ShardedCollection, q: np.ndarray, timeout: float = 90.0) -> float:
    """Seconds until every shard answers again."""
    t0 = time.monotonic()
    while True:
        try:
            coll.search(q, k=3)
            return time.monotonic() - t0
        except ShardUnavailable:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.5)


def test_search_over_actors_equals_in_process(built, served):
    path, x, gids = built
    assert all(type(s).__name__ == "RayShard" for s in served.shards)
    q = unit(6, seed=5)
    with ShardedCollection.open(path, readonly=True) as local:
        for flt, offset in ((None, 0), (None, 4), (Filter(modalities=["image", "text"]), 2)):
            a = local.search(q, k=7, filter=flt, offset=offset)
            b = served.search(q, k=7, filter=flt, offset=offset)
            for ra, rb in zip(a, b, strict=True):
                assert [h.id for h in ra] == [h.id for h in rb]
                np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], atol=1e-6)
    g = next(g for g in gids if split_id(g)[0] == 2)
    assert served.get(g).uri == local_uri(gids, g) and served.get(g).id == g
    np.testing.assert_allclose(served.vector(g), x[gids.index(g)], atol=1e-6)
    like = served.search(served.vector(g), k=4, filter=Filter(exclude_ids=[g]))[0]
    assert len(like) == 4 and g not in [h.id for h in like]
    assert served.count() == N


def local_uri(gids: list[int], g: int) -> str:
    return f"/lib/{gids.index(g)}.dat"


def test_writes_and_deletes_go_to_the_owning_actor(served):
    v = unit(1, seed=9)
    (g,) = served.upsert(v, [Item(id=0, modality="text", uri="/lib/new.txt", sha256="new", caption="new")])
    assert served.get(g).uri == "/lib/new.txt" and served.search(v[0], k=1)[0][0].id == g
    assert served.delete([g]) == 1 and served.get(g) is None


def test_a_killed_shard_actor_is_named_then_comes_back(served, ray_cluster):
    import ray

    q = unit(1, seed=6)[0]
    victim = served.shards[1]
    before = victim.info()["pid"]
    ray.kill(victim.actor, no_restart=False)  # as a crash: Ray restarts it (max_restarts)
    try:  # the call the kill cut short names the shard; Ray may also have restarted it already
        hits = served.search(q, k=5)
    except ShardUnavailable as err:
        assert set(err.shards) == {1} and "actor" in err.shards[1] and "shard 1" in str(err)
    else:
        assert len(hits[0]) == 5  # already back: a whole answer, never a silently short one
    partial = served.search_shards(q, k=5, allow_partial=True)  # down still, or already back
    assert set(partial.failed) <= {1} and len(partial.hits[0]) == 5
    assert not partial.partial or all(split_id(h.id)[0] != 1 for h in partial.hits[0])
    recovery_s = wait_complete(served, q)
    assert victim.info()["pid"] != before  # a new incarnation, its shard reopened from disk
    assert served.count() == N and recovery_s < 90


def test_the_service_over_ray_actors(built, served, ray_cluster, tmp_path):
    """``mm serve --ray``: the app opens the actors itself; a killed one is a 503 or a partial answer."""
    import ray

    from service.app import create_app
    from service.settings import Settings

    path, x, gids = built
    served.close()  # one set of actors per collection: the app starts its own
    emb = VectorsOnly()
    settings = Settings(collection=path, ray_address=ray_cluster, shard_deadline_s=5.0, media_dir=tmp_path)
    with TestClient(create_app(settings, embedder=emb)) as c:
        body = {"vector": x[10].tolist(), "mode": "vector", "k": 3}
        first = c.post("/search", json=body).json()["results"]
        assert first[0]["id"] == gids[10] and first[0]["score"] == pytest.approx(1.0, abs=1e-5)
        owner = split_id(gids[10])[0]
        assert c.get(f"/items/{gids[10]}").json()["uri"] == "/lib/10.dat"
        ray.kill(c.app.state.collection.shards[owner].actor, no_restart=False)
        resp = c.post("/search", json=body | {"allow_partial": True})
        assert resp.status_code == 200, resp.text
        found = [r["id"] for r in resp.json()["results"]]
        if resp.json().get("partial"):  # the kill cut this call short: marked, and the owner is missing
            assert list(resp.json()["missing_shards"]) == [str(owner)]
            assert gids[10] not in found
        else:  # Ray had already restarted the actor: a whole answer
            assert found[0] == gids[10]
        wait_complete(c.app.state.collection, x[0])
        assert c.post("/search", json=body).json()["results"][0]["id"] == gids[10]


def test_actors_that_cannot_be_placed_are_a_one_line_error(built, ray_cluster, monkeypatch):
    from service.distributed import RayUnavailable, shards

    monkeypatch.setattr(shards, "START_TIMEOUT_S", 3.0)
    with pytest.raises(RayUnavailable, match="8 CPU per shard"):  # no node has 8 CPUs
        shards.open_ray_sharded(built[0], ray_cluster, actor_cpus=8)
