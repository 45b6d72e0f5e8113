"""Put files into a collection: discover, decode in worker threads, encode in the caller's thread, store.

Files are sniffed, bounded and decoded by the embedder's ``media`` reader (``mm.media`` for the real
model): the same code, limits and messages as the service's uploads and the encoders, refusing a
decompression bomb, an hour of audio or an oversized file from its header before reading it whole.

The pipeline keeps two batches in flight: while the embedder encodes batch i, the workers stat, hash and
decode batch i+1 (PIL / soundfile release the GIL). Each batch is committed on its own, so an interrupted
run loses at most the batch in hand, and a re-run skips every file whose size and mtime (or, failing that,
sha256) are unchanged. A bad file is recorded as an error and never stops the run; when a whole batch
fails to encode, its items are retried one by one to find the culprit.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import mimetypes
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from index.collection import Collection
from index.protocol import Embedder, MediaReader, Transcribe
from index.types import IngestReport, Item, ItemError
from index.walk import OUTSIDE, inside, resolve_roots, walk

if TYPE_CHECKING:
    from index.api import CollectionAPI

log = logging.getLogger(__name__)

CAPTION_EXT = ".txt"  # ``frog.txt`` next to ``frog.png`` is the image's caption, not an item
SAVE_EVERY_S = 60.0  # write the FAISS file at least this often during a long run


@dataclass
class Candidate:
    path: Path
    modality: str
    caption_path: Path | None = None


@dataclass
class Prepared:
    cand: Candidate
    status: Literal["ready", "skip", "meta", "error"]
    item: Item | None = None
    payload: Any = None  # PIL image, (waveform (T,), rate) or text
    existing: Item | None = None
    error: str = ""
    exc: Exception | None = None  # the refusal itself (a MediaError keeps its kind for the API)
    meta: dict[str, Any] = field(default_factory=dict)  # fields to update without re-encoding
    vector: np.ndarray | None = None  # (dim,) when encoded elsewhere (service.distributed.ingest)


def _media_sibling(path: Path, present: set[Path] | None, suffixes: frozenset[str]) -> bool:
    """Whether a ``.txt`` has an image/audio file of the same stem beside it (so it is a caption)."""
    for ext in suffixes:
        for cand in (path.with_suffix(ext), path.with_suffix(ext.upper())):
            if (cand in present) if present is not None else cand.is_file():
                return True
    return False


def discover(
    paths: Sequence[str | Path], media: MediaReader, allowed_roots: Sequence[str | Path] | None = None
) -> tuple[list[Candidate], list[ItemError]]:
    """Expand folders (recursively, skipping hidden names) into ingestible files and their captions.

    ``media`` (the embedder's reader) says which names are images, sounds or texts.

    Every path is resolved before use (:mod:`index.walk`): with ``allowed_roots`` one that leads
    outside them is refused, and dangling or looping symlinks are reported, each as an ``ItemError``.
    """
    roots = resolve_roots(allowed_roots)
    walked: list[Path] = []
    explicit: list[Path] = []
    errors: list[ItemError] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise ValueError(f"{p} does not exist: pass existing files or folders")
        real = p.resolve()
        if not inside(real, roots):
            errors.append(ItemError(str(p), OUTSIDE if p.is_symlink() else "outside the allowed roots"))
        elif real.is_dir():
            walked += walk(real, roots, errors)
        else:
            explicit.append(real)
    present = set(walked)
    out: list[Candidate] = []
    seen: set[Path] = set()
    for f, is_explicit in [(f, False) for f in walked] + [(f, True) for f in explicit]:
        if f in seen:
            continue
        seen.add(f)
        modality = media.modality_of(f)
        if modality is None:
            if is_explicit:
                errors.append(ItemError(str(f), f"unsupported file type {f.suffix or '(none)'!r}"))
            continue
        if modality == "text":
            if f.suffix.lower() == CAPTION_EXT and _media_sibling(
                f, None if is_explicit else present, media.media_suffixes
            ):
                continue  # a sidecar caption, read with its media file
            out.append(Candidate(f, "text"))
            continue
        out.append(Candidate(f, modality, _caption_path(f, roots)))
    return out, errors


def _caption_path(media: Path, roots: Sequence[Path] | None) -> Path | None:
    """The resolved sidecar caption of ``media`` if there is one inside the roots (a link out is not read)."""
    cap = media.with_suffix(CAPTION_EXT)
    if not cap.is_file():
        return None
    real = cap.resolve()
    return real if inside(real, roots) else None


def _prepare(
    coll: CollectionAPI,
    media: MediaReader,
    cand: Candidate,
    tags: list[str] | None,
    retry_failed: bool,
    caption: str | None = None,
    name: str | None = None,
    transcribe: Transcribe | None = None,
) -> Prepared:
    """:func:`prepare_file` against what ``coll`` holds for the file."""
    try:
        existing = coll.find_by_uri(str(cand.path))
    except (OSError, ValueError) as e:
        return Prepared(cand, "error", error=str(e) or type(e).__name__, exc=e, item=_bare_item(cand))
    return prepare_file(media, cand, existing, tags, retry_failed, caption, name, transcribe)


def prepare_file(
    media: MediaReader,
    cand: Candidate,
    existing: Item | None,
    tags: list[str] | None,
    retry_failed: bool,
    caption: str | None = None,
    name: str | None = None,
    transcribe: Transcribe | None = None,
) -> Prepared:
    """One file's preparation, a pure function of the file and ``existing`` (the stored item of its uri,
    or None): stat, skip if unchanged, sniff, read, hash, decode (and transcribe speech). Never raises
    (errors become ``status="error"``). ``name``: what error messages call the file (its name by
    default). Runs in ingest's worker threads and in Ray tasks (``service.distributed.ingest``) alike."""
    path, modality = cand.path, cand.modality
    uri = str(path)
    name = name or path.name
    try:
        st = path.stat()
        if caption is None and cand.caption_path is not None:
            caption = media.read_caption(cand.caption_path)
        if existing is not None and existing.mtime == st.st_mtime and existing.size == st.st_size:
            if existing.error is not None:
                if not retry_failed:
                    return Prepared(cand, "skip", existing=existing)
            else:
                meta = _meta_changes(existing, caption, tags)
                return Prepared(cand, "meta" if meta else "skip", existing=existing, meta=meta)
        info = media.sniff(path, name, modality)  # limits from the header, before reading it whole
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if existing is not None and existing.error is None and existing.sha256 == sha:
            meta = _meta_changes(existing, caption, tags) | {"mtime": st.st_mtime, "size": st.st_size}
            return Prepared(cand, "meta", existing=existing, meta=meta)
        item = Item(
            id=0,
            modality=modality,
            uri=uri,
            sha256=sha,
            mime=mimetypes.guess_type(path.name)[0] or info.mime,
            caption=caption or "",
            tags=list(tags if tags is not None else (existing.tags if existing else [])),
            size=st.st_size,
            mtime=st.st_mtime,
        )
        payload = media.decode(data, info, name)
        item.width, item.height, item.duration = info.width, info.height, info.duration
        if modality == "text":
            item.caption = payload  # the text as stored (bounded by the reader); encoders cut their own
        if modality == "audio" and transcribe is not None:
            _add_transcript(item, payload, transcribe, name)
        return Prepared(cand, "ready", item=item, payload=payload, existing=existing)
    except (OSError, ValueError) as e:
        error = str(e) or type(e).__name__
        return Prepared(cand, "error", error=error, exc=e, item=_bare_item(cand))


def _add_transcript(item: Item, payload: Any, transcribe: Transcribe, name: str) -> None:
    """``item.extra["transcript"] = {"text", "language"}`` when the clip holds speech."""
    heard = heard_in(payload, transcribe, name)
    if heard is not None:
        item.extra["transcript"] = heard


def heard_in(payload: Any, transcribe: Transcribe, name: str) -> dict[str, str] | None:
    """``{"text", "language"}`` of the speech in a decoded clip, or None (no speech). A recogniser that
    fails costs the transcript, never the item or the search: it is logged and None is returned."""
    try:
        heard = transcribe(payload)
    except Exception as e:  # any recogniser failure: the clip goes on without a transcript
        log.warning("cannot transcribe %s: %s", name, e)
        return None
    if not heard or not str(heard.get("text", "")).strip():
        return None
    return {"text": str(heard["text"]).strip(), "language": str(heard.get("language", ""))}


def _bare_item(cand: Candidate) -> Item:
    try:
        st = cand.path.stat()
        size, mtime = st.st_size, st.st_mtime
    except OSError:
        size, mtime = 0, 0.0
    return Item(id=0, modality=cand.modality, uri=str(cand.path), sha256="", size=size, mtime=mtime)


def _meta_changes(existing: Item, caption: str | None, tags: list[str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if caption is not None and existing.modality != "text" and caption != existing.caption:
        meta["caption"] = caption
    if tags is not None and sorted(tags) != sorted(existing.tags):
        meta["tags"] = list(tags)
    return meta


def encode_checked(embedder: Embedder, modality: str, payloads: list[Any]) -> np.ndarray:
    """``(n, dim)`` float32 vectors of ``payloads``; ValueError on a wrong shape or NaN/inf."""
    fn = {"image": embedder.encode_image, "audio": embedder.encode_audio, "text": embedder.encode_text}[
        modality
    ]
    out = np.asarray(fn(payloads), dtype=np.float32)
    if out.shape != (len(payloads), embedder.dim):
        raise ValueError(f"embedder returned shape {out.shape} for {len(payloads)} {modality} inputs")
    if not np.isfinite(out).all():
        raise ValueError("embedder returned NaN or inf")
    return out


def _check_embedder(coll: CollectionAPI, embedder: Embedder) -> None:
    model_id = getattr(embedder, "model_id", coll.embedder_id)
    if int(embedder.dim) != coll.dim or model_id != coll.embedder_id:
        raise ValueError(
            f"collection {coll.path} holds vectors of {coll.embedder_id!r} (dim {coll.dim}); this embedder "
            f"is {model_id!r} (dim {embedder.dim}): use the same model or another collection"
        )


class Batcher:
    """Main-thread side of :func:`ingest`: dedup, encode (isolating failures), store, count."""

    def __init__(self, coll: Collection, embedder: Embedder | None, report: IngestReport):
        """``embedder`` None: rows come encoded (:meth:`run_encoded`)."""
        self.coll, self.embedder, self.report = coll, embedder, report
        self.seen_content: set[tuple[str, str]] = set()  # (sha256, modality) added in this run

    def fail(self, p: Prepared, error: str) -> None:
        it = p.item or _bare_item(p.cand)
        log.warning("cannot ingest %s: %s", p.cand.path, error)
        self.coll.record_error(
            it.uri, error, it.modality, sha256=it.sha256, mtime=it.mtime, size=it.size, mime=it.mime
        )
        self.report.failed += 1
        self.report.errors.append(ItemError(str(p.cand.path), error))

    def is_duplicate(self, p: Prepared) -> bool:
        assert p.item is not None
        if p.existing is not None:  # a changed file replaces itself, even if it now equals another
            return False
        key = (p.item.sha256, p.item.modality)
        if key in self.seen_content or any(
            it.error is None and it.modality == p.item.modality
            for it in self.coll.find_by_sha256(p.item.sha256)
        ):
            log.debug("skipping %s: same content as an item already stored", p.cand.path)
            return True
        self.seen_content.add(key)
        return False

    def run(self, batch: list[Prepared]) -> None:
        assert self.embedder is not None, "this batcher stores rows encoded elsewhere: use run_encoded"
        ready = self.triage(batch)
        by_modality: dict[str, list[Prepared]] = collections.defaultdict(list)
        for p in ready:
            by_modality[p.cand.modality].append(p)
        done: list[tuple[Prepared, np.ndarray]] = []
        for modality, group in by_modality.items():
            encoded, failed = encode_prepared(self.embedder, modality, group)
            done += encoded
            for p, error in failed:
                self.fail(p, error)
        self.store(done)

    def run_encoded(self, batch: list[Prepared]) -> None:
        """:meth:`run` for rows encoded elsewhere: ready rows carry their ``vector`` (an encode failure
        came back as an error row)."""
        self.store([(p, p.vector) for p in self.triage(batch) if p.vector is not None])

    def triage(self, batch: list[Prepared]) -> list[Prepared]:
        """Count skips, apply metadata-only changes, record errors, drop duplicates; the rest is ready."""
        ready: list[Prepared] = []
        for p in batch:
            self.report.seen += 1
            if p.status == "skip":
                self.report.skipped += 1
            elif p.status == "meta":
                assert p.existing is not None
                self.coll.update_metadata(p.existing.id, **p.meta)
                changed = bool(set(p.meta) - {"mtime", "size"})
                self.report.updated += changed
                self.report.skipped += not changed
            elif p.status == "error":
                self.fail(p, p.error)
            elif self.is_duplicate(p):
                self.report.skipped += 1
            else:
                ready.append(p)
        return ready

    def store(self, done: list[tuple[Prepared, np.ndarray]]) -> None:
        if done:
            items = [p.item for p, _ in done]
            self.coll.upsert(np.stack([v for _, v in done]), items)  # type: ignore[arg-type]
            for p, _ in done:
                if p.existing is None:
                    self.report.added += 1
                else:
                    self.report.updated += 1


def encode_prepared(
    embedder: Embedder, modality: str, group: list[Prepared]
) -> tuple[list[tuple[Prepared, np.ndarray]], list[tuple[Prepared, str]]]:
    """``(encoded [(row, vector (dim,))], failed [(row, why)])`` of one modality's ready rows: the batch
    at once, and when it fails, one by one to find the culprit."""
    try:
        vecs = encode_checked(embedder, modality, [p.payload for p in group])
        return list(zip(group, vecs, strict=True)), []
    except Exception as e:
        if len(group) == 1:
            return [], [(group[0], f"cannot encode {modality}: {e}")]
        log.info("batch of %d %s items failed to encode (%s); retrying one by one", len(group), modality, e)
    encoded: list[tuple[Prepared, np.ndarray]] = []
    failed: list[tuple[Prepared, str]] = []
    for p in group:
        ok, bad = encode_prepared(embedder, modality, [p])
        encoded += ok
        failed += bad
    return encoded, failed


def ingest(
    collection: Collection,
    embedder: Embedder,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    tags: list[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    retry_failed: bool = False,
    allowed_roots: Sequence[str | Path] | None = None,
    transcribe: Transcribe | None = None,
) -> IngestReport:
    """Index files and folders (recursively). Unchanged files are skipped, so an interrupted run resumes.

    ``transcribe(payload) -> {"text", "language"} | None`` (the service passes Whisper's): audio items
    with speech keep their transcript in ``extra["transcript"]`` (searchable as text); it runs in the
    decode workers, beside the encoder.

    With ``allowed_roots``, files (and symlinks' targets) outside them are refused, each reported.

    ``on_progress(done, total)`` is called after each batch; ``should_stop()`` is polled before each batch.
    Failed files are retried only when changed, or with ``retry_failed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_embedder(collection, embedder)
    t0 = time.perf_counter()
    cands, errors = discover(paths, embedder.media, allowed_roots)
    report = IngestReport(errors=list(errors), failed=len(errors), seen=len(errors))
    batches = [cands[i : i + batch_size] for i in range(0, len(cands), batch_size)]
    batcher = Batcher(collection, embedder, report)
    media = embedder.media
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cands), disable=not progress, unit="file", desc="ingest")
    done = 0
    last_save = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ingest")
    try:
        with collection.bulk():
            queue: collections.deque[list[Future[Prepared]]] = collections.deque()
            todo = iter(batches)

            def submit_next() -> None:
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append(
                        [
                            pool.submit(
                                _prepare, collection, media, c, tags, retry_failed, transcribe=transcribe
                            )
                            for c in nxt
                        ]
                    )

            submit_next()
            submit_next()  # two in flight: workers decode the next batch while this one encodes
            while queue:
                if should_stop is not None and should_stop():
                    log.info("ingest stopped after %d of %d files; re-run to resume", done, len(cands))
                    break
                futures = queue.popleft()
                submit_next()
                batch = [f.result() for f in futures]
                batcher.run(batch)
                done += len(batch)
                bar.update(len(batch))
                if on_progress is not None:
                    on_progress(done, len(cands))
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    collection.save()
                    last_save = time.monotonic()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    report.seconds = time.perf_counter() - t0
    log.info("ingest: %s", report.summary())
    return report


def ingest_one(
    collection: CollectionAPI,
    embedder: Embedder,
    path: str | Path,
    *,
    caption: str | None = None,
    tags: list[str] | None = None,
    modality: str | None = None,
    name: str | None = None,
    transcribe: Transcribe | None = None,
) -> Item:
    """Index one file and return its item (an audio item's speech transcribed with ``transcribe``). Bad
    media raise ``ValueError`` (the reader's ``MediaError``, kind kept) and store nothing.

    ``modality`` overrides the one the suffix names; ``name`` is what error messages call the file (an
    upload's own name rather than where the server stored it). Content already stored (same sha256 and
    modality) returns the stored item.
    """
    _check_embedder(collection, embedder)
    p = Path(path).expanduser()
    label = name or p.name
    if not p.is_file():
        raise ValueError(f"{label} is not a file")
    modality = modality or embedder.media.modality_of(p)
    if modality is None:
        raise ValueError(f"unsupported file type {p.suffix or '(none)'!r} for {label}")
    p = p.resolve()
    cap_path = p.with_suffix(CAPTION_EXT) if modality != "text" else None
    cand = Candidate(p, modality, cap_path if cap_path is not None and cap_path.is_file() else None)
    prep = _prepare(
        collection,
        embedder.media,
        cand,
        tags,
        retry_failed=True,
        caption=caption,
        name=label,
        transcribe=transcribe,
    )
    if prep.status == "error":
        if prep.exc is not None and not isinstance(prep.exc, OSError):
            raise prep.exc  # already names the file
        raise ValueError(f"{label}: {prep.error}")
    if prep.status in ("skip", "meta"):
        assert prep.existing is not None
        if prep.meta:
            collection.update_metadata(prep.existing.id, **prep.meta)
        return collection.get(prep.existing.id) or prep.existing
    assert prep.item is not None
    if prep.existing is None:
        for it in collection.find_by_sha256(prep.item.sha256):
            if it.error is None and it.modality == modality:
                return it
    vec = encode_checked(embedder, modality, [prep.payload])  # the embedder's ValueError propagates
    (id_,) = collection.upsert(vec, [prep.item])
    item = collection.get(id_)
    assert item is not None
    return item


def add_text(
    collection: CollectionAPI, embedder: Embedder, text: str, *, tags: list[str] | None = None, uri: str = ""
) -> Item:
    """Index a piece of text (its own caption). Identical text already stored returns the stored item."""
    _check_embedder(collection, embedder)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: pass some words to index")
    data = text.encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    if not uri:
        for it in collection.find_by_sha256(sha):
            if it.error is None and it.modality == "text":
                return it
    vec = encode_checked(embedder, "text", [text])
    now = time.time()
    item = Item(
        id=0,
        modality="text",
        uri=uri,
        sha256=sha,
        mime="text/plain",
        caption=text,
        tags=list(tags or []),
        size=len(data),
        mtime=now,
    )
    (id_,) = collection.upsert(vec, [item]) if uri else collection.add(vec, [item])
    stored = collection.get(id_)
    assert stored is not None
    return stored
