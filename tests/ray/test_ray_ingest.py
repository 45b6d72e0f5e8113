"""``mm index --ray``: Ray Data ingest into a sharded collection equals a single-machine ingest, survives
losing a worker node, reports bad files without stopping, and resumes (session cluster: conftest.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from index.collection import Collection
from index.ingest import ingest
from index.sharded import ShardedCollection, shard_of, split_id
from service.distributed.ingest import RayIngestConfig, ray_ingest

pytestmark = pytest.mark.slow  # 10-20 s each on 2 cores (Ray Data job, actor start, model load)

SHARDS = 2


def _config(**kw) -> RayIngestConfig:
    return RayIngestConfig(**{"model": "tiny", "encoders": 2, "batch_size": 4} | kw)


def _by_uri(coll) -> dict[str, tuple[int, np.ndarray]]:
    ids, vecs = coll.all_vectors()
    return {coll.get(int(i)).uri: (int(i), v) for i, v in zip(ids, vecs, strict=True)}


def test_ray_ingest_equals_single_machine_ingest_and_resumes(ray_cluster, media_root, embedder, tmp_path):
    with Collection.create(tmp_path / "one", dim=embedder.dim, embedder_id=embedder.model_id) as one:
        r1 = ingest(one, embedder, [media_root], progress=False)
        single = _by_uri(one)
        single_errors = {e.uri for e in one.errors()}
    ShardedCollection.create(tmp_path / "sh", shards=SHARDS, dim=embedder.dim, embedder_id=embedder.model_id)
    r2 = ray_ingest(tmp_path / "sh", embedder.media, [media_root], address=ray_cluster, config=_config())
    assert (r2.added, r2.failed, r2.seen, r2.skipped) == (r1.added, r1.failed, r1.seen, r1.skipped)
    assert r2.added > 5 and r2.failed >= 2  # the bad files are reported, the run went on
    assert {Path(e.path).name for e in r2.errors} == {Path(e.path).name for e in r1.errors}
    with ShardedCollection.open(tmp_path / "sh", readonly=True) as sc:
        sharded = _by_uri(sc)
        assert sharded.keys() == single.keys()
        for uri, (gid, v) in sharded.items():
            np.testing.assert_allclose(v, single[uri][1], atol=1e-5)
            assert split_id(gid)[0] == shard_of(uri, SHARDS)  # global ids route to the owning shard
            assert sc.get(gid).uri == uri
        assert {e.uri for c in sc.shards for e in c.errors()} == single_errors
        query = single[next(iter(single))][1]
        assert [sc.get(h.id).uri for h in sc.search(query, k=5)[0]] == [
            u for u, _ in sorted(single.items(), key=lambda kv: -float(kv[1][1] @ query))[:5]
        ]
    again = ray_ingest(tmp_path / "sh", embedder.media, [media_root], address=ray_cluster, config=_config())
    assert again.added == again.updated == 0 and again.skipped >= r2.added  # unchanged files skipped


def _many_files(root: Path, n: int) -> Path:
    from conftest import image_bytes

    root.mkdir()
    for i in range(n):
        if i % 2:
            (root / f"note_{i:03d}.txt").write_text(f"note number {i} about the colour {i * 37 % 255}")
        else:
            (root / f"img_{i:03d}.png").write_bytes(image_bytes((i * 5 % 255, 90, 200 - i), "circle"))
    return root


def test_losing_a_worker_node_mid_ingest_loses_and_duplicates_nothing(
    ray_cluster, ray_cluster_handle, ray_add_worker, embedder, tmp_path
):
    files = _many_files(tmp_path / "lib", 40)
    node = ray_add_worker()
    killed = threading.Event()

    def kill_once(done: int, total: int) -> None:
        if not killed.is_set():
            killed.set()
            ray_cluster_handle.remove_node(node, allow_graceful=False)  # like a machine going away

    ShardedCollection.create(tmp_path / "sh", shards=SHARDS, dim=embedder.dim, embedder_id=embedder.model_id)
    report = ray_ingest(
        tmp_path / "sh",
        embedder.media,
        [files],
        address=ray_cluster,
        config=_config(batch_size=2),
        on_progress=kill_once,
    )
    assert killed.is_set()
    assert (report.added, report.failed, report.errors) == (40, 0, [])
    with ShardedCollection.open(tmp_path / "sh", readonly=True) as sc:
        uris = [it.uri for it in sc.items(limit=1000)]
        assert sorted(uris) == sorted(str(p) for p in files.iterdir())  # each file once
        assert sc.count() == 40


def test_cli_manifest_reports_missing_and_bad_files(ray_cluster, media_root, tmp_path, capsys):
    from service.cli import main

    manifest = tmp_path / "files.jsonl"
    rows = [{"uri": str(media_root / "texts" / "cats.txt")}, {"uri": str(media_root / "bad" / "broken.png")}]
    rows += [{"uri": "nowhere/gone.png"}, {"path": str(media_root / "images" / "red_circle.png")}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["index", "--ray", ray_cluster, "--shards", str(SHARDS), "--manifest", str(manifest)]
    code = main([*argv, "--collection", str(tmp_path / "sh"), "--model", "tiny", "--json", "--no-transcribe"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, out
    assert (out["added"], out["failed"], out["count"]) == (2, 2, 2), out["errors"]
    assert {Path(e["path"]).name for e in out["errors"]} == {"broken.png", "gone.png"}


def test_a_failing_shard_is_retried_alone_reported_and_finished_by_a_rerun(
    ray_cluster, embedder, tmp_path, caplog
):
    files = _many_files(tmp_path / "lib", 20)
    in_one = sum(shard_of(str(p), SHARDS) == 1 for p in files.iterdir())
    assert 0 < in_one < 20
    path = tmp_path / "sh"
    ShardedCollection.create(path, shards=SHARDS, dim=embedder.dim, embedder_id=embedder.model_id)
    away = tmp_path / "shard-001.away"

    def break_shard_1(done: int, total: int) -> None:
        if not away.exists():  # after the driver's look-ups, before the shard tasks
            (path / "shard-001").rename(away)

    with caplog.at_level("WARNING", logger="service.distributed.ingest"):
        report = ray_ingest(
            path, embedder.media, [files], address=ray_cluster, config=_config(), on_progress=break_shard_1
        )
    tries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shard 1 failed")]
    assert len(tries) == 2 and not any(
        m.startswith("shard 0") for m in caplog.messages
    )  # shard 1 alone, twice
    assert [e.path for e in report.errors] == ["shard 1"] and "re-run" in report.errors[0].error
    assert (report.added, report.failed) == (20 - in_one, in_one)
    with Collection.open(path / "shard-000", readonly=True) as shard0:
        assert shard0.count() == 20 - in_one  # the other shard was stored
    away.rename(path / "shard-001")
    again = ray_ingest(path, embedder.media, [files], address=ray_cluster, config=_config())
    assert (again.added, again.skipped, again.failed) == (in_one, 20 - in_one, 0)
    with ShardedCollection.open(path, readonly=True) as sc:
        assert sc.count() == 20
