"""``mm remove ID... --collection DIR``: delete items by id (exit 1 when an id is unknown).

``--json`` prints ``{"removed": [ids], "missing": [ids]}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from service.cli.common import add_collection


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("remove", help="delete items by id")
    p.add_argument("ids", nargs="+", type=int, metavar="ID")
    add_collection(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.store import open_collection

    removed: list[int] = []
    missing: list[int] = []
    with open_collection(args.collection) as coll:
        for item_id in dict.fromkeys(args.ids):
            (removed if coll.get(item_id) is not None else missing).append(item_id)
        if removed:
            coll.delete(removed)
            coll.save()
    if args.json:
        print(json.dumps({"removed": removed, "missing": missing}))
    else:
        print(f"removed {len(removed)} item(s)")
    if missing:
        print(f"mm: error: no item with id {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    return 0
