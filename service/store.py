"""Files the service owns: opening the collection, stored uploads, thumbnails, allowed ingest roots."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from index.atomic import atomic_write, durable_replace
from mm.errors import MediaError
from mm.media import MIME_SUFFIX, require_modality
from service.schemas import QueryMedia

if TYPE_CHECKING:
    from index.api import CollectionAPI
    from index.atomic import FileLock
    from index.collection import Collection
    from index.protocol import Embedder
    from index.types import Item

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def open_collection(
    path: str | Path,
    embedder: Embedder | None = None,
    *,
    create: bool = False,
    readonly: bool = False,
    memory_budget_mb: int = 1024,
) -> Collection:
    """Open the collection at ``path``; with ``create`` make it for ``embedder`` if it does not exist.

    Raises ValueError when there is no collection (and ``create`` is off), when ``path`` holds a sharded
    one (:func:`open_served` opens that) or when it was built with another embedder (vectors of two
    models must never be mixed).
    """
    from index.collection import Collection
    from index.sharded import is_sharded

    path = Path(path).expanduser()
    if is_sharded(path):  # never a plain collection created beside the shards
        raise ValueError(
            f"{path} is a sharded collection (mm index --shards): `mm serve`, `mm search` and `mm index` "
            "take it; for this command give one of its shard-NNN folders"
        )
    if create:
        if embedder is None:
            raise ValueError("creating a collection needs an embedder")
        coll = Collection.open_or_create(
            path, dim=embedder.dim, embedder_id=embedder.model_id, memory_budget_mb=memory_budget_mb
        )
    else:
        if not path.exists():
            raise ValueError(f"no collection at {path}: create one with `mm index PATH --collection {path}`")
        coll = Collection.open(path, readonly=readonly)
    same_model(coll, embedder, path)
    return coll


def open_served(
    path: str | Path,
    embedder: Embedder | None = None,
    *,
    create: bool = False,
    readonly: bool = False,
    memory_budget_mb: int = 1024,
    deadline_s: float | None = None,
    ray_address: str | None = None,
) -> CollectionAPI:
    """What ``mm serve`` and ``mm search`` read: :func:`open_collection`, or for a sharded collection
    (``shards.json`` in ``path``, made by ``mm index --shards``) one
    :class:`~index.sharded.ShardedCollection` whose searches wait ``deadline_s`` for each shard; with
    ``ray_address`` its shards are Ray actors on that cluster (:mod:`service.distributed.shards`).
    """
    from index.sharded import ShardedCollection, is_sharded

    path = Path(path).expanduser()
    if not is_sharded(path):
        if ray_address:
            raise ValueError(
                f"{path} is not a sharded collection: Ray serves the shards of one made with "
                f"`mm index PATH --shards S --collection {path}`"
            )
        return open_collection(
            path, embedder, create=create, readonly=readonly, memory_budget_mb=memory_budget_mb
        )
    coll: ShardedCollection
    if ray_address:
        from service.distributed.shards import open_ray_sharded

        coll = open_ray_sharded(path, ray_address, readonly=readonly, deadline_s=deadline_s)
    else:
        coll = ShardedCollection.open(path, readonly=readonly, deadline_s=deadline_s)
    same_model(coll, embedder, path)
    return coll


def same_model(coll: CollectionAPI, embedder: Embedder | None, path: Path) -> None:
    """ValueError (``coll`` closed) when ``coll`` holds vectors of another model than ``embedder``."""
    if embedder is not None and (coll.embedder_id != embedder.model_id or coll.dim != embedder.dim):
        coll.close()
        model = getattr(embedder, "name", "MODEL")
        raise ValueError(
            f"collection {path} was built with model {coll.embedder_id!r} (dim {coll.dim}), not "
            f"{embedder.model_id!r} (dim {embedder.dim}): pass the same --model / MM_MODEL, or re-encode it "
            f"with this model: `mm index --reembed --collection {path} --model {model}`"
        )


def safe_suffix(filename: str | None, content_type: str | None = None) -> str:
    suffix = Path(filename or "").suffix.lower()
    if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix):
        return suffix
    return MIME_SUFFIX.get((content_type or "").split(";")[0].strip().lower(), "")


def copy_limited(src: IO[bytes], dst: IO[bytes], max_bytes: int) -> tuple[int, str]:
    """Copy in chunks, stopping with a MediaError(kind="too_large") past ``max_bytes``; (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(f"file is larger than the {max_bytes // (1 << 20)} MB limit", kind="too_large")
        digest.update(chunk)
        dst.write(chunk)
    if size == 0:
        raise MediaError("the uploaded file is empty", kind="empty")
    return size, digest.hexdigest()


def save_upload(src: IO[bytes], media_dir: Path, suffix: str, max_bytes: int) -> tuple[Path, bool]:
    """Store an upload content-addressed as ``<media_dir>/<sha256[:24]><suffix>``.

    Returns the path and whether this call created it (a caller that fails later removes only what it
    created). Nothing is left behind when the copy fails.
    """
    media_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=media_dir, prefix=".upload-", suffix=suffix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            _, sha = copy_limited(src, dst, max_bytes)
        final = media_dir / f"{sha[:24]}{suffix}"
        if final.exists():
            tmp.unlink()
            return final, False
        durable_replace(tmp, final)
        return final, True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


UPLOADS_LOCK = ".uploads.lock"
_UPLOAD_NAME = re.compile(r"[0-9a-f]{24}(\.[a-z0-9]{1,8})?")  # what save_upload names a stored upload
_UPLOAD_TEMP = re.compile(r"\.upload-[a-z0-9_]{8}(\.[a-z0-9]{1,8})?")  # and its temp file while copying


def upload_guard(media_dir: Path) -> FileLock:
    """A shared lock to hold from storing an upload until its item is committed (or the file removed).

    :func:`remove_orphan_uploads` takes it exclusively, so it never mistakes an upload in flight in any
    process for an orphan.
    """
    from index.atomic import FileLock

    media_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(media_dir / UPLOADS_LOCK, shared=True)


def remove_orphan_uploads(collection: CollectionAPI, media_dir: Path) -> list[Path]:
    """Delete stored uploads no item refers to, and temp files of uploads cut short; returns them.

    A kill between storing an upload and committing its item leaves such files. Only a media folder
    inside the collection's own folder is swept (a shared one may hold another collection's uploads),
    only names :func:`save_upload` makes, and only while no upload is in flight anywhere (otherwise
    they wait for the next start).
    """
    from index.atomic import FileLock

    media = media_dir.resolve()
    if not media.is_dir() or not is_inside(media, collection.path):
        return []
    lock = FileLock(media / UPLOADS_LOCK)
    if not lock.acquire(blocking=False):
        log.info("uploads in flight in %s: leaving unreferenced files for the next start", media)
        return []
    removed: list[Path] = []
    try:
        referenced = collection.uris_under(str(media) + os.sep)
        for f in media.iterdir():
            orphan = _UPLOAD_TEMP.fullmatch(f.name) or (
                _UPLOAD_NAME.fullmatch(f.name) and str(f) not in referenced
            )
            if orphan and f.is_file() and not f.is_symlink():
                f.unlink(missing_ok=True)
                removed.append(f)
    finally:
        lock.release()
    if removed:
        log.warning(
            "removed %d uploaded files no item refers to (left by an interrupted upload)", len(removed)
        )
    return removed


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it, after resolving symlinks and ``..`` in both."""
    p, r = path.resolve(), root.resolve()
    return p == r or r in p.parents


def resolve_allowed(path: str, roots: list[Path]) -> Path:
    """The resolved ``path`` if it lies under one of ``roots``; PermissionError otherwise."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise ValueError(f"path must be absolute, got {path!r}")
    if not roots:
        raise PermissionError("server-side ingest is off: no allowed roots are configured (MM_ALLOWED_ROOTS)")
    if not any(is_inside(p, root) for root in roots):
        raise PermissionError(f"{path} is outside the allowed roots")
    resolved = p.resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return resolved


def thumbnail(item: Item, thumb_dir: Path, size: int = 256) -> Path:
    """A JPEG thumbnail of an image item (longest side ``size``), made once and cached in ``thumb_dir``."""
    if item.modality != "image" or not item.uri:
        raise MediaError(f"item {item.id} is not an image: no thumbnail", kind="unsupported")
    out = thumb_dir / f"{item.id}-{item.sha256[:12]}-{size}.jpg"
    if out.exists():
        return out
    from mm.media import thumbnail as decode_thumbnail

    try:  # the one decoder: same limits, EXIF rotation and transparency on white as indexing
        rgb = decode_thumbnail(Path(item.uri), size, name=f"image of item {item.id}")
    except OSError as exc:
        raise MediaError(f"cannot read the image of item {item.id}", kind="corrupt") from exc
    thumb_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: rgb.save(tmp, format="JPEG", quality=85))
    return out


def remove_owned_files(item: Item, media_dir: Path, thumb_dir: Path) -> None:
    """Delete an item's thumbnails, and its media file when the service stored it (an upload)."""
    for thumb in thumb_dir.glob(f"{item.id}-*.jpg"):
        thumb.unlink(missing_ok=True)
    if item.uri and is_inside(Path(item.uri), media_dir):
        Path(item.uri).unlink(missing_ok=True)


@contextlib.contextmanager
def query_file(upload: Any, max_bytes: int, prefix: str = "mm-query-") -> Iterator[QueryMedia]:
    """An uploaded image or audio clip as a query file: its type checked, copied to a temp file up to
    ``max_bytes`` (413 beyond), and removed when the query is done; never stored."""
    modality = require_modality(upload.filename, upload.content_type, ("image", "audio"))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=safe_suffix(upload.filename, upload.content_type))
    try:
        with os.fdopen(fd, "wb") as dst:
            copy_limited(upload.file, dst, max_bytes)
        yield QueryMedia(modality, tmp, upload.filename or "upload")
    finally:
        os.unlink(tmp)
