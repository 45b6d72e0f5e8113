"""A served collection catching up with another process's writes: cost per change, not per collection.

    python benchmarks/bench_refresh.py [--items 50000] [--dim 384] [--spec Flat] [--changes 100,1000]

A collection of ``--items`` random unit vectors (index ``--spec``) is opened as a server would; a
second handle on the same folder (what a second process does: its own SQLite connection and FAISS
index) adds ``c`` items and deletes ``c // 10``, either saving its FAISS file ("saved", as single
writes do) or not yet ("unsaved", inside ``bulk()``, as a long ``mm index`` run between its saves).
Reported per case: the served handle's catch-up (its first search after the writes, minus a plain
search) against a full reload (``Collection.open``, reading the FAISS file) as the baseline, and the
per-search cost of noticing that nothing changed (one indexed SQLite read). Wall clock on a shared
machine. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from index.collection import Collection  # noqa: E402
from index.types import Item  # noqa: E402


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, start: int) -> list[Item]:
    return [Item(id=0, modality="text", uri=f"/b/{start + i}", sha256=f"s{start + i}") for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--changes", default="100,1000")
    ap.add_argument("--spec", default="Flat", help='FAISS factory string, e.g. "HNSW32"')
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    out: dict = {"items": args.items, "dim": args.dim, "spec": args.spec, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        with Collection.create(path, dim=args.dim, embedder_id="bench", index_spec=args.spec) as c, c.bulk():
            for s in range(0, args.items, 5000):
                n = min(5000, args.items - s)
                c.add(unit(n, args.dim, s), items(n, s))
        served = Collection.open(path)
        writer = Collection.open(path)
        q = unit(1, args.dim, 999)
        served.search(q, k=10)
        t = time.perf_counter()
        for _ in range(args.repeats):
            served.search(q, k=10)
        search_ms = (time.perf_counter() - t) / args.repeats * 1e3
        t = time.perf_counter()
        for _ in range(args.repeats):
            served.store.generation()
        out["unchanged_check_us"] = round((time.perf_counter() - t) / args.repeats * 1e6, 1)
        out["search_ms"] = round(search_ms, 3)
        start = args.items
        for c in (int(x) for x in args.changes.split(",")):
            for mode in ("saved", "unsaved"):
                with writer.bulk() if mode == "unsaved" else contextlib.nullcontext():
                    ids = writer.add(unit(c, args.dim, start), items(c, start))
                    writer.delete(ids[: c // 10])
                    start += c
                    t = time.perf_counter()
                    served.search(q, k=10)
                    catch_up = (time.perf_counter() - t) * 1e3 - search_ms
                assert served.count() == writer.count() and served.check()["ok"]
                reloads = []
                for _ in range(3):
                    t = time.perf_counter()
                    Collection.open(path, readonly=True).close()
                    reloads.append((time.perf_counter() - t) * 1e3)
                out["cases"].append(
                    {
                        "changes": c + c // 10,
                        "writer": mode,
                        "catch_up_ms": round(catch_up, 2),
                        "full_reload_ms": round(statistics.median(reloads), 2),
                    }
                )
        served.close()
        writer.close()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
