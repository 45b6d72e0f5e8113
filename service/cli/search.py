"""``mm search "text" | --image F | --audio F | --item ID --collection DIR``: any-to-any search.

``--json`` prints the same object as ``POST /search``: ``{"query": {"type", "value"}, "took_ms",
"results": [{"id", "score", "modality", "caption", "media_url", "thumbnail_url", "uri", "mime",
"duration", "width", "height", "tags"}]}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli.common import (
    UsageError,
    add_collection,
    add_model,
    clip,
    load_embedder,
    parse_filters,
    split_csv,
    table,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search a collection with text, an image, audio or an item")
    p.add_argument("text", nargs="?", help="text query")
    p.add_argument("--image", type=Path, metavar="FILE", help="query with an image file")
    p.add_argument("--audio", type=Path, metavar="FILE", help="query with an audio file")
    p.add_argument("--item", type=int, metavar="ID", help="more like this item (itself excluded)")
    p.add_argument("--modality", default="", help="result modalities, comma-separated: image,audio,text")
    p.add_argument("-k", type=int, default=10, help="number of results (1..1000, default 10)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tag=x, path=/prefix, since=ISO|unix, until=ISO|unix (repeatable)",
    )
    p.add_argument("--offset", type=int, default=0, help="skip this many results (paging)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_collection(p)
    add_model(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.search import build_filter, check_modalities, embed_query, hit_to_dict, search
    from service.store import open_collection

    given = [x for x in (args.text, args.image, args.audio, args.item) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one query: TEXT, --image FILE, --audio FILE or --item ID")
    if not 1 <= args.k <= 1000 or args.offset < 0:
        raise UsageError("-k must be in 1..1000 and --offset >= 0")
    for f in (args.image, args.audio):
        if f is not None and not f.is_file():
            raise FileNotFoundError(f"no such file: {f}")
    try:
        modalities = check_modalities(split_csv(args.modality))
        flt_kw = parse_filters(args.filter)
        exclude = [args.item] if args.item is not None else None
        flt = build_filter(modalities=modalities, exclude_ids=exclude, **flt_kw)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    embedder = load_embedder(args.model)
    with open_collection(args.collection, embedder, readonly=True) as coll:
        vector, query = embed_query(
            coll, embedder, text=args.text, image=args.image, audio=args.audio, item_id=args.item
        )
        hits, took_ms = search(coll, vector, k=args.k, filter=flt, offset=args.offset)
    results = [hit_to_dict(h) for h in hits]
    if args.json:
        print(json.dumps({"query": query.to_dict(), "took_ms": round(took_ms, 3), "results": results}))
        return 0
    if not results:
        print("no results")
        return 0
    rows = [
        [
            str(args.offset + i + 1),
            f"{r['score']:.3f}",
            r["modality"],
            str(r["id"]),
            clip(r["caption"] or "", 40),
            clip(r["uri"] or "", 60),
        ]
        for i, r in enumerate(results)
    ]
    print(table(rows, ["#", "score", "modality", "id", "caption", "uri"]))
    return 0
