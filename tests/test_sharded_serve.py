"""``mm serve`` of a sharded collection (in process): the same answers as one collection, global ids,
routed writes, and a failed or late shard answered 503 naming it, or partial when the request allows."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from conftest import image_bytes, wait_job
from fastapi.testclient import TestClient

from index.sharded import ShardedCollection, shard_of, split_id
from service.app import create_app
from service.settings import Settings

SHARDS = 3


def _serve(root: Path, media_root: Path, embedder, **kw) -> TestClient:
    settings = Settings(collection=root, allowed_roots=[media_root], **kw)
    return TestClient(create_app(settings, embedder=embedder))


def _ingest(client: TestClient, media_root: Path) -> dict:
    resp = client.post("/ingest", json={"path": str(media_root)})
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["id"])
    assert job["status"] == "done", job
    return job


@pytest.fixture(scope="module")
def pair(tmp_path_factory, media_root, embedder):
    """The fixture folder served from one collection and from 3 shards (both exact: Flat)."""
    root = tmp_path_factory.mktemp("sharded-serve")
    ShardedCollection.create(
        root / "sh", shards=SHARDS, dim=embedder.dim, embedder_id=embedder.model_id
    ).close()
    with (
        _serve(root / "one", media_root, embedder) as one,
        _serve(root / "sh", media_root, embedder, shard_deadline_s=5.0) as sh,  # roomy on a busy machine
    ):
        job_one, job_sh = _ingest(one, media_root), _ingest(sh, media_root)
        assert (job_sh["added"], job_sh["failed"]) == (job_one["added"], job_one["failed"])
        yield one, sh


def search(client: TestClient, **body) -> dict:
    resp = client.post("/search", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def by_uri(client: TestClient) -> dict[str, int]:
    return {i["uri"]: i["id"] for i in client.get("/items", params={"limit": 1000}).json()["items"]}


def test_the_items_spread_over_the_shards_with_global_ids(pair):
    one, sh = pair
    ids = by_uri(sh)
    assert ids.keys() == by_uri(one).keys()
    assert {split_id(g)[0] for g in ids.values()} == set(range(SHARDS))
    assert all(split_id(g)[0] == shard_of(uri, SHARDS) for uri, g in ids.items())
    stats = sh.get("/stats").json()
    assert stats["count"] == len(ids) and stats["collection"]["shards"] == SHARDS
    assert sh.get("/health").json()["items"] == len(ids)


@pytest.mark.parametrize(
    "body",
    [
        {"query": "a red circle", "mode": "vector", "k": 8},
        {"query": "a red circle", "mode": "vector", "k": 4, "offset": 3},
        {"query": "sound", "mode": "vector", "k": 5, "modalities": ["image", "text"]},
    ],
)
def test_sharded_vector_search_equals_one_collection(pair, body):
    one, sh = pair
    a, b = search(one, **body)["results"], search(sh, **body)["results"]
    assert [r["uri"] for r in a] == [r["uri"] for r in b] and len(a) == body["k"]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def test_keyword_and_hybrid_find_the_same_items(pair):
    one, sh = pair
    for mode in ("keyword", "hybrid"):  # BM25 uses each shard's term statistics: the set, not the order
        a = search(one, query="circle", mode=mode, k=100)["results"]
        b = search(sh, query="circle", mode=mode, k=100)["results"]
        assert {r["uri"] for r in a} == {r["uri"] for r in b} and a


def test_get_more_like_this_thumbnail_and_delete_by_global_id(pair):
    one, sh = pair
    ids, single = by_uri(sh), by_uri(one)
    # a picture in a shard past 0 when one is there (which shard a file lands in hangs on tmp_path's name)
    pngs = sorted(((u, g) for u, g in ids.items() if u.endswith(".png")), key=lambda ug: -split_id(ug[1])[0])
    uri, gid = pngs[0]
    item = sh.get(f"/items/{gid}").json()
    assert item["id"] == gid and item["uri"] == uri and item["thumbnail_url"] == f"/items/{gid}/thumbnail"
    assert sh.get(f"/items/{gid}/thumbnail").headers["content-type"] == "image/jpeg"
    assert sh.get(f"/items/{gid}/media").content == Path(uri).read_bytes()
    like = search(sh, item_id=gid, mode="vector", k=5)["results"]
    like_one = search(one, item_id=single[uri], mode="vector", k=5)["results"]
    assert gid not in [r["id"] for r in like] and [r["uri"] for r in like] == [r["uri"] for r in like_one]
    missing = (SHARDS + 5 << 48) | 1  # a shard this collection does not have
    assert sh.get(f"/items/{missing}").status_code == 404
    # a text item added here, then deleted by its global id
    resp = sh.post("/items/text", json={"text": "a note about whales", "tags": ["sea"]})
    assert resp.status_code == 201, resp.text
    tid = resp.json()["id"]
    sha = hashlib.sha256(b"a note about whales").hexdigest()
    assert split_id(tid)[0] == shard_of(sha, SHARDS)  # a text without a uri goes by its content
    assert sh.post("/items/text", json={"text": "a note about whales"}).json()["id"] == tid  # deduplicated
    assert search(sh, query="whales", mode="keyword", k=3)["results"][0]["id"] == tid
    before = sh.get("/stats").json()["count"]
    assert sh.delete(f"/items/{tid}").json() == {"deleted": tid}
    assert sh.get(f"/items/{tid}").status_code == 404 and sh.get("/stats").json()["count"] == before - 1


def test_an_upload_is_written_to_the_shard_its_path_hashes_to(pair):
    _, sh = pair
    resp = sh.post(
        "/items",
        files={"file": ("new.png", image_bytes((10, 200, 30), "square"), "image/png")},
        data={"tags": "up"},
    )
    assert resp.status_code == 201, resp.text
    item = resp.json()
    assert split_id(item["id"])[0] == shard_of(item["uri"], SHARDS)
    coll = sh.app.state.collection
    assert coll.shards[split_id(item["id"])[0]].get(split_id(item["id"])[1]).uri == item["uri"]
    assert sh.get(f"/items/{item['id']}").json()["tags"] == ["up"]
    assert sh.delete(f"/items/{item['id']}").status_code == 200
    assert not Path(item["uri"]).exists()  # the stored upload goes with its item


def _break(monkeypatch, client: TestClient, shard: int, method: str = "search", delay: float = 0.0) -> None:
    real = getattr(client.app.state.collection.shards[shard], method)

    def broken(*a, **kw):
        if delay:
            time.sleep(delay)
            return real(*a, **kw)
        raise OSError("disk gone")

    monkeypatch.setattr(client.app.state.collection.shards[shard], method, broken)


@pytest.mark.parametrize("fast", [True, False])
def test_a_failed_shard_is_a_503_naming_it_unless_partial_is_allowed(pair, monkeypatch, fast):
    _, sh = pair
    monkeypatch.setattr(sh.app.fast_search, "enabled", fast)  # the fast path and the route answer alike
    _break(monkeypatch, sh, 1)
    resp = sh.post("/search", json={"query": "a red circle", "mode": "vector"})
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["code"] == "shard_unavailable" and "shard 1" in err["message"]
    assert set(err["shards"]) == {"1"} and "disk gone" in err["shards"]["1"]
    body = search(sh, query="a red circle", mode="vector", k=10, allow_partial=True)
    assert body["partial"] is True and set(body["missing_shards"]) == {"1"}
    assert body["results"] and all(split_id(r["id"])[0] != 1 for r in body["results"])
    complete = search(sh, query="a red circle", mode="keyword", allow_partial=True)  # words: shard 1 is fine
    assert complete["partial"] is False and "missing_shards" not in complete


def test_a_broken_shard_fails_keyword_search_and_the_websocket_too(pair, monkeypatch):
    _, sh = pair
    _break(monkeypatch, sh, 2, "lexical_search")
    resp = sh.post("/search", json={"query": "circle", "mode": "hybrid"})
    assert resp.status_code == 503 and "shard 2" in resp.json()["error"]["message"]
    assert search(sh, query="circle", mode="hybrid", allow_partial=True)["missing_shards"].keys() == {"2"}
    with sh.websocket_connect("/ws") as ws:
        ws.send_json({"type": "search", "id": "a", "query": "circle", "mode": "keyword"})
        err = ws.receive_json()
        assert (err["type"], err["status"], err["code"]) == ("error", 503, "shard_unavailable")
        assert "shard 2" in err["message"]
        ws.send_json(
            {"type": "search", "id": "b", "query": "circle", "mode": "keyword", "allow_partial": True}
        )
        res = ws.receive_json()
        assert res["type"] == "results" and res["partial"] is True and list(res["missing_shards"]) == ["2"]


def test_a_late_shard_misses_the_deadline(pair, monkeypatch):
    _, sh = pair
    monkeypatch.setattr(sh.app.state.collection, "deadline_s", 0.5)  # as MM_SHARD_DEADLINE_S=0.5
    _break(monkeypatch, sh, 0, delay=1.5)
    t0 = time.monotonic()
    resp = sh.post("/search", json={"query": "a red circle", "mode": "vector"})
    assert resp.status_code == 503 and "no answer within 0.500s" in resp.json()["error"]["shards"]["0"]
    assert time.monotonic() - t0 < 1.4  # the deadline, not the slow shard
    body = search(sh, query="a red circle", mode="vector", allow_partial=True)
    assert body["partial"] and list(body["missing_shards"]) == ["0"]


def test_a_write_to_a_broken_shard_fails_whole(pair, monkeypatch):
    _, sh = pair
    text = "a write that cannot land"
    target = shard_of(hashlib.sha256(text.encode()).hexdigest(), SHARDS)
    _break(monkeypatch, sh, target, "add")
    before = sh.get("/stats").json()["count"]
    resp = sh.post("/items/text", json={"text": text})
    assert resp.status_code == 500  # never stored elsewhere, never reported as stored
    assert sh.get("/stats").json()["count"] == before
    found = search(sh, query="cannot land", mode="keyword", k=100)["results"]
    assert all(r["caption"] != text for r in found)


def test_serve_ray_needs_a_sharded_collection(tmp_path, capsys):
    from service.cli import main

    assert main(["serve", "--ray", "local", "--collection", str(tmp_path / "plain")]) == 2
    assert "not one" in capsys.readouterr().err and not (tmp_path / "plain").exists()


def test_a_file_search_takes_allow_partial_too(pair, monkeypatch):
    _, sh = pair
    _break(monkeypatch, sh, 0)
    upload = {"file": ("q.png", image_bytes((200, 30, 30), "circle"), "image/png")}
    resp = sh.post("/search/upload", files=upload, data={"mode": "vector"})
    assert resp.status_code == 503 and set(resp.json()["error"]["shards"]) == {"0"}
    resp = sh.post("/search/upload", files=upload, data={"mode": "vector", "allow_partial": "true"})
    assert resp.status_code == 200 and resp.json()["partial"] is True
    assert all(split_id(r["id"])[0] != 0 for r in resp.json()["results"])


def test_commands_for_one_collection_refuse_a_sharded_folder_untouched(tmp_path):
    from service.store import open_collection, open_served

    ShardedCollection.create(tmp_path / "s", shards=2, dim=8, embedder_id="f").close()
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    with pytest.raises(ValueError, match="sharded collection"):
        open_collection(tmp_path / "s", create=True)  # no meta.sqlite beside the shards
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before
    with open_served(tmp_path / "s", readonly=True) as coll:
        assert isinstance(coll, ShardedCollection) and coll.count() == 0


def test_mm_search_reads_the_shards_and_allows_partial(pair, monkeypatch, capsys, embedder):
    import json

    from index.collection import Collection
    from service import embedding
    from service.cli import main

    _, sh = pair
    monkeypatch.setattr(embedding, "load_embedder", lambda name="default": embedder)
    root = sh.app.state.settings.collection
    argv = ["search", "a red circle", "--collection", str(root), "--local", "--json", "--mode", "vector"]
    assert main(argv) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {split_id(r["id"])[0] for r in whole["results"]} == set(range(SHARDS)) and "partial" not in whole
    real = Collection.search

    def failing(self, *a, **kw):  # shard 1's disk, in the CLI's own process-wide open of the shards
        if self.path.name == "shard-001":
            raise OSError("disk gone")
        return real(self, *a, **kw)

    monkeypatch.setattr(Collection, "search", failing)
    assert main(argv) == 1 and "shard 1" in capsys.readouterr().err  # one line, no results
    assert main([*argv, "--allow-partial"]) == 0
    out, err = capsys.readouterr()
    body = json.loads(out.strip().splitlines()[-1])
    assert body["partial"] is True and "partial results" in err and "shard 1" in err
    assert body["results"] and all(split_id(r["id"])[0] != 1 for r in body["results"])


def test_serve_ray_without_ray_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import sys

    from service.cli import main

    ShardedCollection.create(tmp_path / "s", shards=2, dim=8, embedder_id="f").close()
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert main(["serve", "--ray", "local", "--collection", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "mm: error: Ray is not installed: pip install 'mm[ray]'"
