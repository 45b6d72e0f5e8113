"""A collection: a directory holding the vectors of one embedder and everything known about them.

```
<dir>/collection.json     embedder id, dim, index spec, policy, generation, created time
<dir>/meta.sqlite         items + their float32 vectors (WAL); the source of truth
<dir>/vectors.faiss       one joint IndexIDMap2 over every modality (filters pick modalities)
<dir>/vectors.faiss.json  sidecar: the generation the .faiss file was written at
<dir>/write.lock          flock taken by the (one) writer
```

Every committed change bumps the generation in SQLite; :meth:`Collection.save` writes the FAISS file and
then its sidecar with that generation. On open the two must agree: if they do not (a crash between the
SQLite commit and the FAISS write, a missing or corrupt ``.faiss``), the index is rebuilt from the vectors
in SQLite and a warning says so.

Creation commits at one point: the config row in ``meta.sqlite``, written under the writer lock. A
``meta.sqlite`` without it (and without items) is a creation killed half-way: the next writable open
removes it (and :meth:`Collection.open_or_create` then creates afresh); the files written after the
commit point are derived and repaired on open. :meth:`Collection.check` reports the invariants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index.atomic import FileLock, RWLock, atomic_temp_files, atomic_write, atomic_write_json, fsync_dir
from index.filters import exclude, filter_where, needs_sql
from index.lexical import lexical_search
from index.store import MetaStore
from index.types import Filter, Hit, Item
from index.vectors import (
    IndexPolicy,
    VectorIndex,
    choose_spec,
    spec_tier,
    train_threshold,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "collection.json"
META_FILE = "meta.sqlite"
VECTORS_FILE = "vectors.faiss"
SIDECAR_FILE = "vectors.faiss.json"
LOCK_FILE = "write.lock"
FORMAT = 1
_USER = "user:"  # prefix of caller meta keys, so they cannot clobber internal ones


class Collection:
    """Vectors + metadata of one embedder. Use :meth:`create`, :meth:`open` or :meth:`open_or_create`.

    One writer at a time (thread lock + file lock); searches run concurrently with each other and with
    the SQLite part of writes.
    """

    def __init__(self, path: Path, config: dict[str, Any], store: MetaStore, readonly: bool):
        self.path = path
        self.dim = int(config["dim"])
        self.embedder_id = str(config["embedder_id"])
        self.index_spec = str(config.get("index_spec") or "auto")  # "auto" or a forced factory string
        self.memory_budget_mb = int(config.get("memory_budget_mb", 1024))
        self.policy = IndexPolicy(**config.get("policy", {}))
        self.readonly = readonly
        self.store = store
        self.generation = 0
        self._config = config
        self._wlock = threading.RLock()
        self._flock = FileLock(path / LOCK_FILE)
        self._rw = RWLock()
        self._vindex: VectorIndex | None = None
        self._saved_generation = -1
        self._defer = 0

    # lifecycle ----------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        embedder_id: str,
        index_spec: str | None = None,
        memory_budget_mb: int = 1024,
        policy: IndexPolicy | None = None,
    ) -> Collection:
        """Make a new empty collection in directory ``path`` (created if needed)."""
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file; a collection needs a directory")
        if int(dim) <= 0 or not embedder_id:
            raise ValueError(
                f"a collection needs a positive dim and an embedder id (got {dim}, {embedder_id!r})"
            )
        if memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        spec = (index_spec or "auto").strip()
        if spec != "auto":
            _check_spec(spec, int(dim))
        if _creation_state(path) == "committed":
            raise _AlreadyExists(f"a collection already exists at {path}: open it with Collection.open")
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "embedder_id": embedder_id,
            "dim": int(dim),
            "index_spec": spec,
            "memory_budget_mb": int(memory_budget_mb),
            "policy": dataclasses.asdict(policy or IndexPolicy()),
            "created_at": time.time(),
            "generation": 0,
        }
        # Under the writer lock, so that a concurrent open never takes this creation for a dead one.
        with FileLock(path / LOCK_FILE):
            state = _creation_state(path, recover=True)
            if state == "committed":
                raise _AlreadyExists(f"a collection already exists at {path}: open it with Collection.open")
            if state == "partial":
                _discard_partial(path)
            store = MetaStore(path / META_FILE, dim=int(dim))
            store.set_meta("config", config)  # the commit point: from here on the collection exists
        coll = cls(path, config, store, readonly=False)
        coll._vindex = coll._rebuild_index()
        coll.generation = store.generation()
        coll.save()
        log.info("created collection %s (dim %d, index %s)", path, dim, spec)
        return coll

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> Collection:
        """Open an existing collection, repairing the FAISS file from SQLite if the two disagree."""
        path = Path(path).expanduser()
        state = _creation_state(path, recover=not readonly)
        if state == "partial":
            if readonly:
                raise ValueError(
                    f"the creation of the collection at {path} was interrupted; open it writable "
                    f"(e.g. `mm index FILES --collection {path}`) to clean it up"
                )
            state = _clean_partial(path)
        if state == "none":
            raise ValueError(
                f"no collection at {path}: create one with `mm index FILES --collection {path}` "
                "or Collection.create(path, dim=..., embedder_id=...)"
            )
        try:
            store = MetaStore(path / META_FILE, dim=1, readonly=readonly)
            config = store.get_meta("config")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path / META_FILE} cannot be read ({e}); restore it from a backup") from e
        saved = config
        try:
            on_disk = json.loads((path / CONFIG_FILE).read_text())
            if not isinstance(on_disk, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            on_disk = None
            if saved is None:
                store.close()
                raise ValueError(f"{path} has no readable {CONFIG_FILE} and no config in SQLite") from e
            log.warning("collection %s: %s unreadable (%s); using the copy in SQLite", path, CONFIG_FILE, e)
        # SQLite's copy commits with the data it describes (a re-embedding changes both at once), so it
        # wins; the file adds what save() records (generation, index type, updated_at).
        config = {**(on_disk or {}), **(saved or {})}
        store.dim = int(config["dim"])
        coll = cls(path, config, store, readonly=readonly)
        if not readonly:
            stale = on_disk is None or any(
                on_disk.get(k) != v for k, v in (saved or {}).items() if k != "generation"
            )
            coll._finish_open(rewrite_config=stale)
        coll._load_index(on_open=True)
        return coll

    @classmethod
    def open_or_create(cls, path: str | Path, *, dim: int, embedder_id: str, **kw: Any) -> Collection:
        """Open the collection at ``path`` (its ``embedder_id`` and ``dim`` must match), else create it."""
        path = Path(path).expanduser()
        readonly = kw.pop("readonly", False)
        state = _creation_state(path, recover=not readonly)
        if state == "partial" and not readonly:
            state = _clean_partial(path)
        if state in ("none", "partial"):
            try:
                return cls.create(path, dim=dim, embedder_id=embedder_id, **kw)
            except _AlreadyExists:
                pass  # another process created it meanwhile: open that one
        coll = cls.open(path, readonly=readonly)
        if coll.embedder_id != embedder_id or coll.dim != int(dim):
            coll.close()
            raise ValueError(
                f"collection {path} holds vectors of {coll.embedder_id!r} (dim {coll.dim}), not "
                f"{embedder_id!r} (dim {dim}): use another collection path or the same model"
            )
        return coll

    def close(self) -> None:
        if not self.readonly and self._vindex is not None:
            self.save()
        self.store.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Collection({str(self.path)!r}, dim={self.dim}, embedder_id={self.embedder_id!r})"

    def _finish_open(self, *, rewrite_config: bool) -> None:
        """Complete what a killed process left: a missing or outdated ``collection.json``, temp files."""
        with self._wlock, self._flock:
            if rewrite_config:
                atomic_write_json(self.path / CONFIG_FILE, self._config)
            for tmp in atomic_temp_files(*(self.path / n for n in (VECTORS_FILE, SIDECAR_FILE, CONFIG_FILE))):
                # every writer of these files holds the lock we hold: a temp file here is a dead write's
                log.info("collection %s: removing %s left by an interrupted save", self.path, tmp.name)
                tmp.unlink(missing_ok=True)

    # persistence --------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the FAISS file and its sidecar (atomically) if anything changed since the last save."""
        if self.readonly:
            return
        with self._wlock, self._flock:
            if self._saved_generation == self.generation and (self.path / VECTORS_FILE).exists():
                return
            if self.store.generation() != self.generation:
                log.debug("collection %s changed in another process; not saving a stale index", self.path)
                return
            vi = self._vindex
            assert vi is not None
            atomic_write(self.path / VECTORS_FILE, vi.write)
            sidecar = {"generation": self.generation, "spec": vi.spec, "ntotal": vi.ntotal, "live": vi.live}
            atomic_write_json(self.path / SIDECAR_FILE, sidecar)
            self._config.update(generation=self.generation, index=vi.spec, updated_at=time.time())
            atomic_write_json(self.path / CONFIG_FILE, self._config)
            self._saved_generation = self.generation
            self.store.trim_changes()

    @contextlib.contextmanager
    def bulk(self) -> Iterator[Collection]:
        """Defer FAISS writes and index type switches to the end of the block (SQLite still commits
        each change; searches meanwhile see every change, in the index type the block started with).

        A crash inside the block loses nothing committed: the next open catches the FAISS file up from
        the change log, or rebuilds it from SQLite when most of the collection changed.
        """
        with self._wlock:
            self._defer += 1
        try:
            yield self
        finally:
            with self._wlock:
                self._defer -= 1
                if self._defer == 0:
                    # one switch at the end: a bulk load of 1M would otherwise build Flat, then HNSW,
                    # then IVF (each a rebuild from SQLite) on its way up
                    self._maybe_switch()
                    self.save()

    def refresh(self) -> bool:
        """Pick up changes another process committed; True if there were any.

        Searches call this themselves (see :meth:`_follow`); it applies only the vectors that changed
        since the generation this index is at (``vector_changes`` in SQLite), and reloads the whole index
        only when that log does not reach back far enough or most of the collection changed.
        """
        if self.store.generation() == self.generation:
            return False
        with self._wlock:
            if self.store.generation() == self.generation:
                return False
            self._catch_up()
        return True

    def _follow(self) -> None:
        """Before a search: catch up if another process committed (one indexed SQLite read when not)."""
        if self.store.generation() == self.generation:
            return
        # Busy: this process is writing, and its own write catches up first (see _writing); a search
        # never waits for that, it answers from the index as it is.
        if not self._wlock.acquire(blocking=False):
            return
        try:
            if self.store.generation() != self.generation:
                self._catch_up()
        finally:
            self._wlock.release()

    def _sync_config(self) -> None:
        """Follow a config change another process committed (a re-embedding changes the embedder id), so
        that this handle neither reports nor saves the old one."""
        saved = self.store.get_meta("config")
        if not isinstance(saved, dict):
            return
        if any(self._config.get(k) != v for k, v in saved.items() if k != "generation"):
            if saved.get("embedder_id") != self.embedder_id:
                log.warning(
                    "collection %s now holds vectors of %r (was %r): restart what embeds with the old model",
                    self.path,
                    saved.get("embedder_id"),
                    self.embedder_id,
                )
            self._config = {**self._config, **saved, "generation": self._config.get("generation", 0)}
            self.embedder_id = str(saved["embedder_id"])

    def _catch_up(self) -> None:
        """Apply what other processes committed since ``self.generation`` (the caller holds ``_wlock``)."""
        self._sync_config()
        vi = self._vindex
        assert vi is not None
        changes = self.store.changes_since(self.generation, max_ids=vi.live // 2 + 1000)
        if changes is None:  # the log does not reach back, or most of the collection changed
            self._load_index(on_open=False)
            return
        side = self._read_sidecar()
        saved = side is not None and int(side["generation"]) == changes.generation
        # An HNSW insert costs ~100x reading its share of the file: past ~1% changed, reading the file
        # the writer saved is faster (an unsaved state is still caught up, rather than rebuilt).
        if saved and vi.kind == "hnsw" and len(changes.changed) > max(200, vi.live // 100):
            self._load_index(on_open=False)
            return
        try:
            with self._rw.write():
                vi.remove(changes.changed)  # ids absent from the index are ignored
                if len(changes.ids):
                    vi.add(changes.ids, changes.vectors)
            consistent = vi.live == changes.live
        except Exception:
            log.exception("collection %s: applying changes from another process failed", self.path)
            consistent = False
        if not consistent:
            log.warning("collection %s: index out of step after catching up; reloading it", self.path)
            self._load_index(on_open=False)
            return
        log.debug(
            "collection %s: applied %d changed vectors, generation %d -> %d",
            self.path,
            len(changes.changed),
            self.generation,
            changes.generation,
        )
        self.generation = changes.generation
        if saved:
            self._saved_generation = self.generation  # the writer saved this state: nothing to write
        self._maybe_switch()

    def _read_sidecar(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path / SIDECAR_FILE).read_text())
            return data if isinstance(data, dict) and "generation" in data else None
        except (OSError, ValueError):
            return None

    def _load_index(self, *, on_open: bool) -> None:
        gen = self.store.generation()
        side = self._read_sidecar()
        vi, reason = None, None
        caught_up = False
        if side is None:
            reason = f"{SIDECAR_FILE} is missing or unreadable"
        elif int(side["generation"]) != gen:
            reason = f"{VECTORS_FILE} is at generation {side['generation']} but {META_FILE} at {gen}"
            # a writer killed after its SQLite commit, before its FAISS save: the file plus the change
            # log since its generation is the index now (a million vectors are not rebuilt for one edit)
            found = self._load_stale(int(side["generation"]), str(side.get("spec", "Flat")))
            if found is not None:
                vi, gen = found
                reason, caught_up = None, True
        else:
            try:
                vi = VectorIndex.read(self.path / VECTORS_FILE, str(side.get("spec", "Flat")), self.policy)
            except (RuntimeError, ValueError, OSError) as e:
                reason = f"{VECTORS_FILE} cannot be read ({str(e).strip().splitlines()[-1][:160]})"
            else:
                if vi.dim != self.dim:
                    reason = f"{VECTORS_FILE} has dim {vi.dim}, the collection {self.dim}"
                elif not np.array_equal(np.sort(vi.live_ids()), self.store.all_ids()):
                    reason = f"{VECTORS_FILE} holds other ids than {META_FILE}"
        if reason is not None:
            n = self.store.count()
            if on_open:
                log.warning(
                    "collection %s: %s; rebuilding the FAISS index from the %d vectors in SQLite",
                    self.path,
                    reason,
                    n,
                )
            else:
                log.info("collection %s changed elsewhere (%s); reloading %d vectors", self.path, reason, n)
            vi = self._rebuild_index()
        with self._rw.write():
            self._vindex = vi
        self.generation = gen
        if caught_up:
            log.info(
                "collection %s: caught %s up to generation %d from the change log",
                self.path,
                VECTORS_FILE,
                gen,
            )
        if reason is None and not caught_up:
            self._saved_generation = gen
        elif not self.readonly:
            with self._wlock:
                self._saved_generation = -1
                if on_open:  # a catch-up runs in a search: the writer saves its own file, close() ours
                    with self._flock:
                        self.save()

    def _load_stale(self, file_gen: int, spec: str) -> tuple[VectorIndex, int] | None:
        """The FAISS file at ``file_gen`` brought up to date from ``vector_changes``: ``(index, generation)``,
        or None when the log does not reach back that far, most of the collection changed, or the result
        does not hold exactly SQLite's ids (then the caller rebuilds)."""
        try:
            vi = VectorIndex.read(self.path / VECTORS_FILE, spec, self.policy)
        except (RuntimeError, ValueError, OSError):
            return None
        if vi.dim != self.dim:
            return None
        changes = self.store.changes_since(file_gen, max_ids=vi.live // 2 + 1000)
        if changes is None:
            return None
        try:
            vi.remove(changes.changed)
            if len(changes.ids):
                vi.add(changes.ids, changes.vectors)
        except Exception:
            log.exception("collection %s: applying the change log to %s failed", self.path, VECTORS_FILE)
            return None
        # the ids must be SQLite's (at the log's snapshot; a writer committing meanwhile fails this, and
        # the caller rebuilds: correct, only slower)
        if not np.array_equal(np.sort(vi.live_ids()), self.store.all_ids()):
            return None
        return vi, changes.generation

    # index type -------------------------------------------------------------------------------------
    def _target_spec(self, n: int) -> str:
        if self.index_spec == "auto":
            return choose_spec(n, self.dim, self.memory_budget_mb, self.policy)
        return self.index_spec if n >= train_threshold(self.index_spec) else "Flat"

    def _rebuild_index(self, spec: str | None = None) -> VectorIndex:
        ids, vecs = self.store.vectors()
        spec = spec or self._target_spec(len(ids))
        t0 = time.perf_counter()
        vi = VectorIndex.build(spec, self.dim, ids, vecs, self.policy)
        if len(ids):
            log.info("built %s over %d vectors in %.2fs", spec, len(ids), time.perf_counter() - t0)
        return vi

    def _maybe_switch(self) -> bool:
        """Move to another index type when the count crosses a threshold; compact tombstones. True if
        the index was rebuilt."""
        vi = self._vindex
        assert vi is not None
        n = vi.live
        target = self._target_spec(n)
        if self.index_spec == "auto":
            grow = spec_tier(target) > spec_tier(vi.spec)
            # hysteresis: shrink only when even twice as many vectors would not need the current type
            shrink = spec_tier(self._target_spec(2 * n)) < spec_tier(vi.spec)
            switch = grow or shrink
        else:
            switch = vi.spec != target and vi.spec == "Flat"
        dead = vi.tombstones > self.policy.tombstone_ratio * max(vi.ntotal, 1)
        if not (switch or dead):
            return False
        if switch:
            log.info("collection %s: %d vectors, switching index %s -> %s", self.path, n, vi.spec, target)
        new = self._rebuild_index(target if switch else vi.spec)
        with self._rw.write():
            self._vindex = new
        return True

    # writes ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        if self.readonly:
            raise ValueError(
                f"collection {self.path} is open read-only; open it with readonly=False to change it"
            )
        with self._wlock, self._flock:
            if self.store.generation() != self.generation:  # another process wrote since we loaded
                self._catch_up()
            yield

    def _apply(self, gen: int, remove: list[int], add_ids: list[int], add_vecs: np.ndarray | None) -> None:
        """Mirror a committed SQLite change in FAISS; on any failure rebuild from SQLite."""
        try:
            with self._rw.write():
                assert self._vindex is not None
                if remove:
                    self._vindex.remove(np.asarray(remove, dtype=np.int64))
                if add_ids:
                    assert add_vecs is not None  # ids to add come with their vectors
                    self._vindex.add(np.asarray(add_ids, dtype=np.int64), add_vecs)
        except Exception:
            log.exception("collection %s: FAISS update failed; rebuilding from SQLite", self.path)
            new = self._rebuild_index()
            with self._rw.write():
                self._vindex = new
        self.generation = gen
        if self._defer == 0:
            switched = self._maybe_switch()
            if switched or self._save_due():
                self.save()

    def _save_due(self) -> bool:
        """Whether a single write rewrites the FAISS file now. A small file: always. A large one
        (``policy.lazy_save_mb``; 260 MB at 1M as IVF-SQ8, ~0.5 s a write): every ``policy.save_every``
        generations, and on close; a crash in between is caught up from the change log on open."""
        try:
            size = (self.path / VECTORS_FILE).stat().st_size
        except OSError:
            return True
        if self._saved_generation < 0 or size < self.policy.lazy_save_mb * (1 << 20):
            return True
        return self.generation - self._saved_generation >= self.policy.save_every

    def _check_vectors(self, vectors: np.ndarray, n: int) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim == 1 and n == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape != (n, self.dim):
            raise ValueError(
                f"expected vectors of shape ({n}, {self.dim}) for {n} items, got {tuple(x.shape)}"
            )
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or inf; check the embedder output")
        return x

    def add(self, vectors: np.ndarray, items: list[Item]) -> list[int]:
        """Add new items with their vectors (n, dim); ``item.id`` is ignored. Returns the assigned ids."""
        x = self._check_vectors(vectors, len(items))
        if not items:
            return []
        now = time.time()
        with self._writing():
            with self.store.transaction() as conn:
                ids = [
                    self.store.insert(conn, _stamp(it, now, created=it.created_at or now), v)
                    for it, v in zip(items, x, strict=True)
                ]
                gen = self.store.bump_generation(conn)
            self._apply(gen, [], ids, x)
        return ids

    def upsert(self, vectors: np.ndarray, items: list[Item]) -> list[int]:
        """Like :meth:`add`, but an item whose ``uri`` is already stored replaces it, keeping its id."""
        x = self._check_vectors(vectors, len(items))
        if not items:
            return []
        now = time.time()
        ids: list[int] = []
        remove: set[int] = set()
        with self._writing():
            with self.store.transaction() as conn:
                for it, v in zip(items, x, strict=True):
                    old = self.store.find_by_uri(it.uri) if it.uri else None
                    if old is None:
                        ids.append(self.store.insert(conn, _stamp(it, now, created=it.created_at or now), v))
                        continue
                    if old.id not in ids and self.store.has_vector(old.id):
                        remove.add(old.id)
                    self.store.update(conn, old.id, _stamp(it, now, created=old.created_at), v)
                    ids.append(old.id)
                gen = self.store.bump_generation(conn)
            last = {id_: row for row, id_ in enumerate(ids)}  # a uri given twice: the last one wins
            self._apply(gen, sorted(remove), list(last), x[list(last.values())])
        return ids

    def delete(self, ids: Iterable[int]) -> int:
        """Remove items (metadata and vectors). Returns how many existed. Ids are never reused."""
        ids = list(ids)
        if not ids:
            return 0
        with self._writing():
            with self.store.transaction() as conn:
                n, with_vec = self.store.delete(conn, ids)
                gen = self.store.bump_generation(conn) if n else self.generation
            if n:
                self._apply(gen, with_vec, [], None)
        return n

    def replace_vectors(
        self,
        vectors: Mapping[int, np.ndarray],
        *,
        embedder_id: str,
        errors: Mapping[int, str] | None = None,
    ) -> int:
        """Swap every stored vector for one of another embedder, and the collection's embedder id, at once.

        ``vectors``: item id -> its new (dim,) vector. ``errors``: item id -> why it has no new vector (it
        keeps its metadata, loses its old vector, which belongs to the old embedder, and is listed by
        :meth:`errors`). Together they must name every item that holds a vector now, and no id twice, so the
        collection never holds vectors of two embedders; the dimension stays. Ids and metadata are kept.

        The vectors, the errors and the new embedder id commit in one SQLite transaction: a failure or a
        crash before the commit leaves the old vectors and id; after it, the FAISS index is rebuilt from
        SQLite (here, or on the next open if the process dies first). Returns how many vectors were replaced.
        """
        errors = {int(i): str(e) for i, e in (errors or {}).items()}
        ids = [int(i) for i in vectors]
        if not embedder_id:
            raise ValueError("replace_vectors needs the new embedder id")
        twice = sorted(set(ids) & set(errors))
        if twice:
            raise ValueError(f"ids {twice[:5]} have both a new vector and an error; give each one only")
        x = self._check_vectors(
            np.stack([np.asarray(vectors[i]) for i in ids]) if ids else np.zeros((0, self.dim)), len(ids)
        )
        now = time.time()
        with self._writing():
            known = self.store.get_many([*ids, *errors])
            unknown = sorted((set(ids) | set(errors)) - set(known))
            if unknown:
                raise ValueError(f"no items with ids {unknown[:5]} in collection {self.path}")
            left = sorted(set(self.store.all_ids().tolist()) - set(ids) - set(errors))
            if left:
                raise ValueError(
                    f"{len(left)} items with a vector (ids {left[:5]}) have neither a new vector nor an "
                    "error: the collection would mix two embedders (items added meanwhile? re-embed again)"
                )
            # SQLite's copy holds the creation config only; save() adds the file's own fields (index, ...)
            stored = {**(self.store.get_meta("config") or self._config), "embedder_id": embedder_id}
            with self.store.transaction() as conn:
                for id_, v in zip(ids, x, strict=True):
                    self.store.update(conn, id_, dataclasses.replace(known[id_], updated_at=now), v)
                for id_, err in errors.items():
                    item = dataclasses.replace(known[id_], error=err, updated_at=now)
                    self.store.update(conn, id_, item, None)
                self.store.set_meta("config", stored, conn=conn)
                gen = self.store.bump_generation(conn)
            self.embedder_id = embedder_id
            self._config = {**self._config, "embedder_id": embedder_id}
            new = self._rebuild_index()
            with self._rw.write():
                self._vindex = new
            self.generation = gen
            self.save()
        log.info(
            "collection %s: %d vectors replaced (%d items without one), embedder %s",
            self.path,
            len(ids),
            len(errors),
            embedder_id,
        )
        return len(ids)

    def record_error(
        self,
        uri: str,
        error: str,
        modality: str = "",
        *,
        sha256: str = "",
        mtime: float = 0.0,
        size: int = 0,
        mime: str = "",
    ) -> None:
        """Remember a file that could not be used (no vector). A stored vector for ``uri`` is dropped."""
        now = time.time()
        with self._writing():
            with self.store.transaction() as conn:
                old = self.store.find_by_uri(uri) if uri else None
                item = Item(
                    id=0,
                    modality=modality,
                    uri=uri,
                    sha256=sha256,
                    mime=mime,
                    size=size,
                    mtime=mtime,
                    error=error,
                )
                remove: list[int] = []
                if old is None:
                    self.store.insert(conn, _stamp(item, now, created=now, error=error), None)
                else:
                    if self.store.has_vector(old.id):
                        remove.append(old.id)
                    item = dataclasses.replace(
                        old,
                        modality=modality or old.modality,
                        sha256=sha256 or old.sha256,
                        mtime=mtime,
                        size=size,
                    )
                    self.store.update(
                        conn, old.id, _stamp(item, now, created=old.created_at, error=error), None
                    )
                gen = self.store.bump_generation(conn)
            self._apply(gen, remove, [], None)

    def update_metadata(self, id: int, **fields: Any) -> None:
        """Change metadata only (``caption``, ``tags``, ``mtime``, ``extra``...), keeping the vector."""
        with self._writing(), self.store.transaction() as conn:
            self.store.update_fields(conn, id, **fields)

    def set_meta(self, key: str, value: Any) -> None:
        """Store a small JSON value (e.g. which LoRA adapter produced the vectors)."""
        if self.readonly:
            raise ValueError(f"collection {self.path} is open read-only")
        self.store.set_meta(_USER + key, value)

    def get_meta(self, key: str, default: Any = None) -> Any:
        return self.store.get_meta(_USER + key, default)

    # reads ----------------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int = 10, filter: Filter | None = None, offset: int = 0
    ) -> list[list[Hit]]:
        """Nearest items by inner product for each query (q, dim) or (dim,), after filter and ``offset``."""
        if k < 1 or offset < 0:
            raise ValueError(f"k must be >= 1 and offset >= 0 (got k={k}, offset={offset})")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(
                f"queries must have shape (q, {self.dim}) or ({self.dim},), got {tuple(q.shape)}"
            )
        self._follow()  # what another process (`mm index`) committed is searched too
        extra = 0
        for attempt in range(3):
            scores, labels = self._search_ids(q, k + offset + extra, filter)
            items = self.store.get_many({int(i) for i in labels.ravel() if i >= 0})
            gone = {int(i) for i in labels.ravel() if i >= 0 and int(i) not in items}
            if attempt < 2 and gone:
                # deleted (here or by another process) after the index was read: catch up, and ask for
                # as many more as went missing in case the deletion is not in the index yet
                self.refresh()
                extra += len(gone)
                continue
            break
        out = []
        for srow, lrow in zip(scores, labels, strict=True):
            hits = [
                Hit(int(i), float(s), items[int(i)])
                for s, i in zip(srow, lrow, strict=True)
                if int(i) in items
            ]
            out.append(hits[offset : offset + k])
        return out

    def _search_ids(self, q: np.ndarray, k: int, filter: Filter | None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and ids (-1 padded) after filtering, from FAISS or exactly from SQLite."""
        allowed = excluded = None
        if needs_sql(filter):
            assert filter is not None
            where, args = filter_where(filter)
            allowed = exclude(self.store.ids_where(where, args), filter)
        elif filter is not None and filter.exclude_ids:
            excluded = np.asarray(filter.exclude_ids, dtype=np.int64)
        if allowed is not None and len(allowed) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        with self._rw.read():
            vi = self._vindex
            assert vi is not None
            exact = allowed is not None and vi.kind != "flat" and len(allowed) <= self.policy.exact_max
            quantized = vi.kind == "ivf" and ("SQ" in vi.spec or "PQ" in vi.spec)
            if not exact:
                wide = k * max(self.policy.rescore, 1) if quantized else k
                scores, labels, full = vi.search(q, wide, allowed, excluded)
                # an approximate index that cannot fill k from a filtered set: fall back to exact
                exact = not full and allowed is not None
        if exact:
            assert allowed is not None
            scores, labels = self._exact_search(q, k, allowed)
        elif quantized:
            scores, labels = self._rescore(q, labels, k)
        return scores, labels

    def _rescore(self, q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Order a quantized index's candidates (Q, c) by their exact scores against the stored float32
        vectors (SQ8 codes cannot tell near-duplicates apart); the top ``k`` (Q, k), -1 padded."""
        ids, vecs = self.store.vectors(np.unique(labels[labels >= 0]))
        row = {int(i): r for r, i in enumerate(ids)}
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for r, lrow in enumerate(labels):
            cand = np.array([i for i in dict.fromkeys(lrow.tolist()) if i in row], dtype=np.int64)
            if not len(cand):
                continue
            s = vecs[[row[int(i)] for i in cand]] @ q[r]
            top = np.argsort(-s, kind="stable")[:k]
            out_s[r, : len(top)] = s[top]
            out_i[r, : len(top)] = cand[top]
        return out_s, out_i

    def lexical_search(self, text: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        """Items whose words match ``text`` by BM25 (higher is better), after ``filter`` (index.lexical)."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        where, args = filter_where(filter) if filter is not None and needs_sql(filter) else ("1", [])
        n_excluded = len(filter.exclude_ids) if filter is not None and filter.exclude_ids else 0
        ids, scores = lexical_search(self.store.conn, text, k + n_excluded, where, args)
        keep = np.isin(ids, exclude(ids, filter))
        ids, scores = ids[keep][:k], scores[keep][:k]
        items = self.store.get_many(int(i) for i in ids)
        pairs = zip(ids.tolist(), scores.tolist(), strict=True)
        return [Hit(i, s, items[i]) for i, s in pairs if i in items]

    def _exact_search(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the stored vectors of ``allowed`` ids: (q, k) scores and ids, padded with -1."""
        ids, vecs = self.store.vectors(allowed)
        scores = q @ vecs.T  # (Q, N)
        k_eff = min(k, len(ids))
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        if k_eff:
            top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
            order = np.take_along_axis(-scores, top, axis=1).argsort(axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            out_s[:, :k_eff] = np.take_along_axis(scores, top, axis=1)
            out_i[:, :k_eff] = ids[top]
        return out_s, out_i

    def get(self, id: int) -> Item | None:
        return self.store.get(id)

    def vector(self, id: int) -> np.ndarray | None:
        """The stored vector (dim,) of item ``id`` (e.g. for more-like-this), None if it has none."""
        return self.store.vector(id)

    def vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The stored vectors (dim,) of ``ids`` in one batched read; ids without a vector are left out."""
        found, vecs = self.store.vectors(np.asarray(list(ids), dtype=np.int64))
        return dict(zip(found.tolist(), vecs, strict=True))

    def find_by_uri(self, uri: str) -> Item | None:
        return self.store.find_by_uri(uri)

    def uris_under(self, prefix: str) -> set[str]:
        """Every stored ``uri`` (items and recorded errors) starting with ``prefix``, e.g. a media folder."""
        return self.store.uris_with_prefix(prefix)

    def find_by_sha256(self, sha256: str) -> list[Item]:
        return self.store.find_by_sha256(sha256)

    def items(
        self, *, modality: str | None = None, limit: int = 100, offset: int = 0, include_errors: bool = False
    ) -> list[Item]:
        """Items in id order (those with vectors; failed files too with ``include_errors``)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0 (got {limit}, {offset})")
        return self.store.list_items(
            modality=modality, limit=limit, offset=offset, include_errors=include_errors
        )

    def errors(self, *, limit: int = 100, offset: int = 0) -> list[Item]:
        """Files that could not be used, with their ``error``."""
        return self.store.errors(limit=limit, offset=offset)

    def count(self, modality: str | None = None) -> int:
        """Items with vectors (of ``modality`` if given)."""
        return self.store.count(modality)

    def stats(self) -> dict[str, Any]:
        vi = self._vindex
        assert vi is not None
        faiss_file = self.path / VECTORS_FILE
        return {
            "items": self.store.count(),
            "by_modality": self.store.count_by_modality(),
            "errors": self.store.count_errors(),
            "index": vi.spec,
            "index_spec": self.index_spec,
            "index_kind": vi.kind,
            "ntotal": vi.live,
            "tombstones": vi.tombstones,
            "bytes": faiss_file.stat().st_size if faiss_file.exists() else 0,
            "generation": self.generation,
            "embedder_id": self.embedder_id,
            "dim": self.dim,
            "path": str(self.path),
        }

    def check(self) -> dict[str, Any]:
        """The invariants a crash must not break, for crash tests and operators; ``ok`` is all of them.

        - ``integrity_check``: SQLite's own verdict, ``"ok"`` when sound
        - ``sqlite_vectors`` / ``faiss_live``: items with a vector in SQLite, live ids in the served index;
          ``missing_in_faiss`` / ``extra_in_faiss``: the first 20 ids where they differ (after a refresh)
        - ``disk_index``: the FAISS file against SQLite: ``"current"`` (same generation, same ids),
          ``"stale"`` (an older generation: caught up from the change log, or rebuilt, on the next open;
          a large index is saved every ``policy.save_every`` writes, so stale is normal in between),
          ``"missing"``, or the problems ``"mismatch"`` (same generation, other ids) and ``"unreadable"``
        - ``config``: ``collection.json`` against the copy in SQLite: ``"ok"``, ``"missing"``, ``"differs"``
        - ``leftovers``: temp files of interrupted saves still in the folder
        """
        self.refresh()
        integrity = [str(r[0]) for r in self.store.conn.execute("PRAGMA integrity_check")]
        gen = self.store.generation()
        sql_ids = self.store.all_ids()
        with self._rw.read():
            assert self._vindex is not None
            live = np.sort(self._vindex.live_ids())
        side = self._read_sidecar()
        if side is None or not (self.path / VECTORS_FILE).exists():
            disk = "missing"
        elif int(side["generation"]) != gen:
            disk = "stale"
        else:
            try:
                on_disk = VectorIndex.read(
                    self.path / VECTORS_FILE, str(side.get("spec", "Flat")), self.policy
                )
            except (RuntimeError, ValueError, OSError):
                disk = "unreadable"
            else:
                disk = "current" if np.array_equal(np.sort(on_disk.live_ids()), sql_ids) else "mismatch"
        saved = self.store.get_meta("config") or {}
        try:
            file_config = json.loads((self.path / CONFIG_FILE).read_text())
            same = all(file_config.get(k) == v for k, v in saved.items() if k != "generation")
            config = "ok" if same else "differs"
        except (OSError, ValueError, AttributeError):
            config = "missing"
        leftovers = [
            str(p)
            for p in atomic_temp_files(*(self.path / n for n in (VECTORS_FILE, SIDECAR_FILE, CONFIG_FILE)))
        ]
        missing = np.setdiff1d(sql_ids, live)
        extra = np.setdiff1d(live, sql_ids)
        problems = []
        if integrity != ["ok"]:
            problems.append(f"SQLite integrity_check: {'; '.join(integrity[:3])}")
        if len(missing) or len(extra):
            problems.append(f"served index lacks {len(missing)} ids of SQLite and has {len(extra)} others")
        if disk in ("mismatch", "unreadable"):
            problems.append(f"{VECTORS_FILE} is {disk} at the current generation")
        if config == "differs":
            problems.append(f"{CONFIG_FILE} differs from the config in SQLite")
        if leftovers:
            problems.append(f"{len(leftovers)} temp files of interrupted saves")
        return {
            "ok": not problems,
            "problems": problems,
            "integrity_check": "; ".join(integrity),
            "generation": gen,
            "sqlite_vectors": len(sql_ids),
            "faiss_live": len(live),
            "missing_in_faiss": missing[:20].tolist(),
            "extra_in_faiss": extra[:20].tolist(),
            "disk_index": disk,
            "config": config,
            "leftovers": leftovers,
        }

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n,), vectors (n, dim))`` of every item with a vector, in id order."""
        return self.store.vectors()


def _stamp(item: Item, now: float, *, created: float, error: str | None = None) -> Item:
    return dataclasses.replace(item, id=0, created_at=created, updated_at=now, error=error)


def _check_spec(spec: str, dim: int) -> None:
    """Validate a factory string without training it."""
    import faiss

    if spec.replace(" ", "").upper().startswith("IDMAP"):
        raise ValueError(f"index spec {spec!r}: leave out IDMap, ids are always mapped (IndexIDMap2)")
    try:
        faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"invalid FAISS index spec {spec!r}; use a factory string like "
            '"Flat", "HNSW32", "IVF256,SQ8" or "IVF1024,PQ16"'
        ) from e


class _AlreadyExists(ValueError):
    pass


_CreationState = Literal["none", "partial", "committed"]
_PARTIAL_FILES = (
    META_FILE,
    META_FILE + "-wal",
    META_FILE + "-shm",
    META_FILE + "-journal",
    VECTORS_FILE,
    SIDECAR_FILE,
    CONFIG_FILE,
)


def _creation_state(path: Path, *, recover: bool = False) -> _CreationState:
    """Whether ``path`` holds no collection, one whose creation was killed before its commit, or one.

    Committed means: a config row in ``meta.sqlite`` (or a readable ``collection.json``), or any item
    row at all (data is never treated as a leftover). An unreadable database counts as committed, so
    that opening it reports the damage instead of deleting it. ``recover`` (writers only) lets a
    writable connection roll back what a killed first write left before deciding.
    """
    db = path / META_FILE
    if not db.is_file():
        return "none"
    try:
        if isinstance(json.loads((path / CONFIG_FILE).read_text()), dict):
            return "committed"
    except (OSError, ValueError):
        pass
    uri = db.resolve().as_uri()
    try:
        found = _committed_rows(uri + "?mode=ro")
    except sqlite3.DatabaseError:
        if not recover:
            # a hot rollback journal can only come from the first write (a collection runs in WAL
            # mode from then on): say "interrupted", and let a writer decide with the journal rolled back
            return "partial" if db.with_name(db.name + "-journal").exists() else "committed"
        # A kill in SQLite's first write leaves a hot rollback journal that a read-only connection may
        # not roll back ("attempt to write a readonly database"); a writable one rolls it back on read.
        try:
            found = _committed_rows(uri)
        except sqlite3.DatabaseError:
            return "committed"
    return "committed" if found else "partial"


def _committed_rows(uri: str) -> bool:
    """Whether the database at ``uri`` holds a config row or any item row (raises DatabaseError)."""
    conn = sqlite3.connect(uri, uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        config = "meta" in tables and conn.execute("SELECT 1 FROM meta WHERE key = 'config'").fetchone()
        rows = "items" in tables and conn.execute("SELECT 1 FROM items LIMIT 1").fetchone()
    finally:
        conn.close()
    return bool(config or rows)


def _clean_partial(path: Path) -> _CreationState:
    """Remove a half-created collection's files under the writer lock; returns the state found there."""
    with FileLock(path / LOCK_FILE):
        state = _creation_state(path, recover=True)  # again: the creator may have committed meanwhile
        if state == "partial":
            _discard_partial(path)
            state = "none"
    return state


def _discard_partial(path: Path) -> None:
    """Delete what an interrupted creation left (the caller holds the writer lock), nothing else."""
    log.warning("collection %s: removing what an interrupted creation left behind", path)
    for name in _PARTIAL_FILES:
        (path / name).unlink(missing_ok=True)
    for tmp in atomic_temp_files(path / VECTORS_FILE, path / SIDECAR_FILE, path / CONFIG_FILE):
        tmp.unlink(missing_ok=True)
    fsync_dir(path)
