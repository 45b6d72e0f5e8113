"""Collections: FAISS + SQLite together, ids, filters, repair, index types, concurrency (no model needed)."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import threading

import numpy as np
import pytest

from index.collection import SIDECAR_FILE, VECTORS_FILE, Collection
from index.types import Filter, Item
from index.vectors import IndexPolicy, build_index, choose_spec

DIM = 16


def unit(n: int, seed: int = 0, dim: int = DIM, clusters: int = 0) -> np.ndarray:
    """(n, dim) L2-normalised float32 vectors; with ``clusters`` grouped like real embeddings."""
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.standard_normal((clusters, dim))
        x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    else:
        x = rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, start: int = 0, **kw) -> list[Item]:
    modalities = ("image", "audio", "text")
    return [
        Item(
            id=-1,
            modality=kw.get("modality") or modalities[(start + i) % 3],
            uri=f"/data/{'a' if (start + i) % 2 else 'b'}/f{start + i}",
            sha256=f"sha{start + i}",
            tags=kw.get("tags", ["even"] if (start + i) % 2 == 0 else ["odd"]),
            created_at=1000.0 + start + i,
        )
        for i in range(n)
    ]


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


@pytest.fixture
def coll(tmp_path):
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="fake:1")
    yield c
    c.close()


def test_add_search_get_delete(coll):
    x = unit(30)
    ids = coll.add(x, items(30))
    assert ids == sorted(ids) and len(set(ids)) == 30
    hits = coll.search(x[5], k=3)[0]
    assert hits[0].id == ids[5] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].item.uri == "/data/a/f5" and hits[0].item.tags == ["odd"]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    two = coll.search(x[:2], k=4)
    assert len(two) == 2 and two[1][0].id == ids[1]
    np.testing.assert_allclose(coll.vector(ids[7]), x[7], rtol=1e-6)
    assert coll.get(ids[3]).sha256 == "sha3" and coll.find_by_uri("/data/b/f4").id == ids[4]
    assert [it.id for it in coll.find_by_sha256("sha9")] == [ids[9]]
    assert coll.delete([ids[5], ids[6], 10**9]) == 2
    assert coll.get(ids[5]) is None and coll.vector(ids[5]) is None and coll.count() == 28
    assert all(h.id != ids[5] for h in coll.search(x[5], k=10)[0])
    assert [it.id for it in coll.items(limit=3)] == ids[:3]
    assert coll.count("image") == sum(1 for i in range(30) if i % 3 == 0 and i not in (5, 6))
    offset = coll.search(x[0], k=3, offset=2)[0]
    assert [h.id for h in offset] == [h.id for h in coll.search(x[0], k=5)[0]][2:5]
    with pytest.raises(ValueError, match="shape"):
        coll.add(unit(2, dim=DIM + 1), items(2))
    with pytest.raises(ValueError, match="queries"):
        coll.search(np.zeros(DIM + 1, np.float32))


def test_ids_stable_across_reopen_and_never_reused(tmp_path):
    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="fake:1") as c:
        ids = c.add(unit(5), items(5))
        c.delete([ids[-1]])  # the highest id: AUTOINCREMENT must still not hand it out again
    with Collection.open(path) as c:
        assert c.get(ids[2]).uri == "/data/b/f2"
        new = c.add(unit(2, seed=1), items(2, start=10))
        assert min(new) > max(ids)
        assert c.search(unit(5)[3], k=1)[0][0].id == ids[3]


@pytest.mark.parametrize("spec", ["Flat", "HNSW32", "IVF16,SQ8"])
def test_filters_return_k_after_filtering(tmp_path, spec):
    x = unit(800, seed=2, clusters=8)
    # exact_max=0 makes every filtered search go through the FAISS IDSelector
    c = Collection.create(
        tmp_path / "c", dim=DIM, embedder_id="f", index_spec=spec, policy=IndexPolicy(exact_max=0)
    )
    its = items(800)
    for i in range(0, 800, 100):  # 8 of 800 (1%) carry a rare tag
        its[i].tags = ["rare", "even"]
    ids = c.add(x, its)
    assert c.stats()["index"] == spec
    q = unit(3, seed=3)

    rare = c.search(q, k=5, filter=Filter(tags=["rare"]))
    assert all(len(r) == 5 and all("rare" in h.item.tags for h in r) for r in rare)
    exact = Filter(tags=["rare", "even"])
    assert {h.id for h in c.search(q[0], k=50, filter=exact)[0]} == {ids[i] for i in range(0, 800, 100)}

    audio = c.search(q, k=10, filter=Filter(modalities=["audio"]))
    assert all(len(r) == 10 and all(h.item.modality == "audio" for h in r) for r in audio)
    prefix = c.search(q[0], k=10, filter=Filter(path_prefix="/data/a/"))[0]
    assert len(prefix) == 10 and all(h.item.uri.startswith("/data/a/") for h in prefix)
    window = c.search(q[0], k=10, filter=Filter(since=1100.0, until=1119.0))[0]
    assert len(window) == 10 and all(1100 <= h.item.created_at <= 1119 for h in window)
    combo = c.search(q[0], k=5, filter=Filter(modalities=["text"], tags=["odd"], path_prefix="/data/a"))[0]
    assert len(combo) == 5 and all(h.item.modality == "text" and "odd" in h.item.tags for h in combo)
    top = c.search(x[7], k=3)[0]
    assert top[0].id == ids[7]
    no_self = c.search(x[7], k=3, filter=Filter(exclude_ids=[ids[7]]))[0]
    assert ids[7] not in {h.id for h in no_self} and len(no_self) == 3
    assert c.search(q[0], k=5, filter=Filter(tags=["nope"]))[0] == []
    with pytest.raises(ValueError, match="since"):
        c.search(q[0], filter=Filter(since=5.0, until=1.0))
    c.close()


def test_small_filtered_set_is_scored_exactly(tmp_path):
    x = unit(600, seed=4, clusters=6)
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", index_spec="HNSW32")
    its = items(600)
    its[123].tags = ["only"]
    ids = c.add(x, its)
    hits = c.search(unit(1, seed=9), k=5, filter=Filter(tags=["only"]))[0]
    assert [h.id for h in hits] == [ids[123]]
    assert hits[0].score == pytest.approx(float(unit(1, seed=9)[0] @ x[123]), abs=1e-5)
    c.close()


@pytest.mark.parametrize("spec", ["Flat", "HNSW32"])
def test_upsert_keeps_id_and_replaces_vector(tmp_path, spec):
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", index_spec=spec)
    x = unit(20, seed=5)
    ids = c.add(x, items(20))
    new_vec = unit(1, seed=77)
    replacement = Item(id=0, modality="image", uri="/data/a/f3", sha256="new", caption="changed")
    created = c.get(ids[3]).created_at
    assert c.upsert(new_vec, [replacement]) == [ids[3]]
    got = c.get(ids[3])
    assert got.sha256 == "new" and got.caption == "changed" and got.created_at == created
    assert c.count() == 20
    np.testing.assert_allclose(c.vector(ids[3]), new_vec[0], rtol=1e-6)
    assert c.search(new_vec, k=1)[0][0].id == ids[3]
    # the old vector is gone: querying it does not return ids[3] with score ~1
    assert all(not (h.id == ids[3] and h.score > 0.999) for h in c.search(x[3], k=20)[0])
    assert len({h.id for h in c.search(x[3], k=20)[0]}) == 20
    fresh = c.upsert(unit(1, seed=8), [Item(id=0, modality="text", uri="/new", sha256="n")])
    assert fresh[0] > max(ids)
    c.close()
    with Collection.open(tmp_path / "c") as c2:
        assert c2.search(new_vec, k=1)[0][0].id == ids[3] and c2.count() == 21


def test_restart_keeps_everything(tmp_path, caplog):
    path = tmp_path / "c"
    x = unit(40, seed=6)
    with Collection.create(path, dim=DIM, embedder_id="fake:1") as c:
        c.add(x, items(40))
        c.record_error("/data/bad.png", "cannot decode image", "image")
        c.set_meta("adapter", {"name": "lora-a", "rank": 8})
        before = [[h.id for h in r] for r in c.search(x[:5], k=5)]
        gen = c.generation
    with caplog.at_level(logging.WARNING, logger="index"):
        c = Collection.open(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert c.generation == gen and c.count() == 40
    assert [[h.id for h in r] for r in c.search(x[:5], k=5)] == before
    assert c.get_meta("adapter") == {"name": "lora-a", "rank": 8} and c.get_meta("missing", 3) == 3
    stats = c.stats()
    assert stats["errors"] == 1 and stats["items"] == 40 and stats["ntotal"] == 40 and stats["bytes"] > 0
    assert (
        stats["embedder_id"] == "fake:1" and stats["dim"] == DIM and sum(stats["by_modality"].values()) == 40
    )
    assert [e.uri for e in c.errors()] == ["/data/bad.png"] and c.count("image") == 14
    assert len(c.items(limit=100, include_errors=True)) == 41
    ids, vecs = c.all_vectors()
    assert len(ids) == 40 and np.allclose(vecs, x, atol=1e-6)
    c.close()


def _grown_after_a_snapshot(tmp_path) -> tuple[Collection, np.ndarray, list[int]]:
    """An open HNSW32 collection of 60 vectors (``x``), the first deleted, whose FAISS files after the
    first 30 were copied to ``tmp_path/old.faiss`` and ``old.json`` (a stale file, once put back)."""
    path = tmp_path / "c"
    x = unit(60, seed=7)
    c = Collection.create(path, dim=DIM, embedder_id="f", index_spec="HNSW32")
    ids = c.add(x[:30], items(30))
    shutil.copy(path / VECTORS_FILE, tmp_path / "old.faiss")
    shutil.copy(path / SIDECAR_FILE, tmp_path / "old.json")
    ids += c.add(x[30:], items(30, start=30))
    c.delete([ids[0]])
    return c, x, ids


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_mismatch_is_repaired_from_sqlite_with_warning(tmp_path, caplog, damage):
    path = tmp_path / "c"
    c, x, ids = _grown_after_a_snapshot(tmp_path)
    c.close()
    if damage == "corrupt":
        (path / VECTORS_FILE).write_bytes(b"garbage" * 100)
    else:
        (path / VECTORS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="index"):
        c = Collection.open(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "rebuilding the FAISS index" in warnings[0]
    assert c.count() == 59 and c.stats()["ntotal"] == 59 and c.stats()["index"] == "HNSW32"
    assert c.search(x[45], k=1)[0][0].id == ids[45]
    assert all(h.id != ids[0] for h in c.search(x[0], k=10)[0])
    c.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="index"), Collection.open(path) as c:
        assert c.count() == 59  # the repair was saved: no second warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("readonly", [False, True])
def test_stale_file_catches_up_from_the_change_log_without_a_rebuild(tmp_path, caplog, monkeypatch, readonly):
    """Killed after the SQLite commit, before the FAISS write: the old file + the log are the index."""
    path = tmp_path / "c"
    c, x, ids = _grown_after_a_snapshot(tmp_path)
    with c:
        c.upsert(x[5:6] * -1, [dataclasses.replace(c.get(ids[5]), id=0)])  # same uri, new vector
    shutil.copy(tmp_path / "old.faiss", path / VECTORS_FILE)
    shutil.copy(tmp_path / "old.json", path / SIDECAR_FILE)

    def no_rebuild(*a, **kw):
        raise AssertionError("a stale file the change log covers must not be rebuilt")

    monkeypatch.setattr(Collection, "_rebuild_index", no_rebuild)
    with caplog.at_level(logging.WARNING, logger="index"):
        c = Collection.open(path, readonly=readonly)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert c.count() == 59 and c.stats()["ntotal"] == 59 and c.stats()["index"] == "HNSW32"
    assert c.search(x[45], k=1)[0][0].id == ids[45]
    assert c.search(-x[5], k=1)[0][0].id == ids[5]  # the upserted vector, not the one in the old file
    assert all(h.id != ids[0] for h in c.search(x[0], k=10)[0])
    report = c.check()
    assert report["faiss_live"] == 59 and not report["missing_in_faiss"] and not report["extra_in_faiss"]
    c.close()
    written = (path / SIDECAR_FILE).read_bytes() != (tmp_path / "old.json").read_bytes()
    assert written is not readonly  # a writable open saves the caught-up file; a read-only one cannot
    with Collection.open(path) as c:
        assert c.check()["disk_index"] == "current"


def test_stale_file_beyond_the_trimmed_log_is_rebuilt(tmp_path, caplog):
    path = tmp_path / "c"
    x = unit(40, seed=3)
    with Collection.create(path, dim=DIM, embedder_id="f") as c:
        c.add(x[:10], items(10))
        shutil.copy(path / VECTORS_FILE, tmp_path / "old.faiss")
        shutil.copy(path / SIDECAR_FILE, tmp_path / "old.json")
        for i in range(10, 40):
            c.add(x[i : i + 1], items(1, start=i))
        c.store.trim_changes(keep=5)  # the log no longer reaches back to the old file's generation
    shutil.copy(tmp_path / "old.faiss", path / VECTORS_FILE)
    shutil.copy(tmp_path / "old.json", path / SIDECAR_FILE)
    with caplog.at_level(logging.WARNING, logger="index"), Collection.open(path) as c:
        assert c.count() == 40 and c.stats()["ntotal"] == 40
        assert c.search(x[33], k=1)[0][0].item.uri == "/data/a/f33"
    assert any("rebuilding" in r.getMessage() for r in caplog.records)


def test_readonly_repair_stays_in_memory(tmp_path, caplog):
    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="f") as c:
        c.add(unit(10), items(10))
    (path / SIDECAR_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="index"), Collection.open(path, readonly=True) as c:
        assert c.search(unit(10)[4], k=1)[0][0].item.uri == "/data/b/f4"
        with pytest.raises(ValueError, match="read-only"):
            c.add(unit(1), items(1))
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert not (path / SIDECAR_FILE).exists()


def test_auto_index_switches_flat_to_hnsw_and_keeps_results(tmp_path):
    x = unit(300, seed=8, clusters=10)
    path = tmp_path / "c"
    c = Collection.create(path, dim=DIM, embedder_id="f", policy=IndexPolicy(flat_max=200))
    ids = c.add(x[:150], items(150))
    assert c.stats()["index"] == "Flat"
    q = unit(20, seed=9)
    assert [r[0].id for r in c.search(q, k=1)] == [ids[j] for j in exact_top(x[:150], q, 1)[:, 0]]
    ids += c.add(x[150:], items(150, start=150))
    assert c.stats()["index"] == "HNSW32" and c.stats()["ntotal"] == 300
    truth = exact_top(x, q, 10)
    got = c.search(q, k=10)
    recall = np.mean(
        [len({h.id for h in r} & {ids[j] for j in t}) / 10 for r, t in zip(got, truth, strict=True)]
    )
    assert recall >= 0.95
    top1 = [r[0].id for r in c.search(q, k=1)]
    assert np.mean([a == ids[j] for a, j in zip(top1, truth[:, 0], strict=True)]) >= 0.95
    c.close()
    with Collection.open(path) as c:
        assert c.stats()["index"] == "HNSW32" and c.count() == 300


@pytest.mark.parametrize("spec,min_recall", [("HNSW32", 0.95), ("IVF16,SQ8", 0.9), ("IVF16,PQ8", 0.6)])
def test_forced_factory_specs_recall_vs_flat(tmp_path, spec, min_recall):
    x = unit(1500, seed=10, dim=32, clusters=24)
    q = unit(50, seed=11, dim=32, clusters=24)
    c = Collection.create(tmp_path / "c", dim=32, embedder_id="f", index_spec=spec)
    ids = np.asarray(c.add(x[:100], items(100)) + c.add(x[100:], items(1400, start=100)))
    assert c.stats()["index"] == spec  # IVF waited for enough vectors to train, then switched
    truth = ids[exact_top(x, q, 10)]
    got = c.search(q, k=10)
    recall = np.mean([len({h.id for h in r} & set(t)) / 10 for r, t in zip(got, truth, strict=True)])
    assert recall >= min_recall, recall
    c.delete(ids[:10].tolist())
    assert c.count() == 1490 and all(h.id not in set(ids[:10]) for r in c.search(x[:10], k=5) for h in r)
    c.close()


def test_choose_spec_and_build_index():
    assert choose_spec(1000, 384, 1024) == "Flat"
    assert choose_spec(100_000, 384, 1024) == "HNSW32"
    assert choose_spec(2_000_000, 384, 1024).endswith(",SQ8")
    assert "PQ" in choose_spec(20_000_000, 384, 1024)
    idx = build_index("IVF16,SQ8", 8, unit(400, dim=8))
    assert idx.is_trained and idx.ntotal == 0
    with pytest.raises(ValueError, match="train"):
        build_index("IVF16,PQ4", 8, None)
    with pytest.raises(ValueError, match="factory"):
        build_index("NotAnIndex", 8)


def test_create_open_errors(tmp_path):
    with pytest.raises(ValueError, match="no collection"):
        Collection.open(tmp_path / "nothing")
    Collection.create(tmp_path / "c", dim=DIM, embedder_id="a").close()
    with pytest.raises(ValueError, match="already exists"):
        Collection.create(tmp_path / "c", dim=DIM, embedder_id="a")
    with pytest.raises(ValueError, match="holds vectors of"):
        Collection.open_or_create(tmp_path / "c", dim=DIM, embedder_id="b")
    Collection.open_or_create(tmp_path / "c", dim=DIM, embedder_id="a").close()
    with pytest.raises(ValueError, match="spec"):
        Collection.create(tmp_path / "d", dim=DIM, embedder_id="a", index_spec="Bogus99")


def test_two_writers_on_one_directory_see_each_other(tmp_path):
    """Two handles stand in for two processes: each write first catches up with the other's commits."""
    path = tmp_path / "c"
    a = Collection.create(path, dim=DIM, embedder_id="f")
    b = Collection.open(path)
    ids_a = a.add(unit(5, seed=1), items(5))
    ids_b = b.add(unit(5, seed=2), items(5, start=5))
    assert not set(ids_a) & set(ids_b) and b.count() == 10
    assert b.search(unit(5, seed=1)[2], k=1)[0][0].id == ids_a[2]
    assert a.refresh() and a.search(unit(5, seed=2)[1], k=1)[0][0].id == ids_b[1]
    a.close()
    b.close()


@pytest.mark.parametrize("spec", ["Flat", "HNSW32"])
def test_concurrent_readers_while_writing(tmp_path, spec):
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", index_spec=spec)
    first = c.add(unit(50, seed=1), items(50))
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        q = unit(4, seed=seed)
        try:
            while not stop.is_set():
                for r in c.search(q, k=5, filter=Filter(modalities=["image", "text"]) if seed % 2 else None):
                    assert len(r) == 5
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    with c.bulk():
        for i in range(15):
            c.add(unit(10, seed=100 + i), items(10, start=100 + 10 * i))
            c.delete([first[i]])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert c.count() == 50 + 150 - 15
    c.close()


def test_counts_read_the_vector_index_and_stay_right(tmp_path):
    """Counting items with vectors must not scan every row's vector BLOB (a /health call at 20k items
    took 11 ms that way): a partial index answers it, and stays right through errors and deletes."""
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="fake:1")
    try:
        ids = c.add(unit(30), items(30))
        c.record_error("/data/broken.png", "cannot decode", "image")  # an item without a vector
        c.delete(ids[:3])  # modalities cycle image, audio, text: one of each deleted
        assert c.count() == 27
        assert {m: c.count(m) for m in ("image", "audio", "text")} == {"image": 9, "audio": 9, "text": 9}
        assert c.stats()["by_modality"] == {"image": 9, "audio": 9, "text": 9}
        assert c.store.all_ids().tolist() == sorted(ids[3:])
        plans = [
            " ".join(str(r[-1]) for r in c.store.conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            for sql, args in (
                ("SELECT COUNT(*) FROM items WHERE vector IS NOT NULL", ()),
                ("SELECT COUNT(*) FROM items WHERE vector IS NOT NULL AND modality = ?", ("image",)),
                ("SELECT id FROM items WHERE vector IS NOT NULL", ()),  # all_ids
            )
        ]
        # a partial index over rows with a vector (small), never the table's rows with their 1.5 KB vectors
        assert all("items_with_vector" in p or "items_created_vec" in p for p in plans), plans
    finally:
        c.close()


# crash safety ---------------------------------------------------------------------------------------
# A child process creates a collection and SIGKILLs itself at one point of the creation; the parent then
# opens the folder as `mm index` / `mm serve` / `mm info` would.
_CREATE_AND_DIE = r"""
import os, signal, sys
from pathlib import Path
import index.atomic as atomic
import index.collection as c

path, point = Path(sys.argv[1]), sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "lock":  # the folder and its lock file exist, nothing else
    real_state = c._creation_state
    calls = []
    def state(p, **kw):
        calls.append(p)
        if len(calls) == 2:
            die()
        return real_state(p, **kw)
    c._creation_state = state
elif point == "hot-journal":  # killed inside SQLite's first write: a hot rollback journal is left
    def init(self, p, **kw):
        import sqlite3
        conn = sqlite3.connect(p)
        conn.isolation_level = None
        conn.execute("PRAGMA cache_size=1")  # spill the transaction to the file before its commit
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE filler(x BLOB)")
        for _ in range(100):
            conn.execute("INSERT INTO filler VALUES (?)", (os.urandom(2000),))
        die()
    c.MetaStore.__init__ = init
elif point in ("empty-db", "schema"):
    real_init = c.MetaStore.__init__
    def init(self, p, **kw):
        if point == "empty-db":  # killed while SQLite was creating the file
            Path(p).touch()
            die()
        real_init(self, p, **kw)
        die()
    c.MetaStore.__init__ = init
elif point == "config":
    real_set = c.MetaStore.set_meta
    def set_meta(self, key, value, conn=None):
        real_set(self, key, value, conn)
        if key == "config":
            die()
    c.MetaStore.set_meta = set_meta
else:  # killed inside the atomic write of one file, its temp file filled, before the rename
    target = {"vectors": c.VECTORS_FILE, "sidecar": c.SIDECAR_FILE, "json": c.CONFIG_FILE}[point]
    real_write = atomic.atomic_write
    def write(p, fill):
        if Path(p).name != target:
            return real_write(p, fill)
        def fill_and_die(tmp):
            fill(tmp)
            die()
        return real_write(p, fill_and_die)
    atomic.atomic_write = c.atomic_write = write
c.Collection.create(path, dim=16, embedder_id="fake:1")
print("created without dying", flush=True)
"""

_UNCOMMITTED = ["lock", "empty-db", "hot-journal", "schema"]
_COMMITTED = ["config", "vectors", "sidecar", "json"]


def _create_and_die(path, point: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _CREATE_AND_DIE, str(path), point], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("point", _UNCOMMITTED + _COMMITTED)
def test_kill_during_create_never_bricks_the_collection(tmp_path, point):
    path = tmp_path / "c"
    _create_and_die(path, point)
    assert path.is_dir()
    if point != "lock":
        assert (path / "meta.sqlite").exists()  # the state that used to fail every later open
    if point == "hot-journal":  # a read-only connection may not roll it back: this failed CI's crash suite
        assert (path / "meta.sqlite-journal").exists()
    if point in _UNCOMMITTED:
        with pytest.raises(ValueError, match="no collection|interrupted"):
            Collection.open(path, readonly=True)  # `mm info`: says so, and deletes nothing
        with pytest.raises(ValueError, match="no collection"):
            Collection.open(path)  # writable: cleans up what the dead creation left
        assert not (path / "meta.sqlite").exists()
    else:
        with Collection.open(path, readonly=True) as c:  # committed: readable as it is
            assert c.count() == 0
    # `mm index` / `mm serve` open or create; either way the collection works from here on
    with Collection.open_or_create(path, dim=DIM, embedder_id="fake:1") as c:
        ids = c.add(unit(3), items(3))
        assert c.search(unit(3)[1], k=1)[0][0].id == ids[1]
        report = c.check()
        assert report["ok"], report
        assert report["leftovers"] == [] and report["config"] == "ok"
    with Collection.open(path) as c:
        report = c.check()
        assert report["ok"] and report["disk_index"] == "current" and report["sqlite_vectors"] == 3
    assert sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp")) == []


def test_half_created_collection_with_data_is_never_discarded(tmp_path):
    """Rows without a config are not a dead creation's leftovers: opening refuses, and deletes nothing."""
    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="fake:1") as c:
        c.add(unit(2), items(2))
    import sqlite3

    with sqlite3.connect(path / "meta.sqlite") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'config'")
    (path / "collection.json").unlink()
    with pytest.raises(ValueError, match="no readable collection.json"):
        Collection.open(path)
    with pytest.raises(ValueError, match="no readable collection.json"):
        Collection.open_or_create(path, dim=DIM, embedder_id="fake:1")
    with sqlite3.connect(path / "meta.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2


def test_open_prefers_the_sqlite_config_and_rewrites_a_stale_file(tmp_path):
    """A kill between a config change in SQLite (re-embedding) and the file write must not revert it."""
    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="old:1") as c:
        c.add(unit(2), items(2))
        c.store.set_meta("config", {**c.store.get_meta("config"), "embedder_id": "new:2"})
    import json

    assert json.loads((path / "collection.json").read_text())["embedder_id"] == "old:1"
    with Collection.open(path) as c:
        assert c.embedder_id == "new:2" and c.check()["config"] == "ok"
    assert json.loads((path / "collection.json").read_text())["embedder_id"] == "new:2"


def test_check_reports_broken_invariants(tmp_path):
    path = tmp_path / "c"
    c = Collection.create(path, dim=DIM, embedder_id="fake:1")
    ids = c.add(unit(5), items(5))
    assert c.check()["ok"]
    with c._rw.write():  # the served index loses an id SQLite has
        c._vindex.remove(np.asarray([ids[0]], dtype=np.int64))
    (path / ".vectors.faiss.abcd1234.tmp").write_bytes(b"x")
    report = c.check()
    assert not report["ok"] and report["missing_in_faiss"] == [ids[0]]
    assert report["leftovers"] == [str(path / ".vectors.faiss.abcd1234.tmp")]
    c.close()


def test_open_removes_temp_files_of_interrupted_saves(tmp_path):
    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="fake:1") as c:
        c.add(unit(4), items(4))
    dead = [path / ".vectors.faiss.k2_9ab0x.tmp", path / ".collection.json.zz0a1b2c.tmp"]
    for f in dead:
        f.write_bytes(b"\0" * 4096)  # a killed save's temp file, as large as the index
    not_ours = [path / ".vectors.faiss.tmp", path / "notes.tmp", path / ".vectors.faiss.ABCDEFGH.tmp"]
    for f in not_ours:
        f.write_bytes(b"keep")
    with Collection.open(path, readonly=True) as c:  # a reader changes nothing
        assert sorted(c.check()["leftovers"]) == sorted(map(str, dead))
    assert all(f.exists() for f in dead)
    with Collection.open(path) as c:
        assert c.check()["ok"] and c.count() == 4
    assert not any(f.exists() for f in dead) and all(f.exists() for f in not_ours)


# replace_vectors (re-embedding) --------------------------------------------------------------------------


def _reembedded(path, n=6):
    """A collection of ``n`` items, and new vectors for them (as another embedder would give)."""
    c = Collection.create(path, dim=DIM, embedder_id="old:1")
    ids = c.add(unit(n, seed=1), items(n))
    return c, ids, dict(zip(ids, unit(n, seed=2), strict=True))


def test_replace_vectors_swaps_every_vector_and_the_embedder_id(tmp_path):
    path = tmp_path / "c"
    c, ids, new = _reembedded(path)
    failed = ids[2]
    del new[failed]
    assert c.replace_vectors(new, embedder_id="new:2", errors={failed: "file gone"}) == 5
    for coll in (c, Collection.open(path, readonly=True)):
        assert coll.embedder_id == "new:2" and coll.count() == 5
        got_ids, got = coll.all_vectors()
        assert got_ids.tolist() == [i for i in ids if i != failed]
        np.testing.assert_array_equal(got, np.stack([new[i] for i in got_ids]))
        q = new[ids[4]]
        assert coll.search(q, k=1)[0][0].id == ids[4]  # FAISS holds the new vectors
        assert [(e.id, e.error) for e in coll.errors()] == [(failed, "file gone")]
        assert coll.get(ids[0]).uri == "/data/b/f0"  # ids and metadata kept
        assert coll.check()["ok"]
    c.close()
    import json

    assert json.loads((path / "collection.json").read_text())["embedder_id"] == "new:2"


def test_replace_vectors_refuses_what_would_mix_or_lose_vectors(tmp_path):
    c, ids, new = _reembedded(tmp_path / "c")
    before = c.all_vectors()[1].copy()
    partial = {i: v for i, v in new.items() if i != ids[0]}
    bad = [
        (partial, {}, "neither a new vector nor an error"),  # one item would keep the old model's vector
        (new, {ids[0]: "x"}, "both a new vector and an error"),
        ({**new, 999: new[ids[0]]}, {}, "no items with ids [999]"),
        ({**new, ids[0]: np.zeros(DIM + 1, np.float32)}, {}, "shape"),
        ({**new, ids[0]: np.full(DIM, np.nan, np.float32)}, {}, "NaN"),
    ]
    for vectors, errors, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            c.replace_vectors(vectors, embedder_id="new:2", errors=errors)
    assert c.embedder_id == "old:1"
    np.testing.assert_array_equal(c.all_vectors()[1], before)
    c.close()


def test_replace_vectors_failing_midway_leaves_the_old_vectors(tmp_path, monkeypatch):
    path = tmp_path / "c"
    c, ids, new = _reembedded(path)
    before = c.all_vectors()[1].copy()
    update, calls = c.store.update, []

    def fail_on_the_fourth(*args, **kw):
        calls.append(args[1])
        if len(calls) == 4:
            raise OSError("disk full")
        return update(*args, **kw)

    monkeypatch.setattr(c.store, "update", fail_on_the_fourth)
    with pytest.raises(OSError, match="disk full"):
        c.replace_vectors(new, embedder_id="new:2")
    assert len(calls) == 4  # three vectors were written inside the transaction before it failed
    monkeypatch.undo()
    for coll in (c, Collection.open(path, readonly=True)):
        assert coll.embedder_id == "old:1"
        np.testing.assert_array_equal(coll.all_vectors()[1], before)
        assert coll.search(before[3], k=1)[0][0].id == ids[3]
    c.add(unit(1, seed=9), items(1, start=50))  # still writable
    c.close()


def test_replace_vectors_crash_after_commit_reopens_with_the_new_vectors(tmp_path, monkeypatch):
    """Killed between the SQLite commit and the FAISS rebuild: the next open rebuilds from SQLite."""
    path = tmp_path / "c"
    c, ids, new = _reembedded(path)

    def crash(*args, **kw):
        raise KeyboardInterrupt  # stands in for a kill: nothing after the commit runs

    monkeypatch.setattr("index.collection.VectorIndex.build", crash)
    with pytest.raises(KeyboardInterrupt):
        c.replace_vectors(new, embedder_id="new:2")
    monkeypatch.undo()
    c.store.close()  # no save: the process is gone
    with Collection.open(path) as coll:
        assert coll.embedder_id == "new:2"
        assert coll.search(new[ids[1]], k=1)[0][0].id == ids[1]
        report = coll.check()
        assert report["ok"] and report["disk_index"] == "current", report["problems"]


# another process writes, this one serves ---------------------------------------------------------------
_WRITE_ELSEWHERE = r"""
import json, sys
import numpy as np
from index.collection import Collection
from index.types import Item

path, delete, replace = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
x = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)
with Collection.open(path) as c:
    fresh = [Item(id=0, modality="text", uri=f"/new/{i}", sha256=f"n{i}") for i in range(len(x) - 1)]
    new = c.add(x[:-1], fresh)
    c.delete(delete)
    c.upsert(x[-1:], [Item(id=0, modality="image", uri=c.get(replace).uri, sha256="replaced")])
print(json.dumps(new))
"""


def _write_elsewhere(path, vectors: np.ndarray, delete: list[int], replace: int) -> list[int]:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _WRITE_ELSEWHERE, str(path), json.dumps(delete), str(replace)],
        input=json.dumps(vectors.tolist()),
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


@pytest.mark.parametrize("spec", ["Flat", "HNSW32"])
@pytest.mark.parametrize("readonly", [False, True])
def test_served_collection_searches_what_another_process_indexed(tmp_path, monkeypatch, spec, readonly):
    """`mm serve` has the collection open while `mm index` adds, deletes and replaces items."""
    path = tmp_path / "c"
    x = unit(40, seed=20)
    with Collection.create(path, dim=DIM, embedder_id="f", index_spec=spec) as c:
        ids = c.add(x, items(40))
    served = Collection.open(path, readonly=readonly)
    assert served.search(x[3], k=1)[0][0].id == ids[3]

    def no_full_reload(*a, **kw):
        raise AssertionError("the served index was reloaded in full")

    monkeypatch.setattr(served, "_rebuild_index", no_full_reload)
    monkeypatch.setattr("index.collection.VectorIndex.read", no_full_reload)
    fresh = unit(6, seed=21)
    new_ids = _write_elsewhere(path, fresh, delete=[ids[0], ids[1]], replace=ids[2])

    assert served.count() == 40 + 5 - 2
    got = served.search(fresh[:5], k=1)
    assert [r[0].id for r in got] == new_ids and all(r[0].score > 0.999 for r in got)
    assert all(h.id not in (ids[0], ids[1]) for r in served.search(x[:2], k=10) for h in r)
    assert served.search(fresh[5], k=1)[0][0].id == ids[2]  # replaced: found by its new vector only
    assert all(not (h.id == ids[2] and h.score > 0.999) for h in served.search(x[2], k=5)[0])
    monkeypatch.undo()
    report = served.check()
    assert report["ok"] and report["faiss_live"] == 43 and report["disk_index"] == "current", report
    served.close()


def test_a_reader_behind_the_trimmed_change_log_reloads_and_stays_right(tmp_path, monkeypatch):
    path = tmp_path / "c"
    writer = Collection.create(path, dim=DIM, embedder_id="f")
    ids = writer.add(unit(10, seed=30), items(10))
    reader = Collection.open(path, readonly=True)
    monkeypatch.setattr("index.store.CHANGES_KEEP", 4)
    for i in range(8):  # every add saves, and each save trims the log to the last few generations
        ids += writer.add(unit(2, seed=40 + i), items(2, start=20 + 2 * i))
    writer.delete(ids[:3])
    floor = writer.store.get_meta("changes_from")
    assert floor > reader.generation  # the log no longer reaches back to the reader
    assert writer.store.conn.execute("SELECT COUNT(*) FROM vector_changes").fetchone()[0] <= 8
    q = unit(2, seed=47)
    assert reader.search(q[1], k=1)[0][0].id == ids[-1] and reader.check()["ok"]
    assert reader.count() == 23
    reader.close()
    writer.close()


def test_a_handle_follows_a_reembedding_committed_elsewhere(tmp_path, caplog):
    """After another process swaps every vector and the embedder id, this handle neither searches the
    old vectors nor writes the old embedder id back into collection.json."""
    path = tmp_path / "c"
    served = Collection.create(path, dim=DIM, embedder_id="old:1")
    ids = served.add(unit(6, seed=50), items(6))
    new = unit(6, seed=51)
    with Collection.open(path) as other:
        other.replace_vectors(dict(zip(ids, new, strict=True)), embedder_id="new:2")
    with caplog.at_level(logging.WARNING, logger="index"):
        assert served.search(new[4], k=1)[0][0].id == ids[4]
    assert served.embedder_id == "new:2" and any("new:2" in r.getMessage() for r in caplog.records)
    served.add(unit(1, seed=52), items(1, start=6))  # this handle saves again
    served.close()
    import json

    assert json.loads((path / "collection.json").read_text())["embedder_id"] == "new:2"


_WRITE_LOOP = r"""
import sys
import numpy as np
from index.collection import Collection
from index.types import Item

path, rounds, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(7)
with Collection.open(path) as c:
    for r in range(rounds):
        x = rng.standard_normal((5, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        its = [Item(id=0, modality="text", uri=f"/loop/{r}/{i}", sha256=f"l{r}.{i}") for i in range(5)]
        ids = c.add(x, its)
        c.delete(ids[:2])
"""


@pytest.mark.parametrize("spec", ["Flat", "HNSW32"])
def test_searches_stay_whole_while_another_process_writes(tmp_path, spec):
    """Threads search the served handle while a second process adds and deletes: no search fails or
    returns a deleted-and-gone id as a hit, and the handle ends in step with SQLite."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="f", index_spec=spec) as c:
        c.add(unit(50, seed=60), items(50))
    served = Collection.open(path)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        q = unit(3, seed=seed)
        try:
            while not stop.is_set():
                for r in served.search(q, k=5):
                    assert len(r) == 5 and all(h.item is not None for h in r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(70 + s,)) for s in range(3)]
    for t in threads:
        t.start()
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", _WRITE_LOOP, str(path), "20", str(DIM)],
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        capture_output=True,
    )
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    report = served.check()
    assert report["ok"] and report["faiss_live"] == 50 + 20 * 3, report
    served.close()


def test_kill_as_soon_as_meta_sqlite_appears_then_index_again(tmp_path):
    """The reported case, with a real SIGKILL from outside: wherever it lands, the folder opens again."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys; from index.collection import Collection; "
        "Collection.create(sys.argv[1], dim=16, embedder_id='f')"
    )
    for attempt in range(3):
        path = tmp_path / f"c{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path)], env={**os.environ, "PYTHONPATH": str(root)}
        )
        deadline = time.monotonic() + 30
        while not (path / "meta.sqlite").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Collection.open_or_create(path, dim=DIM, embedder_id="f") as c:
            ids = c.add(unit(2), items(2))
            assert c.search(unit(2)[0], k=1)[0][0].id == ids[0] and c.check()["ok"]
