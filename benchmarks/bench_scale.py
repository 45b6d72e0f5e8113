"""Scale benchmark: ``--n`` items (default 100k; the claim is about 1M) on one machine, the index the
automatic policy picks, measured end to end.

Data: every vector of the demo collection (``demo/collection``, real embeddings of the sample corpus,
made by ``make demo``) resampled ``--n`` times round-robin, each plus seeded Gaussian noise
(``NOISE`` per dimension, fixed here, not tuned) and renormalised; the items get realistic metadata
(modality, mime, caption of the item they copy, a library path, size, image sizes or audio duration,
``created_at`` spread over a year, a sha256). Queries are fresh noisy copies of random demo vectors.

Measured, in this order:

- ``load_s``: ``Collection.create`` + ``add`` in batches of ``--batch`` inside ``bulk()`` (SQLite
  commits each batch; the index type is chosen and built once at the end) + close;
- ``disk_mb`` per file;
- ``open_s``, ``rss_mb``: ``Collection.open`` in a fresh process (what ``mm serve`` does at start);
- ``open_after_kill_s``: a process upserting one item at a time (each write commits to SQLite, then
  rewrites the FAISS file) is ``kill -9``-ed at a seeded random moment; a fresh process opens the
  collection again (``stale_at_kill`` says whether the FAISS file was behind SQLite then, i.e. whether
  recovery had work to do) and ``Collection.check()`` must be ``ok``;
- search, for no filter and for ``created_at`` ranges keeping 1% and 10% of the items: ``recall_at_10``
  against exact search over the same vectors (with the same filter), p50/p99 in process
  (``Collection.search``) and over HTTP (the real app under uvicorn, ``POST /search`` with a
  ``vector``, one keep-alive connection; see ``bench_search.py``), and the server's RSS after them;
- ``upsert_ms`` / ``delete_ms``: single-item writes from another process (as ``mm index`` would) while
  a client keeps searching over HTTP (``search_during_writes``: its p50/p99; the server catches up
  from the change log).

Targets (2 cores, 1M, filters included): open and open after a kill < 5 s, HTTP search p99 < 10 ms,
recall@10 >= 0.95, RSS < 4 GB. The last line is JSON whose ``"auto"`` object carries ``open_s``,
``open_after_kill_s``, ``rss_mb``, ``recall_at_10``, ``http_p50_ms``, ``http_p99_ms`` (no filter) and
the same search figures under ``filter_1pct`` and ``filter_10pct``.

Usage: ``python benchmarks/bench_scale.py [--n 1000000] [--queries 200] [--keep]``. The collection is
built under ``demo/cache/bench_scale/`` (removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import BENCH_MODEL_ID, RawClient, free_port, percentiles, wait_for_server  # noqa: E402
from paths import CACHE, ROOT  # noqa: E402

log = logging.getLogger("bench_scale")
NOISE = 0.02  # per-dimension sigma of the resampling noise (norm ~0.32 at dim 256, before renormalising)
YEAR = 365 * 86400.0
T0 = 1_700_000_000.0
EXT = {"image": (".jpg", "image/jpeg"), "audio": (".wav", "audio/wav"), "text": (".txt", "text/plain")}


# data ----------------------------------------------------------------------------------------------
def demo_base(path: Path) -> tuple[np.ndarray, list]:
    """``(vectors (b, dim), items)`` of the demo collection (read-only)."""
    from index.collection import Collection

    if not (path / "meta.sqlite").exists():
        raise SystemExit(f"no demo collection at {path}: run `make demo` first")
    coll = Collection.open(path, readonly=True)
    try:
        ids, vecs = coll.all_vectors()
        items = coll.store.get_many(ids.tolist())
        return vecs, [items[int(i)] for i in ids]
    finally:
        coll.close()


def resample(base: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """``(len(rows), dim)``: ``base[rows]`` plus seeded Gaussian noise, renormalised."""
    rng = np.random.default_rng(seed)
    x = base[rows] + NOISE * rng.standard_normal((len(rows), base.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_vectors(base: np.ndarray, n: int) -> np.ndarray:
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    step = 50_000
    for s in range(0, n, step):
        rows = np.arange(s, min(n, s + step)) % len(base)
        out[s : s + len(rows)] = resample(base, rows, seed=1000 + s // step)
    return out


def created_times(n: int) -> np.ndarray:
    return T0 + np.random.default_rng(7).uniform(0, YEAR, n)


def make_items(base_items: list, start: int, stop: int, created: np.ndarray) -> list:
    from index.types import Item

    rng = np.random.default_rng(start)
    out = []
    for i in range(start, stop):
        src = base_items[i % len(base_items)]
        ext, mime = EXT.get(src.modality, (".bin", "application/octet-stream"))
        image = src.modality == "image"
        out.append(
            Item(
                id=0,
                modality=src.modality,
                uri=f"/srv/media/library/{src.modality}/{i // 1000:04d}/{i:07d}{ext}",
                sha256=rng.bytes(32).hex(),
                mime=mime,
                caption=src.caption,
                tags=[f"album{i % 500}"] if image and i % 3 == 0 else [],
                size=int(rng.integers(2_000, 5_000_000)),
                width=int(rng.integers(320, 4000)) if image else None,
                height=int(rng.integers(240, 3000)) if image else None,
                duration=float(rng.uniform(1, 300)) if src.modality == "audio" else None,
                mtime=float(created[i]) - 60,
                created_at=float(created[i]),
            )
        )
    return out


# children: each measured step in a fresh process --------------------------------------------------
def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_open(path: str, check: bool) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    from index.collection import Collection

    t = time.perf_counter()
    coll = Collection.open(path)
    open_s = time.perf_counter() - t
    out = {"open_s": open_s, "rss_mb": rss_mb(), "index": coll.stats()["index"], "items": coll.count()}
    if check:
        report = coll.check()
        out["check_ok"], out["problems"] = report["ok"], report["problems"]
    coll.close()
    print(json.dumps(out), flush=True)


def child_upsert(path: str, seed: int) -> None:
    """Upsert one existing item at a time (new vector, same uri) until killed."""
    import dataclasses

    import faiss

    faiss.omp_set_num_threads(1)
    from index.collection import Collection

    coll = Collection.open(path)
    rng = np.random.default_rng(seed)
    n = coll.count()
    dim = coll.dim
    print("ready", flush=True)
    while True:
        id_ = int(rng.integers(1, n + 1))
        item = coll.get(id_)
        if item is None:
            continue
        v = rng.standard_normal(dim).astype(np.float32)
        coll.upsert((v / np.linalg.norm(v))[None, :], [dataclasses.replace(item, id=0)])
        print("upserted", id_, flush=True)


def run_child(args: list[str], timeout: float = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kill_during_upserts(path: Path, seed: int) -> dict:
    """Start upserting in a child, SIGKILL it at a random moment after its first few writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child-upsert", str(path), "--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        err = proc.stderr.read()[-2000:] if proc.stderr else ""
        raise RuntimeError(f"upserting child did not start: {err}")
    done = 0
    while done < 2:  # a couple of full writes first, then a random moment inside the next ones
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("upserting child died")
        done += line.startswith("upserted")
    time.sleep(random.Random(seed).uniform(0.05, 0.6))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read()
    done += rest.count("upserted")
    side = json.loads((path / "vectors.faiss.json").read_text())
    from index.store import MetaStore

    store = MetaStore(path / "meta.sqlite", dim=1, readonly=True)
    gen = store.generation()
    store.close()
    return {"upserts_before_kill": done, "stale_at_kill": int(side["generation"]) != gen, "gen": gen}


# search ---------------------------------------------------------------------------------------------
def exact_topk(x: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None) -> np.ndarray:
    """Ids (row + 1) of the exact top k per query, over rows where ``mask`` (all when None)."""
    rows = np.arange(len(x)) if mask is None else np.flatnonzero(mask)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for s in range(0, len(rows), 200_000):
        r = rows[s : s + 200_000]
        sc = q @ x[r].T
        s_all = np.concatenate([best_s, sc], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(r + 1, sc.shape)], axis=1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
    return best_i


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def inprocess(coll, queries: np.ndarray, k: int, flt) -> tuple[list[float], list[list[int]]]:
    for q in queries[:10]:
        coll.search(q, k=k, filter=flt)
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = coll.search(q, k=k, filter=flt)[0]
        times.append(time.perf_counter() - t)
        found.append([h.id for h in hits])
    return times, found


def body(q: np.ndarray, k: int, span: tuple[float, float] | None) -> bytes:
    req: dict = {"vector": [round(float(v), 6) for v in q], "k": k}
    if span is not None:
        req["filters"] = {"since": span[0], "until": span[1]}
    return json.dumps(req).encode()


def over_http(client: RawClient, bodies: list[bytes]) -> tuple[list[float], list[float], list[list[int]]]:
    for b in bodies[:10]:
        client.post_json("/search", b)
    times, served, found = [], [], []
    for b in bodies:
        t = time.perf_counter()
        status, answer = client.post_json("/search", b)
        times.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"search answered {status}: {answer}")
        served.append(answer["took_ms"] / 1000)
        found.append([r["id"] for r in answer["results"]])
    return times, served, found


def ms(times: list[float]) -> tuple[float, float]:
    p50, p99 = percentiles(times)
    return round(p50, 3), round(p99, 3)


def writes_while_searching(path: Path, port: int, bodies: list[bytes], base: np.ndarray, n: int) -> dict:
    """Single-item upserts then deletes from this process while a thread searches over HTTP."""
    import dataclasses

    from index.collection import Collection

    stop = threading.Event()
    during: list[float] = []

    def search_loop() -> None:
        client = RawClient(port)
        i = 0
        try:
            while not stop.is_set():
                t = time.perf_counter()
                status, _ = client.post_json("/search", bodies[i % len(bodies)])
                during.append(time.perf_counter() - t)
                assert status == 200
                i += 1
        finally:
            client.close()

    coll = Collection.open(path)
    rng = np.random.default_rng(11)
    th = threading.Thread(target=search_loop, daemon=True)
    th.start()
    up, dl = [], []
    try:
        for _ in range(10):
            id_ = int(rng.integers(1, n + 1))
            item = coll.get(id_)
            if item is None:
                continue
            v = resample(base, np.array([id_ % len(base)]), seed=int(rng.integers(1 << 30)))
            t = time.perf_counter()
            coll.upsert(v, [dataclasses.replace(item, id=0)])
            up.append(time.perf_counter() - t)
        for _ in range(10):
            id_ = int(rng.integers(1, n + 1))
            t = time.perf_counter()
            coll.delete([id_])
            dl.append(time.perf_counter() - t)
    finally:
        stop.set()
        th.join()
        coll.close()
    p50, p99 = ms(during)
    return {
        "upsert_ms": {"p50": round(1000 * float(np.median(up)), 1), "max": round(1000 * max(up), 1)},
        "delete_ms": {"p50": round(1000 * float(np.median(dl)), 1), "max": round(1000 * max(dl), 1)},
        "search_during_writes": {"p50_ms": p50, "p99_ms": p99, "n": len(during)},
    }


# main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--demo", type=Path, default=ROOT / "demo" / "collection")
    ap.add_argument("--dir", type=Path, default=CACHE / "bench_scale")
    ap.add_argument("--keep", action="store_true", help="leave the collection in --dir")
    ap.add_argument("--child-open", help=argparse.SUPPRESS)
    ap.add_argument("--child-upsert", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_open:
        child_open(args.child_open, args.check)
        return 0
    if args.child_upsert:
        child_upsert(args.child_upsert, args.seed)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import faiss

    faiss.omp_set_num_threads(1)
    from index.collection import Collection
    from index.types import Filter

    base, base_items = demo_base(args.demo)
    n, k, dim = args.n, args.k, base.shape[1]
    path = args.dir / f"n{n}"
    if path.exists():
        shutil.rmtree(path)
    result: dict = {"n": n, "dim": dim, "base_vectors": len(base), "noise": NOISE, "cpus": os.cpu_count()}

    t = time.perf_counter()
    x = make_vectors(base, n)
    created = created_times(n)
    result["generate_s"] = round(time.perf_counter() - t, 1)
    log.info("generated %d vectors in %.1fs", n, result["generate_s"])

    t = time.perf_counter()
    coll = Collection.create(path, dim=dim, embedder_id=BENCH_MODEL_ID)
    with coll.bulk():
        for s in range(0, n, args.batch):
            e = min(n, s + args.batch)
            ids = coll.add(x[s:e], make_items(base_items, s, e, created))
            assert ids[0] == s + 1 and ids[-1] == e, "ids must be rows + 1 for the exact search"
            if (s // args.batch) % 20 == 0:
                log.info("loaded %d/%d (%.0fs)", e, n, time.perf_counter() - t)
    index = coll.stats()["index"]
    coll.close()
    result["load_s"] = round(time.perf_counter() - t, 1)
    result["index"] = index
    result["disk_mb"] = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(path.iterdir())}
    log.info("bulk load %.1fs, index %s", result["load_s"], index)

    opened = run_child(["--child-open", str(path)])
    result["open"] = opened
    kill = kill_during_upserts(path, seed=3)
    t = time.perf_counter()
    after = run_child(["--child-open", str(path), "--check"])
    result["kill"] = kill | {"reopen": after, "reopen_wall_s": round(time.perf_counter() - t, 2)}
    log.info(
        "open %.2fs, after kill %.2fs (stale: %s)", opened["open_s"], after["open_s"], kill["stale_at_kill"]
    )

    # the truth follows what the killed upserts changed
    coll = Collection.open(path)
    ids, vecs = coll.all_vectors()
    x[ids - 1] = vecs
    alive = np.zeros(n, bool)
    alive[ids - 1] = True

    rng = np.random.default_rng(5)
    queries = resample(base, rng.integers(0, len(base), args.queries), seed=99)
    spans = {
        "none": None,
        "filter_1pct": tuple(np.quantile(created, [0.50, 0.51]).tolist()),
        "filter_10pct": tuple(np.quantile(created, [0.20, 0.30]).tolist()),
    }
    searches: dict = {}
    for name, span in spans.items():
        mask = alive if span is None else alive & (created >= span[0]) & (created <= span[1])
        truth = exact_topk(x, queries, k, mask)
        flt = None if span is None else Filter(since=span[0], until=span[1])
        times, found = inprocess(coll, queries, k, flt)
        searches[name] = {
            "kept": round(float(mask.mean()), 4),
            "truth": truth,
            "recall_inproc": round(recall(found, truth), 4),
            "inproc_ms": ms(times),
        }
        log.info(
            "%s: in process p50/p99 %s ms, recall %.3f", name, ms(times), searches[name]["recall_inproc"]
        )
    coll.close()

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).parent / "bench_search.py"), "--serve", str(path)]
    cmd += ["--port", str(port), "--dim", str(dim)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_server(port, server, timeout_s=600)
        result["server_start_s"] = round(time.perf_counter() - t, 2)
        client = RawClient(port)
        for name, span in spans.items():
            bodies = [body(q, k, span) for q in queries]
            times, served, found = over_http(client, bodies)
            searches[name] |= {
                "recall_at_10": round(recall(found, searches[name]["truth"]), 4),
                "http_ms": ms(times),
                "served_ms": ms(served),
            }
            log.info("%s: HTTP p50/p99 %s ms", name, ms(times))
        client.close()
        result["server_rss_mb"] = round(rss_mb(server.pid), 1)
        writes = writes_while_searching(path, port, [body(q, k, None) for q in queries], base, n)
        result["writes"] = writes
        result["server_rss_after_writes_mb"] = round(rss_mb(server.pid), 1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    for s in searches.values():
        s.pop("truth")
    result["search"] = searches

    def figures(name: str) -> dict:
        s = searches[name]
        return {
            "recall_at_10": s["recall_at_10"],
            "http_p50_ms": s["http_ms"][0],
            "http_p99_ms": s["http_ms"][1],
            "inproc_p50_ms": s["inproc_ms"][0],
            "inproc_p99_ms": s["inproc_ms"][1],
        }

    auto = {
        "index": index,
        "open_s": round(opened["open_s"], 3),
        "open_after_kill_s": round(after["open_s"], 3),
        "rss_mb": result["server_rss_mb"],
        **figures("none"),
        "filter_1pct": figures("filter_1pct"),
        "filter_10pct": figures("filter_10pct"),
    }
    every = [auto, auto["filter_1pct"], auto["filter_10pct"]]
    auto["targets_met"] = {
        "open_lt_5s": auto["open_s"] < 5 and auto["open_after_kill_s"] < 5,
        "http_p99_lt_10ms": all(f["http_p99_ms"] < 10 for f in every),
        "recall_ge_0.95": all(f["recall_at_10"] >= 0.95 for f in every),
        "rss_lt_4gb": auto["rss_mb"] < 4096,
        "check_ok_after_kill": bool(after.get("check_ok")),
    }
    result["auto"] = auto
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
