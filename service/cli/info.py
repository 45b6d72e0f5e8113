"""``mm info --collection DIR``: what a collection holds.

``--json`` prints ``{"collection", "count", "by_modality": {"text", "image", "audio"}, "dim",
"embedder_id", "generation", "stats": {...the collection's own stats()...}}``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli.common import add_collection


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a collection's size, model and index")
    add_collection(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.store import open_collection

    with open_collection(args.collection, readonly=True) as coll:
        out: dict[str, Any] = {
            "collection": str(args.collection),
            "count": coll.count(),
            "by_modality": {m: coll.count(m) for m in ("text", "image", "audio")},
            "dim": coll.dim,
            "embedder_id": coll.embedder_id,
            "generation": coll.generation,
            "stats": coll.stats(),
        }
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    mods = ", ".join(f"{n} {m}" for m, n in out["by_modality"].items())
    print(f"collection  {out['collection']}")
    print(f"items       {out['count']} ({mods})")
    print(f"model       {out['embedder_id']} (dim {out['dim']})")
    print(f"generation  {out['generation']}")
    for key, value in out["stats"].items():
        if key in _SHOWN or isinstance(value, dict | list):
            continue
        print(f"{key:<11} {_megabytes(value) if key == 'bytes' else value}")
    return 0


# stats() keys printed above already (under another name, for "items" and "path")
_SHOWN = frozenset({"items", "path", "count", "dim", "embedder_id", "generation"})


def _megabytes(n: int) -> str:
    return f"{n} ({n / 1e6:.1f} MB)"
