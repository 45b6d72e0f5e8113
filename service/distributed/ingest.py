"""``mm index --ray ADDRESS --shards S``: ingest on a Ray cluster (Ray Data) into a sharded collection.

1. The driver lists the files (:func:`index.ingest.discover`) or reads a JSONL manifest of uris, and looks
   up each file's stored item in its shard (``shard_of(uri)``, as :mod:`index.sharded`), so that a re-run
   skips unchanged files exactly as ``mm index`` does.
2. Ray Data tasks (``PREPARE_CPUS`` each) run :func:`index.ingest.prepare_file` on every file: stat,
   sniff, read, hash, decode, transcribe. The same function as the threads of a plain ingest.
3. A pool of encoder actors embeds the decoded rows by modality (:func:`index.ingest.encode_prepared`:
   a failing batch is retried one by one, a bad file becomes an error row). Both stages ask for fractions
   of a CPU (see ``ENCODE_CPUS``).
4. The driver streams the encoded rows (no decoded media: ~1 KB each) into per-shard chunks in the object
   store, dropping a uri seen twice (a retried task's rows).
5. One task per shard stores them with :class:`index.ingest.Batcher` (skip, metadata-only change, error
   row, duplicate content, upsert: the rules of a plain ingest), on the driver's node, where the
   collection lives. A shard whose task fails is re-run alone; its rows are still in the object store.

A per-file error never stops the run: it is stored as the file's error row and reported. A worker node
lost mid-run costs its tasks, which Ray Data re-runs (and encoder actors, which Ray restarts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.ingest import Batcher, Candidate, Prepared, discover, encode_prepared, prepare_file
from index.sharded import ShardedCollection, shard_dir, shard_of
from index.types import IngestReport, Item, ItemError
from service.distributed import connect

log = logging.getLogger(__name__)

# Fractional CPUs: encoder actors holding whole CPUs would leave the read tasks none (a stall without an
# error). Unequal on purpose: Ray Data fuses a task stage into the actor stage after it when their
# resources match, and the files would then be decoded inside the encoder actors, one batch at a time.
PREPARE_CPUS = 0.25  # per read/decode task
ENCODE_CPUS = 0.5  # per encoder actor
CHUNK_ROWS = 512  # encoded rows per object-store chunk on their way to a shard
SHARD_TRIES = 2  # a shard task that fails is run again alone, this many times in all


@dataclasses.dataclass
class _Todo:
    """One file for the read stage (one object per row: Ray Data would turn a column of Nones into NaN)."""

    shard: int
    cand: Candidate
    existing: Item | None  # what its shard stores for its uri


@dataclasses.dataclass
class RayIngestConfig:
    """How the pipeline is cut. ``encoders``: encoder actors (at most; one is started at least)."""

    encoders: int = 2
    batch_size: int = 32  # files per read task batch and per encode batch
    model: str = "default"  # what each encoder actor loads (service.embedding.load_embedder)
    adapter: str | None = None
    transcribe: bool = False  # speech in audio (Whisper, loaded once per read worker process)
    tags: list[str] | None = None
    retry_failed: bool = False


def read_manifest(path: str | Path) -> tuple[list[Path], list[ItemError]]:
    """Files named by a manifest: JSON Lines, one ``{"uri": ...}`` (or ``{"path": ...}``) per line, or a
    Parquet file with a ``uri`` (or ``path``) column. A relative uri is relative to the manifest's
    folder; one naming no file is a per-item error."""
    path = Path(path).expanduser()
    uris = _parquet_uris(path) if path.suffix.lower() == ".parquet" else _jsonl_uris(path)
    files: list[Path] = []
    errors: list[ItemError] = []
    for uri in uris:
        p = Path(uri).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if p.is_file():
            files.append(p)
        else:
            errors.append(ItemError(str(p), "no such file"))
    return files, errors


def _jsonl_uris(path: Path) -> list[str]:
    uris = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            uri = row.get("uri") or row.get("path") if isinstance(row, dict) else None
            if not isinstance(uri, str) or not uri:
                raise ValueError(f'{path}:{n}: want an object with a "uri" (or "path") string')
            uris.append(uri)
    return uris


def _parquet_uris(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow's errors for a file that is not Parquet vary by version
        raise ValueError(f"{path}: not a Parquet file ({e})") from e
    column = next((c for c in ("uri", "path") if c in names), None)
    if column is None:
        raise ValueError(f'{path}: want a "uri" (or "path") column, found {names}')
    uris = pq.read_table(path, columns=[column]).column(column).to_pylist()
    bad = next((i for i, u in enumerate(uris) if not isinstance(u, str) or not u), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} has no {column} string")
    return uris


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array (``np.array`` would unpack dataclasses holding sequences into more dims)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


_TRANSCRIBER: Any = None  # one per read worker process


def _transcriber() -> Any:
    global _TRANSCRIBER
    if _TRANSCRIBER is None:
        from service.transcription import LazyTranscriber

        _TRANSCRIBER = LazyTranscriber()
    return _TRANSCRIBER


def prepare_rows(batch: dict[str, np.ndarray], media: Any, config: RayIngestConfig) -> dict[str, np.ndarray]:
    """Ray Data read stage: ``{"todo": _Todo}`` -> ``{"shard", "prep": Prepared}``."""
    transcribe = _transcriber() if config.transcribe else None
    todo: list[_Todo] = list(batch["todo"])
    preps = [
        prepare_file(media, t.cand, t.existing, config.tags, config.retry_failed, transcribe=transcribe)
        for t in todo
    ]
    return {"shard": np.array([t.shard for t in todo], dtype=np.int64), "prep": _objects(preps)}


class Encoder:
    """Ray Data encode stage (an actor): the model loaded once, each batch embedded by modality."""

    def __init__(self, config: RayIngestConfig):
        from service.embedding import load_embedder

        self.embedder = load_embedder(config.model, config.adapter)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        preps: list[Prepared] = list(batch["prep"])
        by_modality: dict[str, list[Prepared]] = {}
        for p in preps:
            if p.status == "ready":
                by_modality.setdefault(p.cand.modality, []).append(p)
        for modality, group in by_modality.items():
            encoded, failed = encode_prepared(self.embedder, modality, group)
            for p, v in encoded:
                p.vector = np.asarray(v, dtype=np.float32)
            for p, error in failed:
                p.status, p.error = "error", error
        for p in preps:
            p.payload = None  # the decoded media stay here; only vectors and metadata travel on
            p.exc = None  # an exception may not pickle; its message is in ``error``
        return {"shard": batch["shard"], "prep": _objects(preps)}


def build_shard(path: str, shard: int, chunks: list[Any]) -> IngestReport:
    """Store one shard's encoded rows (object refs of lists of ``Prepared``) into its collection."""
    import ray

    from index.collection import Collection

    t0 = time.perf_counter()
    report = IngestReport()
    coll = Collection.open(shard_dir(Path(path), shard))
    try:
        batcher = Batcher(coll, None, report)
        with coll.bulk():
            for ref in chunks:
                batcher.run_encoded(ray.get(ref))
        coll.save()
    finally:
        coll.close()
    report.seconds = time.perf_counter() - t0
    return report


def _merge(total: IngestReport, part: IngestReport) -> None:
    for f in ("added", "updated", "skipped", "failed", "seen"):
        setattr(total, f, getattr(total, f) + getattr(part, f))
    total.errors += part.errors


def ray_ingest(
    collection: str | Path,
    media: Any,
    paths: Sequence[str | Path] = (),
    *,
    address: str,
    config: RayIngestConfig,
    manifest: str | Path | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
) -> IngestReport:
    """Index ``paths`` (files and folders) and/or the files of ``manifest`` into the sharded collection
    at ``collection`` (made by ``ShardedCollection.create``) on the Ray cluster at ``address`` (``"local"``:
    one on this machine). ``media`` is the embedder's reader; the encoder actors load ``config.model``,
    which must be the collection's model (the caller checks it against the collection).

    Returns one merged report, discovery errors included. ``on_progress(encoded, total)`` follows the
    encoded rows. Do not hold the collection open for writing meanwhile: the shard tasks write it.
    """
    t0 = time.perf_counter()
    ray = connect(address)
    cands, errors = discover(paths, media, allowed_roots) if paths else ([], [])
    if manifest is not None:
        files, missing = read_manifest(manifest)
        more, errs = discover(files, media, allowed_roots) if files else ([], [])
        known = {c.path for c in cands}
        cands += [c for c in more if c.path not in known]
        errors += missing + errs
    report = IngestReport(errors=list(errors), failed=len(errors), seen=len(errors))
    with ShardedCollection.open(collection, readonly=True) as sharded:  # what is stored: resume
        todo = [_todo(sharded, c) for c in cands]
    by_shard, counts = _encode(ray, todo, media, config, progress, on_progress)
    for part in _build(ray, str(Path(collection).expanduser()), by_shard, counts):
        _merge(report, part)
    report.seconds = time.perf_counter() - t0
    log.info("ray ingest: %s", report.summary())
    return report


def _todo(sharded: ShardedCollection, cand: Candidate) -> dict[str, Any]:
    s = shard_of(str(cand.path), len(sharded.shards))
    return {"todo": _Todo(s, cand, sharded.shards[s].find_by_uri(str(cand.path)))}


def _encode(
    ray: Any,
    todo: list[dict[str, Any]],
    media: Any,
    config: RayIngestConfig,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[dict[int, list[Any]], dict[int, int]]:
    """Run the read and encode stages; returns (shard -> object refs of its encoded rows, shard -> rows)."""
    from tqdm.auto import tqdm

    by_shard: dict[int, list[Any]] = {}
    counts: dict[int, int] = {}
    if not todo:
        return by_shard, counts
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # one bar: ours
    if not log.isEnabledFor(logging.INFO):  # Ray Data's own job lines, unless asked for (`mm -v`)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // config.batch_size, 200)))
    ds = ds.map_batches(
        prepare_rows,
        fn_kwargs={"media": media, "config": config},
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=PREPARE_CPUS,
    )
    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={"config": config},
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, config.encoders)),
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=ENCODE_CPUS,
    )
    pending: dict[int, list[Prepared]] = {}
    seen: set[str] = set()
    done = 0
    bar = tqdm(total=len(todo), disable=not progress, unit="file", desc="ray ingest")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for s, p in zip(batch["shard"], batch["prep"], strict=True):
                uri = str(p.cand.path)
                if uri in seen:  # a re-run task's rows: each file is stored once
                    log.debug("dropping a second row for %s", uri)
                    continue
                seen.add(uri)
                counts[int(s)] = counts.get(int(s), 0) + 1
                rows = pending.setdefault(int(s), [])
                rows.append(p)
                if len(rows) >= CHUNK_ROWS:
                    by_shard.setdefault(int(s), []).append(ray.put(rows))
                    pending[int(s)] = []
            done = len(seen)
            bar.n = done
            bar.refresh()
            if on_progress is not None:
                on_progress(done, len(todo))
    finally:
        bar.close()
    for s, rows in pending.items():
        if rows:
            by_shard.setdefault(s, []).append(ray.put(rows))
    if done != len(todo):  # Ray Data re-runs lost tasks; a shortfall means rows were lost: never store half
        raise RuntimeError(f"the pipeline returned {done} of {len(todo)} files: nothing was stored")
    return by_shard, counts


def _build(ray: Any, path: str, by_shard: dict[int, list[Any]], counts: dict[int, int]) -> list[IngestReport]:
    """One task per shard on the driver's node (where the collection is); a failed shard re-runs alone."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(build_shard).options(num_cpus=0, max_retries=0, scheduling_strategy=here)
    reports: list[IngestReport] = []
    left = dict(by_shard)
    for attempt in range(1, SHARD_TRIES + 1):
        running = {s: task.remote(path, s, refs) for s, refs in left.items()}
        failed: dict[int, str] = {}
        for s, ref in running.items():
            try:
                reports.append(ray.get(ref))
            except Exception as e:  # any task failure: this shard alone runs again
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("shard %d failed (try %d of %d): %s", s, attempt, SHARD_TRIES, why)
                failed[s] = why
        left = {s: by_shard[s] for s in failed}
        if not left:
            return reports
    for s, why in failed.items():  # its batches so far are stored; a re-run finishes it
        why = f"shard task failed {SHARD_TRIES} times ({why}); re-run to finish it"
        reports.append(IngestReport(failed=counts[s], seen=counts[s], errors=[ItemError(f"shard {s}", why)]))
    return reports
