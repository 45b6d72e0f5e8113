"""``mm export --collection DIR --out FILE``: ids + vectors + metadata, for analysis elsewhere.

Formats, by the suffix of ``--out``:

- ``.parquet`` (pyarrow): columns ``id`` int64, ``vector`` fixed_size_list<float32>[dim], ``modality``,
  ``uri``, ``caption``, ``mime``, ``tags`` list<string>, ``created_at`` float64.
- ``.npz``: arrays ``ids`` (n,) int64, ``vectors`` (n, dim) float32, and ``modality``, ``uri``,
  ``caption``, ``mime`` (n,) str, ``tags`` (n,) str (JSON lists), ``created_at`` (n,) float64.
- ``.npy``: one structured array with the same fields (``vector`` is a (dim,) float32 sub-array);
  ``np.load(path)`` reads it without pickle.

``--json`` prints ``{"out", "format", "count", "dim"}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from index.atomic import atomic_write
from service.cli.common import UsageError, add_collection

FORMATS = (".parquet", ".npz", ".npy")
_TEXT_FIELDS = ("modality", "uri", "caption", "mime", "tags")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write ids, vectors and metadata to .parquet/.npz/.npy")
    add_collection(p)
    p.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="output file (.parquet, .npz, .npy)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _columns(coll) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
    ids, vectors = coll.all_vectors()
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), coll.dim)  # (N, D)
    meta: dict[str, list] = {k: [] for k in (*_TEXT_FIELDS, "created_at")}
    for item_id in ids.tolist():
        item = coll.get(item_id)
        meta["modality"].append(item.modality if item else "")
        meta["uri"].append(item.uri if item else "")
        meta["caption"].append(item.caption if item else "")
        meta["mime"].append(item.mime if item else "")
        meta["tags"].append(list(item.tags) if item else [])
        meta["created_at"].append(float(item.created_at) if item else 0.0)
    return ids, vectors, meta


def _write_parquet(path: Path, ids, vectors, meta) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RuntimeError("writing .parquet needs pyarrow: pip install pyarrow (or export to .npz)") from exc
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            **{k: pa.array(meta[k], type=pa.string()) for k in ("modality", "uri", "caption", "mime")},
            "tags": pa.array(meta["tags"], type=pa.list_(pa.string())),
            "created_at": pa.array(meta["created_at"], type=pa.float64()),
        }
    )
    pq.write_table(table, str(path))


def _write_numpy(path: Path, ids, vectors, meta, fmt: str) -> None:
    """``fmt`` ".npz" (arrays by name) or ".npy" (one structured array); ``path`` may be a temp name."""
    text = {k: [json.dumps(t) for t in meta[k]] if k == "tags" else meta[k] for k in _TEXT_FIELDS}
    with open(path, "wb") as fh:
        if fmt == ".npz":
            # Any: typed as arrays, **arrays could be savez's allow_pickle flag to a type checker
            arrays: dict[str, Any] = {k: np.array(v, dtype=str) for k, v in text.items()}
            np.savez(fh, ids=ids, vectors=vectors, created_at=np.array(meta["created_at"]), **arrays)
            return
        width = {k: max([1, *(len(s) for s in v)]) for k, v in text.items()}
        dtype = [("id", "<i8"), ("vector", "<f4", (vectors.shape[1],)), ("created_at", "<f8")]
        dtype += [(k, f"<U{width[k]}") for k in _TEXT_FIELDS]
        rec = np.zeros(len(ids), dtype=dtype)
        rec["id"], rec["vector"], rec["created_at"] = ids, vectors, meta["created_at"]
        for k in _TEXT_FIELDS:
            rec[k] = text[k]
        np.save(fh, rec, allow_pickle=False)


def run(args: argparse.Namespace) -> int:
    from service.store import open_collection

    out: Path = args.out
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"--out must end in {', '.join(FORMATS)}, got {out.name!r}")
    if not out.parent.exists():
        raise FileNotFoundError(f"folder {out.parent} does not exist")
    with open_collection(args.collection, readonly=True) as coll:
        ids, vectors, meta = _columns(coll)
    fmt = out.suffix.lower()

    def write(tmp: Path) -> None:  # the temp name's suffix is not the format's
        if fmt == ".parquet":
            _write_parquet(tmp, ids, vectors, meta)
        else:
            _write_numpy(tmp, ids, vectors, meta, fmt)

    atomic_write(out, write)
    result = {"out": str(out), "format": out.suffix.lower().lstrip("."), "count": len(ids), "dim": coll.dim}
    print(json.dumps(result) if args.json else f"exported {len(ids)} vectors (dim {coll.dim}) to {out}")
    return 0
