"""A sharded collection: ``S`` normal collections under one folder, read and written as one.

```
<dir>/shards.json   {"format", "shards": S, "id_bits": 48, "embedder_id", "dim"}
<dir>/shard-000/    a normal collection (index.collection) holding the items hash(uri) % S == 0
<dir>/shard-001/    ...
```

Each item lives in the shard ``shard_of(uri)`` (a stable hash, the same in every process and on every
machine, unlike Python's ``hash``; an item without a uri, a text added through the API, by its sha256).
Ids are global: ``shard << ID_BITS | local id``, so shard 0's ids are its collection's own and a get,
delete or more-like-this goes straight to the owning shard. A search asks every shard for its top
``k + offset`` (threads, a small pool per shard so that a hung shard queues only its own calls; FAISS and
SQLite release the GIL), waits up to a deadline and merges by score. A shard that fails or is late makes
the search raise :class:`ShardUnavailable` naming it, unless ``allow_partial`` (then
:class:`ShardedAnswer.partial`). Writes are never partial: an add/upsert goes to the shards its items
hash to, one shard transaction each.

A shard is anything with :class:`~index.collection.Collection`'s methods: a collection opened here, or a
proxy to a Ray actor that holds it (``service.distributed.shards``), which raises
:class:`ShardUnavailable` for its shard when the actor cannot answer.

Vector scores are cosines, comparable across shards, so the merged top k equals one collection's top k
for exact (Flat) shards. Lexical (BM25) scores use each shard's own term statistics: close to a single
collection's when shards are large random samples of one corpus (hash partitioning), not identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from index.atomic import atomic_write_json
from index.collection import Collection
from index.types import Filter, Hit, Item

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"
ID_BITS = 48  # local ids below 2**48; shard numbers up to 2**14 keep global ids under FAISS's 2**62
MAX_SHARDS = 1 << 14
_LOCAL = (1 << ID_BITS) - 1
THREADS_PER_SHARD = 4  # concurrent calls one shard serves; more queue (behind a hung one: only its own)


def shard_of(uri: str, shards: int) -> int:
    """The shard an item with ``uri`` lives in: a stable hash (blake2b) of the uri, mod ``shards``."""
    digest = hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def global_id(shard: int, local: int) -> int:
    return (shard << ID_BITS) | local


def split_id(gid: int) -> tuple[int, int]:
    """``(shard, local id)`` of a global id."""
    return int(gid) >> ID_BITS, int(gid) & _LOCAL


def shard_dir(path: Path, shard: int) -> Path:
    return path / f"shard-{shard:03d}"


def is_sharded(path: str | Path) -> bool:
    return (Path(path).expanduser() / SHARDS_FILE).is_file()


def shard_count(path: str | Path) -> int:
    """How many shards the sharded collection at ``path`` has (from ``shards.json``)."""
    try:
        return int(json.loads((Path(path).expanduser() / SHARDS_FILE).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"no sharded collection at {path} ({SHARDS_FILE}: {e})") from e


class ShardUnavailable(RuntimeError):
    """A shard failed or missed the deadline (REST: 503 naming it, unless the request allows partial)."""

    def __init__(self, shards: dict[int, str]):
        self.shards = shards
        names = ", ".join(f"shard {s} ({why})" for s, why in sorted(shards.items()))
        super().__init__(f"search incomplete: {names}")


@dataclasses.dataclass
class ShardedAnswer:
    hits: list[list[Hit]]  # per query, merged by score, global ids (lexical: one list)
    failed: dict[int, str]  # shard -> why it is missing (empty: complete)

    @property
    def partial(self) -> bool:
        return bool(self.failed)


class ShardedCollection:
    """The read API of :class:`~index.collection.Collection` (plus routed writes) over ``S`` shards."""

    def __init__(
        self, path: Path, shards: Sequence[Any], config: dict[str, Any], *, deadline_s: float | None = None
    ):
        self.path = path
        self.shards = list(shards)  # Collection, or a proxy with its methods (a Ray actor)
        self.config = config
        self.dim = int(config["dim"])
        self.embedder_id = str(config["embedder_id"])
        self.readonly = all(s.readonly for s in shards)
        self.deadline_s = deadline_s  # how long a fan-out waits for a shard by default (None: no limit)
        self._closed = False
        self._pools = [
            ThreadPoolExecutor(max_workers=THREADS_PER_SHARD, thread_name_prefix=f"shard{s}")
            for s in range(len(self.shards))
        ]

    # lifecycle ----------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, *, shards: int, dim: int, embedder_id: str, **kw: Any
    ) -> ShardedCollection:
        path = Path(path).expanduser()
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
        if is_sharded(path):
            raise ValueError(f"a sharded collection already exists at {path}: open it")
        if (path / "meta.sqlite").exists():
            raise ValueError(f"{path} holds an unsharded collection: give the shards another folder")
        path.mkdir(parents=True, exist_ok=True)
        colls = [
            Collection.open_or_create(shard_dir(path, s), dim=dim, embedder_id=embedder_id, **kw)
            for s in range(shards)
        ]
        config = {
            "format": 1,
            "shards": shards,
            "id_bits": ID_BITS,
            "embedder_id": embedder_id,
            "dim": int(dim),
        }
        atomic_write_json(path / SHARDS_FILE, config)  # the commit point: the shards exist before it
        return cls(path, colls, config)

    @classmethod
    def open(
        cls, path: str | Path, *, readonly: bool = False, deadline_s: float | None = None
    ) -> ShardedCollection:
        path = Path(path).expanduser()
        try:
            config = json.loads((path / SHARDS_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"no sharded collection at {path} ({SHARDS_FILE}: {e})") from e
        if int(config.get("id_bits", -1)) != ID_BITS:
            raise ValueError(f"{path / SHARDS_FILE}: id_bits {config.get('id_bits')} is not {ID_BITS}")
        colls = [Collection.open(shard_dir(path, s), readonly=readonly) for s in range(int(config["shards"]))]
        bad = [c for c in colls if c.embedder_id != config["embedder_id"] or c.dim != int(config["dim"])]
        if bad:
            for c in colls:
                c.close()
            raise ValueError(f"shard {bad[0].path} holds vectors of another model than {SHARDS_FILE} says")
        return cls(path, colls, config, deadline_s=deadline_s)

    @classmethod
    def open_or_create(
        cls, path: str | Path, *, shards: int, dim: int, embedder_id: str, **kw: Any
    ) -> ShardedCollection:
        if is_sharded(path):
            coll = cls.open(path, readonly=kw.pop("readonly", False))
            if len(coll.shards) != shards or coll.embedder_id != embedder_id or coll.dim != int(dim):
                coll.close()
                raise ValueError(
                    f"{path} holds {len(coll.shards)} shards of {coll.embedder_id!r} (dim {coll.dim}), "
                    f"not {shards} of {embedder_id!r} (dim {dim})"
                )
            return coll
        return cls.create(path, shards=shards, dim=dim, embedder_id=embedder_id, **kw)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)  # a hung shard must not hang the close
        for c in self.shards:
            c.close()

    def save(self) -> None:
        for c in self.shards:
            c.save()

    def __enter__(self) -> ShardedCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedCollection({str(self.path)!r}, shards={len(self.shards)}, dim={self.dim})"

    # ids ------------------------------------------------------------------------------------------------
    def _owner(self, gid: int) -> tuple[Collection, int, int] | None:
        shard, local = split_id(gid)
        if gid < 0 or shard >= len(self.shards):
            return None
        return self.shards[shard], shard, local

    @staticmethod
    def _globalise(item: Item, shard: int) -> Item:
        return dataclasses.replace(item, id=global_id(shard, item.id))

    # reads ----------------------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int = 10, filter: Filter | None = None, offset: int = 0
    ) -> list[list[Hit]]:
        """Like :meth:`Collection.search`; raises :class:`ShardUnavailable` if any shard cannot answer."""
        return self.search_shards(queries, k, filter, offset).hits

    def search_shards(
        self,
        queries: np.ndarray,
        k: int = 10,
        filter: Filter | None = None,
        offset: int = 0,
        *,
        deadline_s: float | None = None,
        allow_partial: bool = False,
    ) -> ShardedAnswer:
        """Fan ``queries`` (q, dim) out to every shard, wait up to ``deadline_s`` (default: the collection's
        ``deadline_s``), merge by score."""
        if k < 1 or offset < 0:
            raise ValueError(f"k must be >= 1 and offset >= 0 (got k={k}, offset={offset})")
        want = k + offset
        per_shard, failed = self._fan_out(
            lambda s, c: c.search(queries, want, self._local_filter(filter, s), 0), deadline_s, allow_partial
        )
        n_q = 1 if np.ndim(queries) == 1 else len(queries)
        merged: list[list[Hit]] = []
        for qi in range(n_q):
            rows = [
                [Hit(global_id(s, h.id), h.score, self._globalise(h.item, s)) for h in hits[qi]]
                for s, hits in per_shard.items()
            ]
            best = heapq.nlargest(want, (h for row in rows for h in row), key=lambda h: (h.score, -h.id))
            merged.append(best[offset:want])
        return ShardedAnswer(merged, failed)

    def _fan_out(
        self, call: Callable[[int, Any], Any], deadline_s: float | None, allow_partial: bool
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """``call(shard number, shard)`` on every shard in parallel: ``(answers, failed)`` by shard.

        A shard that raises (other than ValueError, the caller's error, the same on every shard) or misses
        the deadline is ``failed``; unless ``allow_partial``, any failure raises :class:`ShardUnavailable`.
        """
        deadline_s = self.deadline_s if deadline_s is None else deadline_s
        futures: dict[int, Future] = {s: self._pools[s].submit(call, s, c) for s, c in enumerate(self.shards)}
        end = None if deadline_s is None else time.monotonic() + deadline_s
        answers: dict[int, Any] = {}
        failed: dict[int, str] = {}
        for s, fut in futures.items():
            try:
                left = None if end is None else max(0.0, end - time.monotonic())
                answers[s] = fut.result(timeout=left)
            except FutureTimeout:
                fut.cancel()  # still queued (its shard is busy or hung): never run it
                failed[s] = f"no answer within {deadline_s:.3f}s"
            except ShardUnavailable as e:  # a proxy that could not reach its shard says why
                failed[s] = e.shards.get(s, str(e))
            except ValueError:
                raise  # a bad query is the caller's error, the same on every shard
            except Exception as e:  # noqa: BLE001 - any shard failure is reported by name
                log.warning("shard %d of %s failed: %s", s, self.path, e)
                failed[s] = f"{type(e).__name__}: {e}"
        if failed and not allow_partial:
            raise ShardUnavailable(failed)
        return answers, failed

    def tolerant(self) -> PartialReader:
        """A view for one query that answers from the shards that can (see :class:`PartialReader`)."""
        return PartialReader(self)

    def _local_filter(self, f: Filter | None, shard: int) -> Filter | None:
        """``f`` with its ``exclude_ids`` (global) narrowed to the local ids of ``shard``."""
        if f is None or not f.exclude_ids:
            return f
        local = [split_id(g)[1] for g in f.exclude_ids if split_id(g)[0] == shard]
        return dataclasses.replace(f, exclude_ids=local or None)

    def lexical_search(self, text: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        """BM25 per shard (each with its own term statistics; see the module doc), merged by score.
        Raises :class:`ShardUnavailable` if any shard cannot answer."""
        return self.lexical_shards(text, k, filter).hits[0]

    def lexical_shards(
        self,
        text: str,
        k: int = 10,
        filter: Filter | None = None,
        *,
        deadline_s: float | None = None,
        allow_partial: bool = False,
    ) -> ShardedAnswer:
        """:meth:`lexical_search` fanned out like :meth:`search_shards` (``hits``: one merged list)."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        per_shard, failed = self._fan_out(
            lambda s, c: c.lexical_search(text, k, self._local_filter(filter, s)), deadline_s, allow_partial
        )
        hits = [
            Hit(global_id(s, h.id), h.score, self._globalise(h.item, s))
            for s, rows in per_shard.items()
            for h in rows
        ]
        return ShardedAnswer([heapq.nlargest(k, hits, key=lambda h: (h.score, -h.id))], failed)

    def get(self, id: int) -> Item | None:
        owner = self._owner(id)
        item = owner[0].get(owner[2]) if owner else None
        return None if item is None or owner is None else self._globalise(item, owner[1])

    def vector(self, id: int) -> np.ndarray | None:
        owner = self._owner(id)
        return owner[0].vector(owner[2]) if owner else None

    def vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The stored vectors of global ``ids``, one batched read per owning shard."""
        by: dict[int, list[int]] = {}
        for g in ids:
            owner = self._owner(int(g))
            if owner is not None:
                by.setdefault(owner[1], []).append(owner[2])
        out: dict[int, np.ndarray] = {}
        for s, local_ids in by.items():
            out.update((global_id(s, i), v) for i, v in self.shards[s].vectors(local_ids).items())
        return out

    def find_by_uri(self, uri: str) -> Item | None:
        s = shard_of(uri, len(self.shards))
        item = self.shards[s].find_by_uri(uri)
        return None if item is None else self._globalise(item, s)

    def find_by_sha256(self, sha256: str) -> list[Item]:
        """Items with this content in any shard (the same bytes under two uris may live in two shards)."""
        found, _ = self._fan_out(lambda s, c: c.find_by_sha256(sha256), None, False)
        return [self._globalise(it, s) for s in sorted(found) for it in found[s]]

    def uris_under(self, prefix: str) -> set[str]:
        return set().union(*(c.uris_under(prefix) for c in self.shards))

    def count(self, modality: str | None = None) -> int:
        return sum(c.count(modality) for c in self.shards)

    def items(
        self, *, modality: str | None = None, limit: int = 100, offset: int = 0, include_errors: bool = False
    ) -> list[Item]:
        """Items in global id order (shard by shard, each in its id order)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0 (got {limit}, {offset})")
        out: list[Item] = []
        for s, c in enumerate(self.shards):
            if len(out) >= limit:
                break
            page = c.items(
                modality=modality, limit=offset + limit - len(out), offset=0, include_errors=include_errors
            )
            skip = min(offset, len(page))
            offset -= skip
            out += [self._globalise(it, s) for it in page[skip:]]
        return out[:limit]

    def stats(self) -> dict[str, Any]:
        per = [c.stats() for c in self.shards]
        by_modality: dict[str, int] = {}
        for p in per:
            for m, n in p["by_modality"].items():
                by_modality[m] = by_modality.get(m, 0) + n
        return {
            "items": sum(p["items"] for p in per),
            "by_modality": by_modality,
            "errors": sum(p["errors"] for p in per),
            "index": sorted({p["index"] for p in per}),
            "ntotal": sum(p["ntotal"] for p in per),
            "bytes": sum(p["bytes"] for p in per),
            "shards": len(per),
            "per_shard": [{k: p[k] for k in ("items", "index", "ntotal", "generation")} for p in per],
            "embedder_id": self.embedder_id,
            "dim": self.dim,
            "path": str(self.path),
        }

    # writes (never partial: each goes to its owning shards) --------------------------------------------
    def shard_for(self, item: Item) -> int:
        """The shard ``item`` is written to: by its uri, or by its content (sha256) when it has none."""
        key = item.uri or item.sha256
        if not key:
            raise ValueError("items of a sharded collection need a uri or a sha256 (it picks their shard)")
        return shard_of(key, len(self.shards))

    def _by_shard(self, items: Sequence[Item]) -> dict[int, list[int]]:
        rows: dict[int, list[int]] = {}
        for row, it in enumerate(items):
            rows.setdefault(self.shard_for(it), []).append(row)
        return rows

    def _write(self, method: str, vectors: np.ndarray, items: list[Item]) -> list[int]:
        x = np.asarray(vectors, dtype=np.float32).reshape(len(items), -1) if items else vectors
        out = [0] * len(items)
        for s, rows in self._by_shard(items).items():
            ids = getattr(self.shards[s], method)(x[rows], [items[r] for r in rows])
            for r, local in zip(rows, ids, strict=True):
                out[r] = global_id(s, local)
        return out

    def add(self, vectors: np.ndarray, items: list[Item]) -> list[int]:
        return self._write("add", vectors, items)

    def upsert(self, vectors: np.ndarray, items: list[Item]) -> list[int]:
        return self._write("upsert", vectors, items)

    def delete(self, ids: Iterable[int]) -> int:
        by: dict[int, list[int]] = {}
        for g in ids:
            owner = self._owner(int(g))
            if owner is not None:
                by.setdefault(owner[1], []).append(owner[2])
        return sum(self.shards[s].delete(local) for s, local in by.items())

    def update_metadata(self, id: int, **fields: Any) -> None:
        owner = self._owner(id)
        if owner is None:
            raise ValueError(f"no item {id} in {self.path}")
        owner[0].update_metadata(owner[2], **fields)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(global ids (n,), vectors (n, dim))`` in global id order."""
        parts = [(s, *c.all_vectors()) for s, c in enumerate(self.shards)]
        ids = np.concatenate([(np.int64(s) << ID_BITS) | i for s, i, _ in parts])
        return ids, np.concatenate([v for _, _, v in parts])


class PartialReader:
    """A sharded collection as one query that allows a partial answer reads it: its searches answer from
    the shards that answered within the deadline and record the others in ``failed`` (shard -> why);
    everything else is the collection's own. One per query (``failed`` is that query's)."""

    def __init__(self, sharded: ShardedCollection):
        self.sharded = sharded
        self.failed: dict[int, str] = {}

    def search(
        self, queries: np.ndarray, k: int = 10, filter: Filter | None = None, offset: int = 0
    ) -> list[list[Hit]]:
        answer = self.sharded.search_shards(queries, k, filter, offset, allow_partial=True)
        self.failed.update(answer.failed)
        return answer.hits

    def lexical_search(self, text: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        answer = self.sharded.lexical_shards(text, k, filter, allow_partial=True)
        self.failed.update(answer.failed)
        return answer.hits[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sharded, name)


def ingest_sharded(sharded: ShardedCollection, embedder: Any, paths: Sequence[str | Path], **kw: Any) -> Any:
    """:func:`index.ingest.ingest` into the shards: the files are listed once, split by
    ``shard_of(path)`` and each shard ingests its own (resuming, i.e. skipping unchanged files, as one
    collection does). Returns one merged ``IngestReport``. Duplicate content is detected within a shard
    only (the same bytes under two paths in two shards are two items)."""
    from index.ingest import discover, ingest
    from index.types import IngestReport

    t0 = time.perf_counter()
    cands, errors = discover(paths, embedder.media, kw.get("allowed_roots"))
    by: dict[int, list[Path]] = {}
    for c in cands:
        by.setdefault(shard_of(str(c.path), len(sharded.shards)), []).append(c.path)
    total = IngestReport(errors=list(errors), failed=len(errors), seen=len(errors))
    for s, files in sorted(by.items()):
        r = ingest(sharded.shards[s], embedder, files, **kw)
        for f in ("added", "updated", "skipped", "failed", "seen"):
            setattr(total, f, getattr(total, f) + getattr(r, f))
        total.errors += r.errors
    total.seconds = time.perf_counter() - t0
    return total
