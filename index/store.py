"""``meta.sqlite``: every item's metadata and its vector (float32 BLOB), the source of truth.

The FAISS file is a derived, rebuildable view of the ``vector`` column. SQLite runs in WAL mode so that
readers never block the writer; each thread gets its own connection.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from index.lexical import ensure_lexical
from index.types import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, even after deletes
    uri TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    mime TEXT NOT NULL DEFAULT '',
    caption TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    size INTEGER NOT NULL DEFAULT 0,
    width INTEGER,
    height INTEGER,
    duration REAL,
    mtime REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    extra TEXT NOT NULL DEFAULT '{}',
    vector BLOB
);
CREATE INDEX IF NOT EXISTS items_uri ON items(uri);
CREATE INDEX IF NOT EXISTS items_sha256 ON items(sha256);
CREATE INDEX IF NOT EXISTS items_modality ON items(modality);
CREATE INDEX IF NOT EXISTS items_created ON items(created_at);
-- counts and id lists of items with vectors read this small index, not every row's 1.5 KB vector
CREATE INDEX IF NOT EXISTS items_with_vector ON items(modality) WHERE vector IS NOT NULL;
-- a time-span filter reads this index, not every matching row's vector (1M items, 10%: 1.85 -> 0.15 s)
CREATE INDEX IF NOT EXISTS items_created_vec ON items(created_at) WHERE vector IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Which ids' vectors changed at which generation (the one their transaction commits), so that another
-- process serving this collection catches up by applying just those (Collection.refresh). Triggers keep
-- it, whoever writes; MetaStore.trim_changes bounds it. meta 'changes_from': the log is complete after it.
CREATE TABLE IF NOT EXISTS vector_changes (gen INTEGER NOT NULL, id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS vector_changes_gen ON vector_changes(gen);
CREATE TRIGGER IF NOT EXISTS items_vector_insert AFTER INSERT ON items WHEN NEW.vector IS NOT NULL BEGIN
    INSERT INTO vector_changes(gen, id)
    VALUES ((SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = 'generation'), NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS items_vector_update AFTER UPDATE OF vector ON items
WHEN OLD.vector IS NOT NULL OR NEW.vector IS NOT NULL BEGIN
    INSERT INTO vector_changes(gen, id)
    VALUES ((SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = 'generation'), NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS items_vector_delete AFTER DELETE ON items WHEN OLD.vector IS NOT NULL BEGIN
    INSERT INTO vector_changes(gen, id)
    VALUES ((SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = 'generation'), OLD.id);
END;
"""
# Change-log rows kept (beyond them a reader that far behind reloads the whole index instead).
CHANGES_KEEP = 200_000

COLUMNS = (
    "id, uri, sha256, modality, mime, caption, tags, size, width, height, duration, "
    "mtime, created_at, updated_at, error, extra"
)
_WRITABLE = [c.strip() for c in COLUMNS.split(",")][1:]  # everything except id
# Reads through a memory map, not a pread per page: a search fetches ~10 rows from pages all over the
# file, and with SQLite's default 2 MB page cache most of them missed (a syscall each).
# The map is shared through the OS page cache by every thread's connection; it is not RAM reserved.
MMAP_BYTES = 1 << 30


def _row_to_item(row: tuple) -> Item:
    (id_, uri, sha, modality, mime, caption, tags, size, w, h, dur, mtime, created, updated, err, extra) = row
    return Item(
        id=int(id_),
        modality=modality,
        uri=uri,
        sha256=sha,
        mime=mime,
        caption=caption,
        tags=_json_list(tags),
        size=int(size),
        width=w,
        height=h,
        duration=dur,
        mtime=float(mtime),
        created_at=float(created),
        updated_at=float(updated),
        error=err,
        extra=_json_dict(extra),
    )


# Most items carry no tags and no extra fields: skip the JSON parser for those (2 per row, 20 per search).
def _json_list(text: str) -> list[Any]:
    return [] if text == "[]" else json.loads(text)


def _json_dict(text: str) -> dict[str, Any]:
    return {} if text == "{}" else json.loads(text)


def _item_values(item: Item) -> list[Any]:
    return [
        item.uri,
        item.sha256,
        item.modality,
        item.mime,
        item.caption,
        json.dumps(list(item.tags)),
        int(item.size),
        item.width,
        item.height,
        item.duration,
        float(item.mtime),
        float(item.created_at),
        float(item.updated_at),
        item.error,
        json.dumps(item.extra),
    ]


def _blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


class VectorChanges(NamedTuple):
    """Vector changes after some generation, as :meth:`MetaStore.changes_since` read them."""

    generation: int  # the generation they bring a reader to
    changed: np.ndarray  # (c,) ids whose vector was added, replaced or removed
    ids: np.ndarray  # (m,) those of them that hold a vector now
    vectors: np.ndarray  # (m, dim) their vectors
    live: int  # items with a vector at ``generation`` (not ``count``: that is tuple.count)


class MetaStore:
    """Thin typed layer over ``meta.sqlite``. Writes go through :meth:`transaction` (one writer)."""

    def __init__(self, path: str | Path, *, dim: int, readonly: bool = False):
        self.path = Path(path)
        self.dim = dim
        self.readonly = readonly
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        if not readonly:
            self.conn.executescript(SCHEMA)
            ensure_lexical(self.conn)  # FTS5 words index + its triggers (filled once for older collections)
            self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', '0')")
            # a collection older than the change log: complete from now on
            self.conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) "
                "SELECT 'changes_from', value FROM meta WHERE key = 'generation'"
            )

    # connections -----------------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.readonly:
                conn = sqlite3.connect(
                    self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False
                )
            else:
                conn = sqlite3.connect(str(self.path), check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
            conn.isolation_level = None  # explicit transactions only
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._conns.clear()
        self._local = threading.local()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error)."""
        if self.readonly:
            raise ValueError(f"collection {self.path.parent} is open read-only; open it without readonly")
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # meta key/values -------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any, conn: sqlite3.Connection | None = None) -> None:
        text = json.dumps(value)
        if conn is not None:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, text))
            return
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, text))

    def generation(self) -> int:
        return int(self.get_meta("generation", 0))

    def bump_generation(self, conn: sqlite3.Connection) -> int:
        """Increment the generation inside the caller's transaction; returns the new value."""
        gen = int(json.loads(conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])) + 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (json.dumps(gen),))
        return gen

    def changes_since(self, gen: int, max_ids: int) -> VectorChanges | None:
        """What changed in the vectors after generation ``gen``, read in one snapshot.

        None when the change log does not reach back to ``gen`` (trimmed, or a collection no writer has
        opened since the log existed) or more than ``max_ids`` ids changed: the caller reloads instead.
        """
        conn = self.conn
        conn.execute("BEGIN")  # one read snapshot (WAL): the generation, the ids and vectors agree
        try:
            now = int(
                json.loads(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            )
            floor = conn.execute("SELECT value FROM meta WHERE key = 'changes_from'").fetchone()
            if floor is None or gen < int(json.loads(floor[0])):
                return None
            rows = conn.execute("SELECT DISTINCT id FROM vector_changes WHERE gen > ?", (int(gen),))
            changed = np.fromiter((r[0] for r in rows), dtype=np.int64)
            if len(changed) > max_ids:
                return None
            ids, vecs = self.vectors(changed)
            return VectorChanges(now, changed, ids, vecs, self.count())
        except sqlite3.OperationalError:  # no change log in this file yet (opened read-only)
            return None
        finally:
            conn.execute("COMMIT")

    def trim_changes(self, keep: int | None = None) -> None:
        """Drop the oldest change-log rows past ``keep`` (whole generations; the floor moves up)."""
        keep = CHANGES_KEEP if keep is None else keep
        lo, hi = self.conn.execute("SELECT MIN(rowid), MAX(rowid) FROM vector_changes").fetchone()
        if lo is None or hi - lo < 2 * keep:  # rows are only appended: the rowid span bounds the count
            return
        with self.transaction() as conn:
            cut = conn.execute(
                "SELECT gen FROM vector_changes WHERE rowid <= ? ORDER BY rowid DESC LIMIT 1", (hi - keep,)
            ).fetchone()
            if cut is None:
                return
            conn.execute("DELETE FROM vector_changes WHERE gen <= ?", (cut[0],))
            self.set_meta("changes_from", int(cut[0]), conn=conn)

    # writes (inside a transaction) -----------------------------------------------------------------
    def insert(self, conn: sqlite3.Connection, item: Item, vector: np.ndarray | None) -> int:
        cols = ", ".join(_WRITABLE)
        marks = ", ".join("?" * (len(_WRITABLE) + 1))
        cur = conn.execute(
            f"INSERT INTO items({cols}, vector) VALUES ({marks})",
            [*_item_values(item), None if vector is None else _blob(vector)],
        )
        assert cur.lastrowid is not None  # set by every successful INSERT
        return cur.lastrowid

    def update(self, conn: sqlite3.Connection, id: int, item: Item, vector: np.ndarray | None) -> None:
        sets = ", ".join(f"{c} = ?" for c in _WRITABLE)
        conn.execute(
            f"UPDATE items SET {sets}, vector = ? WHERE id = ?",
            [*_item_values(item), None if vector is None else _blob(vector), int(id)],
        )

    def update_fields(self, conn: sqlite3.Connection, id: int, **fields: Any) -> None:
        """Change metadata only (caption, tags, mtime...), keeping the vector."""
        bad = set(fields) - set(_WRITABLE)
        assert not bad, f"unknown item fields {bad}"
        if "tags" in fields:
            fields["tags"] = json.dumps(list(fields["tags"]))
        if "extra" in fields:
            fields["extra"] = json.dumps(fields["extra"])
        fields.setdefault("updated_at", time.time())
        sets = ", ".join(f"{c} = ?" for c in fields)
        conn.execute(f"UPDATE items SET {sets} WHERE id = ?", [*fields.values(), int(id)])

    def delete(self, conn: sqlite3.Connection, ids: Iterable[int]) -> tuple[int, list[int]]:
        """Delete rows; returns how many existed and the ids that had a vector (they must leave FAISS too)."""
        ids = sorted({int(i) for i in ids})
        deleted = 0
        with_vec: list[int] = []
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            with_vec += [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM items WHERE id IN ({marks}) AND vector IS NOT NULL", chunk
                )
            ]
            deleted += conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk).rowcount
        return deleted, with_vec

    # reads ----------------------------------------------------------------------------------------
    def get(self, id: int) -> Item | None:
        row = self.conn.execute(f"SELECT {COLUMNS} FROM items WHERE id = ?", (int(id),)).fetchone()
        return None if row is None else _row_to_item(row)

    def get_many(self, ids: Iterable[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        for chunk in _chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(f"SELECT {COLUMNS} FROM items WHERE id IN ({marks})", chunk):
                item = _row_to_item(row)
                out[item.id] = item
        return out

    def has_vector(self, id: int) -> bool:
        row = self.conn.execute("SELECT vector IS NOT NULL FROM items WHERE id = ?", (int(id),)).fetchone()
        return bool(row and row[0])

    def vector(self, id: int) -> np.ndarray | None:
        row = self.conn.execute("SELECT vector FROM items WHERE id = ?", (int(id),)).fetchone()
        if row is None or row[0] is None:
            return None
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32)

    def find_by_uri(self, uri: str) -> Item | None:
        row = self.conn.execute(
            f"SELECT {COLUMNS} FROM items WHERE uri = ? ORDER BY id LIMIT 1", (uri,)
        ).fetchone()
        return None if row is None else _row_to_item(row)

    def find_by_sha256(self, sha256: str, modality: str | None = None) -> list[Item]:
        sql, args = f"SELECT {COLUMNS} FROM items WHERE sha256 = ?", [sha256]
        if modality is not None:
            sql, args = sql + " AND modality = ?", [*args, modality]
        return [_row_to_item(r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def list_items(
        self, *, modality: str | None, limit: int, offset: int, include_errors: bool = False
    ) -> list[Item]:
        where, args = ["1"], []
        if not include_errors:
            where.append("vector IS NOT NULL")
        if modality is not None:
            where.append("modality = ?")
            args.append(modality)
        sql = f"SELECT {COLUMNS} FROM items WHERE {' AND '.join(where)} ORDER BY id LIMIT ? OFFSET ?"
        return [_row_to_item(r) for r in self.conn.execute(sql, [*args, int(limit), int(offset)])]

    def errors(self, *, limit: int = 100, offset: int = 0) -> list[Item]:
        sql = f"SELECT {COLUMNS} FROM items WHERE error IS NOT NULL ORDER BY id LIMIT ? OFFSET ?"
        return [_row_to_item(r) for r in self.conn.execute(sql, (int(limit), int(offset)))]

    def count(self, modality: str | None = None) -> int:
        if modality is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM items WHERE vector IS NOT NULL").fetchone()[0])
        return int(
            self.conn.execute(
                "SELECT COUNT(*) FROM items WHERE vector IS NOT NULL AND modality = ?", (modality,)
            ).fetchone()[0]
        )

    def count_by_modality(self) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT modality, COUNT(*) FROM items WHERE vector IS NOT NULL GROUP BY modality"
        )
        return {m: int(n) for m, n in rows}

    def count_errors(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM items WHERE error IS NOT NULL").fetchone()[0])

    def ids_where(self, where: str, args: list[Any]) -> np.ndarray:
        """Ids of items with a vector matching ``where`` (SQL built by :mod:`index.filters`)."""
        sql = f"SELECT id FROM items WHERE vector IS NOT NULL AND ({where})"
        return np.fromiter((r[0] for r in self.conn.execute(sql, args)), dtype=np.int64)

    def uris_with_prefix(self, prefix: str) -> set[str]:
        """Every ``uri`` (items and recorded errors alike) starting with ``prefix``, read off its index."""
        rows = self.conn.execute(
            "SELECT uri FROM items WHERE uri >= ? AND uri < ?", (prefix, prefix + "\U0010ffff")
        )
        return {r[0] for r in rows}

    def all_ids(self) -> np.ndarray:
        """Sorted ids of the items with vectors (checked against the FAISS file on every open)."""
        # unordered, the query reads the small items_with_vector index instead of every row (20k: 20 -> 6 ms)
        rows = self.conn.execute("SELECT id FROM items WHERE vector IS NOT NULL")
        return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64))

    def iter_vectors(self, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All stored vectors in id order, ``chunk`` rows at a time: ``(ids (c,), vectors (c, dim))``."""
        last = -1
        while True:
            rows = self.conn.execute(
                "SELECT id, vector FROM items WHERE vector IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
                (last, chunk),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield self._unpack(rows)

    def vectors(self, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n,), vectors (n, dim))`` of the given ids (all items with a vector when None)."""
        if ids is None:
            parts = list(self.iter_vectors())
        else:
            parts = []
            for part in _chunks([int(i) for i in ids], 500):
                marks = ",".join("?" * len(part))
                rows = self.conn.execute(
                    f"SELECT id, vector FROM items WHERE id IN ({marks}) AND vector IS NOT NULL", part
                ).fetchall()
                parts.append(self._unpack(rows))
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _unpack(self, rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
        return ids, vecs.astype(np.float32)


def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
