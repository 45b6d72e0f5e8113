"""``mm search "text" | --image F | --audio F | --item ID --collection DIR``: any-to-any search.

``--json`` prints the same object as ``POST /search``: ``{"query": {"type", "value"}, "took_ms",
"results": [{"id", "score", "modality", "caption", "media_url", "thumbnail_url", "uri", "mime",
"duration", "width", "height", "tags", "transcript"}]}``, plus ``"heard": {"text", "language"}`` for
an ``--audio`` query with speech (searched by its clip and its transcript together).

When an ``mm serve`` of the same collection and model is running (its ``serve.json``, see
:mod:`service.cli.remote`), the query goes to it and the model is not loaded here; the answer is the
same. A line on stderr says which path answered; ``--local`` always loads the model here.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    # the bounds of -k and --offset are SearchQuery's (service.schemas), named in its error message
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tag=x, path=/prefix, since=ISO|unix, until=ISO|unix (repeatable)",
    )
    p.add_argument("--offset", type=int, default=0, help="skip this many results (paging)")
    # the modes are SearchQuery's (service.schemas.SearchMode), which refuses any other by name
    p.add_argument(
        "--mode",
        default="hybrid",
        help="ranking: hybrid (vectors + words of captions, names, tags, transcripts), vector, keyword",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="a sharded collection: answer from the shards that can, marked partial, rather than fail",
    )
    p.add_argument(
        "--local", action="store_true", help="load the model here even when `mm serve` runs on the collection"
    )
    add_collection(p)
    add_model(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.schemas import QueryMedia, SearchQuery, error_message

    media = None
    if args.image is not None or args.audio is not None:
        media = QueryMedia("image", args.image) if args.image else QueryMedia("audio", args.audio)
    try:
        query = SearchQuery(
            query=args.text,
            item_id=args.item,
            media=media,
            modalities=split_csv(args.modality) or None,
            k=args.k,
            offset=args.offset,
            filters=parse_filters(args.filter) or None,
            mode=args.mode,
            allow_partial=args.allow_partial,
        )
    except ValidationError as exc:
        raise UsageError(error_message(exc)) from exc
    if media is not None and not media.path.is_file():  # before the model loads (seconds)
        raise FileNotFoundError(f"no such file: {media.path}")

    body, why = (None, None) if args.local else search_served(args.collection, args.model, query)
    if body is None:
        from service.search import answer  # here: the served path needs neither FAISS nor the model
        from service.store import open_served, same_model

        # the collection first: a wrong path is said at once, not after the model's seconds of loading
        with open_served(args.collection, readonly=True) as coll:
            if why is not None:
                print(f"mm: loading the model ({why}; `mm serve` keeps it warm)", file=sys.stderr)
            embedder = load_embedder(args.model)
            same_model(coll, embedder, Path(args.collection))
            body = answer(query, embedder, coll).to_dict()
    results = body["results"]
    if body.get("partial"):
        missing = "; ".join(f"shard {s}: {why}" for s, why in body.get("missing_shards", {}).items())
        print(f"mm: partial results, shards missing ({missing})", file=sys.stderr)
    if args.json:
        print(json.dumps(body))
        return 0
    heard = body.get("heard")
    if heard is not None:
        print(f"heard ({heard['language'] or '?'}): {heard['text']}")
    if not results:
        print("no results")
        return 0
    if body.get("no_good_match"):
        print("no good match: even the best result scores under the model's relevance threshold")
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


def search_served(collection: Path, model: str, query) -> tuple[dict | None, str | None]:
    """The answer of the running ``mm serve`` of ``collection``, or (None, why there is none to ask)."""
    from service.cli import remote

    server, why = remote.find_server(collection, model)
    if server is None:
        return None, why
    print(
        f"mm: using the server at {server.url} (pid {server.pid}; --local to load the model here)",
        file=sys.stderr,
    )
    return remote.search_remote(server, query), None
