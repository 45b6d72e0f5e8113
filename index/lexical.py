"""Lexical search: an SQLite FTS5 index (BM25) over every item's words, kept in step by triggers.

The words of an item are its caption (a sidecar ``.txt``, an item's text, a corpus caption), its file
name (``red_circle.png`` reads as "red circle"), its tags and, once speech is transcribed, its transcript
(``extra.transcript.text``). The ``unicode61`` tokenizer with ``remove_diacritics 2`` folds case and
accents in every Latin, Greek and Cyrillic script ("café" matches "cafe", "Grüße" matches "grusse"),
and splits on anything that is not a letter or digit.

Triggers on ``items`` keep the index in step inside the writer's own transaction, so a crash can never
leave the two apart, and nothing in the write path has to remember it. A collection created before this
index existed gets it, filled from its rows, the next time it is opened for writing; a read-only open of
such a collection has no lexical index (:func:`has_lexical` is false) and keyword search finds nothing.

Query text is never passed to FTS5's query language: each word becomes a quoted term, OR-ed, so a user's
``"``, ``*``, ``NEAR`` or ``-`` cannot change the query or raise a syntax error.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import numpy as np

TABLE = "items_fts"
# The file name without its folders; the tokenizer splits it at '_', '-' and '.' as at spaces.
_NAME = "replace({r}.uri, rtrim({r}.uri, replace({r}.uri, '/', '')), '')"
_TRANSCRIPT = "coalesce(json_extract({r}.extra, '$.transcript.text'), '')"
_ROW = f"{{r}}.id, {{r}}.caption, {_NAME}, {{r}}.tags, {_TRANSCRIPT}"

SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5(
    caption, name, tags, transcript, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS items_fts_insert AFTER INSERT ON items BEGIN
    INSERT INTO {TABLE}(rowid, caption, name, tags, transcript) VALUES ({_ROW.format(r="new")});
END;
CREATE TRIGGER IF NOT EXISTS items_fts_delete AFTER DELETE ON items BEGIN
    DELETE FROM {TABLE} WHERE rowid = old.id;
END;
CREATE TRIGGER IF NOT EXISTS items_fts_update AFTER UPDATE OF caption, uri, tags, extra ON items BEGIN
    DELETE FROM {TABLE} WHERE rowid = old.id;
    INSERT INTO {TABLE}(rowid, caption, name, tags, transcript) VALUES ({_ROW.format(r="new")});
END;
"""

# Column weights for BM25: a caption or transcript word counts more than a file-name or tag word.
WEIGHTS = (1.0, 0.6, 0.5, 1.0)
MAX_TERMS = 32  # words of a query that are searched (the rest are ignored)
_WORD = re.compile(r"\w+", re.UNICODE)


def ensure_lexical(conn: sqlite3.Connection) -> bool:
    """Create the FTS5 table and its triggers if missing, filling it from existing rows; True if created."""
    if has_lexical(conn):
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {TABLE}(rowid, caption, name, tags, transcript) SELECT {_ROW.format(r='items')} "
            "FROM items"
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def _statements(script: str) -> list[str]:
    """The schema's statements one by one (``executescript`` would commit the caller's transaction)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.endswith("END;")):
            out.append(text)
            buf = []
    return out


def has_lexical(conn: sqlite3.Connection) -> bool:
    return bool(
        conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (TABLE,)).fetchone()
    )


def match_expression(text: str) -> str | None:
    """A safe FTS5 query for free text: its words, each quoted, OR-ed (None when it has no words)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))[:MAX_TERMS]
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def lexical_search(
    conn: sqlite3.Connection,
    text: str,
    k: int,
    where: str = "1",
    args: list[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` items for ``text`` by BM25 among rows matching ``where`` (SQL over ``items``).

    Returns ``(ids, scores)``, best first, with scores positive and higher for better matches (FTS5's
    ``bm25()`` is negated); empty arrays when nothing matches or the collection has no lexical index.
    """
    expr = match_expression(text)
    if expr is None or k < 1 or not has_lexical(conn):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    weights = ", ".join(str(w) for w in WEIGHTS)
    rows = conn.execute(
        f"SELECT {TABLE}.rowid, -bm25({TABLE}, {weights}) AS score FROM {TABLE} "
        f"JOIN items ON items.id = {TABLE}.rowid "
        f"WHERE {TABLE} MATCH ? AND items.vector IS NOT NULL AND ({where}) "
        "ORDER BY score DESC, items.id LIMIT ?",
        [expr, *(args or []), int(k)],
    ).fetchall()
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    ids, scores = zip(*rows, strict=True)
    return np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
