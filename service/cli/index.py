"""``mm index PATH... --collection DIR``: add files and folders (recursively) to a collection.

Audio files with speech are transcribed (Whisper, :mod:`service.transcription`) and keep the transcript
and its language with the item; ``--no-transcribe`` skips that.

``--json`` prints one object: ``{"collection", "count", "added", "updated", "skipped", "failed",
"seen", "seconds", "errors": [{"path", "error"}]}``. Per-file errors never stop the run (exit 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from service.cli.common import UsageError, add_collection, add_model, load_embedder, split_csv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="add files/folders to a collection (created if missing)")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or folders")
    add_collection(p)
    add_model(p)
    p.add_argument("--tags", default="", help="comma-separated tags for every item added")
    p.add_argument("--workers", type=int, default=2, help="decode threads (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size (default 32)")
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        metavar="S",
        help="build S shard collections in --collection, each item in shard hash(path) %% S (docs/scale.md)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="ingest on the Ray cluster at ADDRESS (host:port, auto, or 'local' for one on this machine) "
        "into --shards S shards; needs pip install 'mm[ray]' (docs/scale.md)",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help='with --ray: the files to index, as JSONL ({"uri": ...} lines) or Parquet (a uri column)',
    )
    p.add_argument("--encoders", type=int, default=2, help="with --ray: encoder actors (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter (from `mm finetune`) applied to --model")
    p.add_argument(
        "--reembed", action="store_true", help="re-encode every stored item with --model/--adapter"
    )
    p.add_argument(
        "--no-transcribe",
        dest="transcribe",
        action="store_false",
        default=None,
        help="do not transcribe speech in audio files (default: transcribe; MM_TRANSCRIBE=0 too)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from index.ingest import ingest
    from index.sharded import is_sharded
    from service.store import open_collection
    from service.transcription import LazyTranscriber, transcription_enabled

    if args.workers < 1 or args.batch_size < 1:
        raise UsageError("--workers and --batch-size must be >= 1")
    if args.reembed:
        return _reembed(args)
    if args.ray is not None or args.manifest is not None:
        return _ray_index(args)
    if not args.paths:
        raise UsageError("give files or folders to index (or --reembed to re-encode the collection)")
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {missing[0]}")
    if args.shards < 0:
        raise UsageError("--shards must be >= 1")
    embedder = _embedder(args)
    target: Any  # a ShardedCollection or a Collection, each with its own ingest
    ingest_fn: Any
    if args.shards or is_sharded(args.collection):
        from index.sharded import ShardedCollection, ingest_sharded, shard_count

        target = ShardedCollection.open_or_create(
            args.collection,
            shards=args.shards or shard_count(args.collection),
            dim=embedder.dim,
            embedder_id=embedder.model_id,
        )
        ingest_fn = ingest_sharded
    else:
        target = open_collection(args.collection, embedder, create=True)
        ingest_fn = ingest
    with target as coll:
        report = ingest_fn(
            coll,
            embedder,
            [p.resolve() for p in args.paths],
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not (args.quiet or args.json) and sys.stderr.isatty(),
            tags=split_csv(args.tags) or None,
            transcribe=LazyTranscriber() if transcription_enabled(args.transcribe) else None,
        )
        coll.save()
        count = coll.count()
    return _print_report(args, report, count)


def _print_report(args: argparse.Namespace, report: Any, count: int) -> int:
    out = {
        "collection": str(args.collection),
        "count": count,
        "added": report.added,
        "updated": report.updated,
        "skipped": report.skipped,
        "failed": report.failed,
        "seen": report.seen,
        "seconds": round(report.seconds, 3),
        "errors": [{"path": e.path, "error": e.error} for e in report.errors],
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"added {report.added}, updated {report.updated}, skipped {report.skipped}, failed {report.failed} "
        f"in {report.seconds:.1f}s; {count} items in {args.collection}"
    )
    for err in report.errors:
        print(f"  failed: {err.path}: {err.error}")
    return 0


def _ray_index(args: argparse.Namespace) -> int:
    """``--ray ADDRESS``: the read, decode and encode stages on a Ray cluster, the shards built here."""
    from index.sharded import ShardedCollection, is_sharded, shard_count
    from service.distributed import RayUnavailable, connect
    from service.distributed.ingest import RayIngestConfig, ray_ingest
    from service.transcription import transcription_enabled

    if args.ray is None:
        raise UsageError("--manifest is read by --ray ingest: give --ray ADDRESS (or 'local')")
    if args.encoders < 1:
        raise UsageError("--encoders must be >= 1")
    if not args.paths and args.manifest is None:
        raise UsageError("give files or folders to index, or --manifest FILE")
    if args.shards < 0 or (not args.shards and not is_sharded(args.collection)):
        raise UsageError("--ray builds a sharded collection: give --shards S (S >= 1)")
    missing = [str(p) for p in [*args.paths, *([args.manifest] if args.manifest else [])] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {missing[0]}")
    try:
        connect(args.ray)  # first: a bad address or a missing Ray is said before the model loads
    except RayUnavailable as e:
        raise UsageError(str(e)) from e
    embedder = _embedder(args)
    with ShardedCollection.open_or_create(
        args.collection,
        shards=args.shards or shard_count(args.collection),
        dim=embedder.dim,
        embedder_id=embedder.model_id,
    ):
        pass  # the layout exists (and holds this model's vectors) before any worker writes into it
    config = RayIngestConfig(
        encoders=args.encoders,
        batch_size=args.batch_size,
        model=_portable(args.model) or args.model,  # actors run elsewhere: a checkpoint by its full path
        adapter=_portable(args.adapter),
        transcribe=transcription_enabled(args.transcribe),
        tags=split_csv(args.tags) or None,
    )
    try:
        report = ray_ingest(
            args.collection,
            embedder.media,
            [p.resolve() for p in args.paths],
            address=args.ray,
            config=config,
            manifest=args.manifest,
            progress=not (args.quiet or args.json) and sys.stderr.isatty(),
        )
    except RayUnavailable as e:
        raise UsageError(str(e)) from e
    with ShardedCollection.open(args.collection, readonly=True) as coll:
        count = coll.count()
    return _print_report(args, report, count)


def _portable(name_or_path: str | None) -> str | None:
    if name_or_path is None or not Path(name_or_path).expanduser().exists():
        return name_or_path  # a config name (or nothing)
    return str(Path(name_or_path).expanduser().resolve())


def _embedder(args: argparse.Namespace):
    embedder = load_embedder(args.model)
    if args.adapter:
        from mm.adapter import load_adapter

        load_adapter(embedder, args.adapter)
    return embedder


def _reembed(args: argparse.Namespace) -> int:
    """``--reembed``: new vectors for every stored item (after a fine-tune), metadata kept."""
    from service.reembed import reembed
    from service.store import open_collection

    if args.paths:
        raise UsageError("--reembed re-encodes the whole collection; give no paths")
    embedder = _embedder(args)
    with open_collection(args.collection) as coll:
        report = reembed(
            coll,
            embedder,
            adapter=args.adapter,
            batch_size=args.batch_size,
            progress=not (args.quiet or args.json) and sys.stderr.isatty(),
        )
    out = {"collection": str(args.collection), **dataclasses.asdict(report)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"re-embedded {report.reembedded} items ({report.failed} failed) in {report.seconds:.1f}s")
        for err in report.errors:
            print(f"  failed: {err['uri'] or err['id']}: {err['error']}")
    return 0
