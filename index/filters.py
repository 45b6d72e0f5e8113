"""Metadata filters: a :class:`~index.types.Filter` becomes SQL over ``items``, whose matching ids become a
FAISS ``IDSelector`` so that the index itself skips everything else and k results come back after filtering.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from index.types import Filter


def needs_sql(f: Filter | None) -> bool:
    """True when the filter restricts by metadata (not only by ``exclude_ids``)."""
    if f is None:
        return False
    return bool(f.modalities or f.tags or f.path_prefix or f.since is not None or f.until is not None)


def filter_where(f: Filter) -> tuple[str, list[Any]]:
    """SQL ``WHERE`` clause (over table ``items``) and its parameters for the metadata part of ``f``
    (whose time span the :class:`Filter` checked when it was made)."""
    clauses: list[str] = []
    args: list[Any] = []
    if f.modalities:
        clauses.append(f"modality IN ({','.join('?' * len(f.modalities))})")
        args += list(f.modalities)
    for tag in f.tags or []:
        clauses.append("EXISTS (SELECT 1 FROM json_each(items.tags) AS t WHERE t.value = ?)")
        args.append(tag)
    if f.path_prefix:
        # substr, not LIKE: no wildcard escaping, and case-sensitive like paths
        clauses.append("substr(uri, 1, ?) = ?")
        args += [len(f.path_prefix), f.path_prefix]
    if f.since is not None:
        clauses.append("created_at >= ?")
        args.append(float(f.since))
    if f.until is not None:
        clauses.append("created_at <= ?")
        args.append(float(f.until))
    return (" AND ".join(clauses) or "1"), args


def exclude(ids: np.ndarray, f: Filter | None) -> np.ndarray:
    """``ids`` without ``f.exclude_ids``."""
    if f is None or not f.exclude_ids:
        return ids
    return ids[~np.isin(ids, np.asarray(f.exclude_ids, dtype=np.int64))]
