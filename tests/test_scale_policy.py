"""The choices that let a collection reach a million items on one box, checked on small sizes:
the automatic index type and its IVF list count, one index switch per bulk load, exact rescoring of a
quantized index's candidates, and recovery after ``kill -9`` from the change log instead of a rebuild.
(The figures at scale are ``benchmarks/bench_scale.py``'s.)"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from index.collection import SIDECAR_FILE, Collection
from index.types import Filter, Item
from index.vectors import IndexPolicy, _nlist_for, choose_spec, train_threshold

DIM = 32
ROOT = Path(__file__).resolve().parents[1]


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, start: int = 0) -> list[Item]:
    return [Item(id=0, modality="image", uri=f"/m/{start + i}.jpg", sha256=f"s{start + i}") for i in range(n)]


def test_a_million_embeddings_get_ivf_sq8_with_about_sqrt_n_lists():
    assert choose_spec(1_000_000, 256, 1024) == "IVF1024,SQ8"
    assert choose_spec(300_000, 256, 1024) == "HNSW32"  # the graph still fits the default budget
    for n in (50_000, 1_000_000, 10_000_000):
        nlist = _nlist_for(n)
        assert nlist & (nlist - 1) == 0 and np.sqrt(n) / 2 <= nlist <= 2 * np.sqrt(n)
    # training wants ~39 points per list: ~40k vectors at 1M, not the 4 sqrt(n) lists' 160k
    assert train_threshold("IVF1024,SQ8") == 39 * 1024


def test_bulk_switches_the_index_type_once_at_the_end(tmp_path, monkeypatch):
    policy = IndexPolicy(flat_max=100)
    coll = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", policy=policy)
    built: list[str] = []
    real = Collection._rebuild_index

    def counting(self, spec=None):
        vi = real(self, spec)
        built.append(vi.spec)
        return vi

    monkeypatch.setattr(Collection, "_rebuild_index", counting)
    x = unit(600, seed=1)
    with coll.bulk():
        for s in range(0, 600, 100):
            ids = coll.add(x[s : s + 100], items(100, start=s))
            # every batch is searchable at once, in the type the block started with
            assert coll.search(x[s + 50], k=1)[0][0].id == ids[50]
        assert coll.stats()["index"] == "Flat" and built == []
    assert built == ["HNSW32"] and coll.stats()["index"] == "HNSW32"
    assert coll.check()["ok"]
    coll.close()


def test_quantized_index_rescores_its_candidates_exactly(tmp_path):
    # near-duplicates (a few bases plus tiny noise): SQ8 codes cannot order them, float32 can
    base = unit(8, seed=2)
    rng = np.random.default_rng(3)
    x = base[np.arange(2000) % 8] + 0.01 * rng.standard_normal((2000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    coll = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", index_spec="IVF16,SQ8")
    ids = np.asarray(coll.add(x, items(2000)))
    assert coll.stats()["index"] == "IVF16,SQ8"
    q = unit(20, seed=4) * 0.1 + base[np.arange(20) % 8]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    got = coll.search(q, k=10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean(
        [len({h.id for h in row} & set(ids[t].tolist())) / 10 for row, t in zip(got, truth, strict=True)]
    )
    assert recall >= 0.95
    for row, qv in zip(got, q, strict=True):
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)
        for h in row:  # the exact cosine from the stored vector, not the SQ8 estimate
            assert h.score == pytest.approx(float(x[h.id - ids[0]] @ qv), abs=1e-5)
    coll.close()


_UPSERT_FOREVER = r"""
import dataclasses, sys
import numpy as np
from index.collection import Collection
coll = Collection.open(sys.argv[1])
rng = np.random.default_rng(0)
print("ready", flush=True)
i = 0
while True:
    item = coll.get(int(rng.integers(1, 301)))
    v = rng.standard_normal((1, coll.dim)).astype(np.float32)
    coll.upsert(v / np.linalg.norm(v), [dataclasses.replace(item, id=0)])
    i += 1
    print("upserted", i, flush=True)
"""


def test_open_after_kill_during_upserts_catches_up_without_a_rebuild(tmp_path, monkeypatch):
    path = tmp_path / "c"
    with Collection.create(path, dim=DIM, embedder_id="f", index_spec="HNSW32") as c:
        c.add(unit(300, seed=5), items(300))
    script = tmp_path / "upsert.py"
    script.write_text(textwrap.dedent(_UPSERT_FOREVER))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for _ in range(5):
        assert proc.stdout.readline().startswith("upserted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def no_rebuild(*a, **kw):
        raise AssertionError("recovery must not rebuild the index from every vector")

    monkeypatch.setattr(Collection, "_rebuild_index", no_rebuild)
    with Collection.open(path) as c:
        report = c.check()
        assert report["ok"], report["problems"]
        assert report["disk_index"] == "current" and report["faiss_live"] == 300
        ids, vecs = c.all_vectors()
        hits = c.search(vecs[:20], k=1)
        assert [h[0].id for h in hits] == ids[:20].tolist()  # every stored vector finds itself
    assert (path / SIDECAR_FILE).exists()


def test_item_dataclass_round_trip_keeps_ids_stable(tmp_path):
    """Upserts by uri keep ids, which the benchmark's exact search relies on (id = row + 1)."""
    coll = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f")
    x = unit(10, seed=6)
    ids = coll.add(x, items(10))
    assert ids == list(range(1, 11))
    again = coll.upsert(x[3:4] * -1, [dataclasses.replace(coll.get(4), id=0)])
    assert again == [4] and coll.search(-x[3], k=1)[0][0].id == 4
    coll.close()


@pytest.mark.parametrize("spec", ["IVF16,SQ8", "IVF16,Flat", "HNSW32", "Flat"])
def test_deletes_and_upserts_keep_every_id_on_its_own_vector(tmp_path, spec):
    """IndexIDMap2.remove_ids over an IVF compacts the id map but not the lists: ids after a removed
    one would name their neighbours' vectors. Each remaining vector must still find itself."""
    x = unit(1000, seed=8)
    coll = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", index_spec=spec)
    ids = coll.add(x, items(1000))
    assert coll.stats()["index"] == spec
    coll.delete(ids[:50:3])
    coll.upsert(-x[100:101], [dataclasses.replace(coll.get(ids[100]), id=0)])
    got, want = coll.all_vectors()
    hits = coll.search(want, k=1)
    assert [h[0].id for h in hits] == got.tolist()
    assert coll.search(-x[100], k=1)[0][0].id == ids[100]
    gone = set(ids[:50:3])
    for row in coll.search(x[:50], k=10):  # tombstones hidden, rows still full
        assert len(row) == 10 and not gone & {h.id for h in row}
    assert coll.check()["ok"]
    coll.close()
    with Collection.open(tmp_path / "c") as again:  # the saved file holds the same
        assert [h[0].id for h in again.search(want[::7], k=1)] == got[::7].tolist()


@pytest.mark.parametrize("spec", ["IVF16,SQ8", "HNSW32"])
@pytest.mark.parametrize("keep", ["image", "rare"])
def test_filtered_search_post_filter_path_matches_the_selector_path(tmp_path, monkeypatch, spec, keep):
    """A filter keeping a third of the items is applied after a wider unfiltered search; a rare one
    (under POST_FILTER_SHARE, over exact_max) goes through the selector. Same answers either way."""
    import index.vectors

    x = unit(3000, seed=9)
    mods = np.where(np.arange(3000) % 3 == 0, "image", "text")
    mods[::97] = "rare"  # ~1%
    its = [dataclasses.replace(it, modality=str(m)) for it, m in zip(items(3000), mods, strict=True)]
    policy = IndexPolicy(exact_max=10)
    coll = Collection.create(tmp_path / "c", dim=DIM, embedder_id="f", index_spec=spec, policy=policy)
    ids = np.asarray(coll.add(x, its))
    coll.delete(ids[1:30:2].tolist())  # tombstones too
    alive = np.ones(3000, bool)
    alive[1:30:2] = False
    q = unit(20, seed=10)
    flt = Filter(modalities=[keep])
    wide_calls: list[bool] = []
    real_wide = index.vectors.VectorIndex._search_wide

    def spy(self, x, k, want, wide, allowed):
        wide_calls.append(allowed is not None)
        return real_wide(self, x, k, want, wide, allowed)

    monkeypatch.setattr(index.vectors.VectorIndex, "_search_wide", spy)
    got = coll.search(q, k=10, filter=flt)
    assert any(wide_calls) is (keep == "image")  # which path the share picked
    monkeypatch.setattr(index.vectors, "POST_FILTER_SHARE", 2.0)  # the selector path always
    ref = coll.search(q, k=10, filter=flt)
    mask = alive & (mods == keep)
    recalls = []
    for row, ref_row, qv in zip(got, ref, q, strict=True):
        assert len(row) == 10 and all(h.item.modality == keep for h in row)
        if spec.startswith("IVF"):  # the same probed lists, the same allowed candidates
            assert [h.id for h in row] == [h.id for h in ref_row]
        truth = ids[mask][np.argsort(-(x[mask] @ qv))[:10]]
        recalls.append(len({h.id for h in row} & set(truth.tolist())) / 10)
    assert np.mean(recalls) >= 0.7  # uniform random vectors: the hardest case for IVF and HNSW
    coll.close()


def test_a_large_index_file_is_saved_every_n_writes_and_caught_up_after_a_crash(tmp_path, monkeypatch):
    """With ``lazy_save_mb=0`` every file counts as large: single writes rewrite it every
    ``save_every`` generations only; a process dying in between loses nothing (the log covers it)."""
    path = tmp_path / "c"
    policy = IndexPolicy(lazy_save_mb=0, save_every=3)
    coll = Collection.create(path, dim=DIM, embedder_id="f", policy=policy)
    x = unit(20, seed=11)
    gens = []
    for i in range(7):
        coll.add(x[i : i + 1], items(1, start=i))
        gens.append(json.loads((path / SIDECAR_FILE).read_text())["generation"])
    assert gens == [0, 0, 3, 3, 3, 6, 6]  # saved at creation (generation 0), then every 3 writes
    report = coll.check()
    assert report["ok"] and report["disk_index"] == "stale"  # normal between saves
    coll.add(x[7:8], items(1, start=7))  # generation 8, file at 6
    coll.store.close()  # the process dies: no close(), no save

    def no_rebuild(*a, **kw):
        raise AssertionError("the change log covers the unsaved writes")

    monkeypatch.setattr(Collection, "_rebuild_index", no_rebuild)
    with Collection.open(path) as again:
        assert again.count() == 8 and again.search(x[7], k=1)[0][0].item.uri == "/m/7.jpg"
        assert again.check()["disk_index"] == "current"  # the open saved the caught-up file
