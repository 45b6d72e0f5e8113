"""Items: add (upload or text), list, get, original media (HTTP Range), thumbnail, delete.

Uploads are stored content-addressed in the media dir (``<collection>/media`` by default) and indexed
at once. A failed upload leaves neither a file nor a row behind. Thumbnails exist for images only
(a cached JPEG); audio and text items answer 404 there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from mm.errors import MediaError
from mm.media import describe_limits, require_modality, text_snippet
from service.deps import CollectionDep, EmbedderDep, SettingsDep
from service.errors import APIError
from service.limits import INT64_MAX, MAX_TAG_CHARS, MAX_TAGS, MAX_TEXT_CHARS
from service.schemas import Deleted, ItemList, ItemOut, Modality, TextItemIn, error_responses
from service.search import item_to_dict
from service.store import (
    remove_owned_files,
    safe_suffix,
    save_upload,
    thumbnail,
    upload_guard,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/items", tags=["items"])

# Ids start at 1 and are SQLite INTEGERs: a larger number could not even be looked up (422, not 500).
ItemIdPath = Annotated[int, PathParam(ge=1, le=INT64_MAX, description="item id")]
TAGS_DOC = f"comma-separated tags (at most {MAX_TAGS}, each at most {MAX_TAG_CHARS} characters)"


def _tags(value: str | None) -> list[str]:
    tags = [t.strip() for t in (value or "").split(",") if t.strip()]
    if len(tags) > MAX_TAGS or any(len(t) > MAX_TAG_CHARS for t in tags):
        raise APIError(
            422, f"tags: give at most {MAX_TAGS}, each at most {MAX_TAG_CHARS} characters", "validation_error"
        )
    return tags


def _get(collection, item_id: int):
    item = collection.get(item_id)
    if item is None:
        raise APIError(404, f"item {item_id} not found")
    return item


def _add_text(collection, embedder, text: str, tags: list[str]) -> ItemOut:
    from index.ingest import add_text

    if not text.strip():
        raise APIError(422, "text is empty", "validation_error")
    item = add_text(collection, embedder, text, tags=tags)
    return ItemOut.model_validate(item_to_dict(item))


FILE_DOC = f"an image or audio file ({describe_limits()})"


@router.post("", response_model=ItemOut, status_code=201, responses=error_responses(401, 413, 415, 422))
def add_item(
    collection: CollectionDep,
    embedder: EmbedderDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File(description=FILE_DOC)] = None,
    text: Annotated[
        str | None,
        Form(description="a text item instead of a file", max_length=MAX_TEXT_CHARS, pattern=r"\S"),
    ] = None,
    caption: Annotated[
        str | None, Form(description="caption stored with a media file", max_length=MAX_TEXT_CHARS)
    ] = None,
    tags: Annotated[str | None, Form(description=TAGS_DOC, max_length=MAX_TAGS * (MAX_TAG_CHARS + 1))] = None,
) -> ItemOut:
    """Add one item: a media ``file`` (with optional ``caption``) or a ``text``, as multipart form fields."""
    if (file is None) == (text is None):
        raise APIError(422, "send exactly one of 'file' or 'text'", "validation_error")
    if text is not None:
        return _add_text(collection, embedder, text, _tags(tags))
    assert file is not None  # exactly one of the two
    from index.ingest import ingest_one

    modality = require_modality(file.filename, file.content_type, ("image", "audio"))  # 415 before writing
    suffix = safe_suffix(file.filename, file.content_type)
    with upload_guard(settings.media_path):  # until the item is committed: not an orphan to sweep
        path, created = save_upload(file.file, settings.media_path, suffix, settings.max_upload_bytes)
        try:
            # Decoded by the embedder's reader (as ingest and /search/upload are); errors name the upload.
            item = ingest_one(
                collection,
                embedder,
                path,
                caption=caption,
                tags=_tags(tags),
                modality=modality,
                name=file.filename or "upload",
                transcribe=getattr(embedder, "transcribe", None),  # speech keeps its transcript
            )
        except BaseException as exc:
            if created:
                Path(path).unlink(missing_ok=True)
            if isinstance(exc, ValueError | OSError) and not isinstance(exc, MediaError):
                raise APIError(422, f"cannot use {file.filename}: {exc}", "invalid_media") from exc
            raise
        if created and Path(item.uri) != path:  # the same content was already indexed from elsewhere
            path.unlink(missing_ok=True)
    log.info("stored upload as item %d (%s)", item.id, item.modality)
    return ItemOut.model_validate(item_to_dict(item))


@router.post("/text", response_model=ItemOut, status_code=201, responses=error_responses(401, 422))
def add_text_item(body: TextItemIn, collection: CollectionDep, embedder: EmbedderDep) -> ItemOut:
    """Add a text item from JSON ``{"text": ..., "tags": [...]}``."""
    return _add_text(collection, embedder, body.text, body.tags)


@router.get("", response_model=ItemList, responses=error_responses(401, 422))
def list_items(
    collection: CollectionDep,
    modality: Modality | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
) -> ItemList:
    """A page of items, each caption a snippet (a stored text may be 1 MB: a page of 1,000 would be a
    gigabyte); ``GET /items/{id}`` holds the whole text."""
    items = collection.items(modality=modality, limit=limit, offset=offset)
    return ItemList(
        items=[ItemOut.model_validate(item_to_dict(i) | {"caption": text_snippet(i.caption)}) for i in items],
        total=collection.count(modality),
        limit=limit,
        offset=offset,
    )


@router.get("/{item_id}", response_model=ItemOut, responses=error_responses(401, 404, 422))
def get_item(item_id: ItemIdPath, collection: CollectionDep) -> ItemOut:
    return ItemOut.model_validate(item_to_dict(_get(collection, item_id)))


MEDIA_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/*": {}, "audio/*": {}}},
    206: {"description": "a byte range"},
}
THUMBNAIL_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}}}


def check_range(range_header: str | None, if_range: str | None, size: int) -> None:
    """Refuse a ``Range`` header the file response would refuse, with our JSON error body.

    The file response itself answers a malformed range with a plain-text 400 and an unsatisfiable one
    with an empty 416; asking its own parser first keeps one definition of a valid range. A range sent
    with ``If-Range`` may be ignored (the whole file is sent), so it is left to the response.
    """
    if range_header is None or if_range is not None:
        return
    try:
        FileResponse._parse_range_header(range_header, size)
    except MalformedRangeHeader as exc:
        raise APIError(400, f"bad Range header: {exc.content}", code="bad_range") from None
    except RangeNotSatisfiable:
        raise APIError(
            416,
            f"Range not satisfiable: the file has {size} bytes",
            code="range_not_satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None


@router.get(
    "/{item_id}/media",
    response_class=FileResponse,
    responses=MEDIA_RESPONSES | error_responses(400, 401, 404, 416, 422),
)
def get_media(
    item_id: ItemIdPath,
    collection: CollectionDep,
    range_header: Annotated[str | None, Header(alias="Range", max_length=1000)] = None,
    if_range: Annotated[str | None, Header(alias="If-Range", max_length=1000)] = None,
) -> FileResponse:
    """The original file; honours ``Range`` requests (206 + ``Content-Range``) so audio can seek."""
    item = _get(collection, item_id)
    if item.modality == "text" or not item.uri or not Path(item.uri).is_file():
        raise APIError(404, f"item {item_id} has no media file")
    check_range(range_header, if_range, Path(item.uri).stat().st_size)
    return FileResponse(item.uri, media_type=item.mime or None, filename=Path(item.uri).name)


@router.get(
    "/{item_id}/thumbnail",
    response_class=FileResponse,
    responses=THUMBNAIL_RESPONSES | error_responses(401, 404, 422),
)
def get_thumbnail(item_id: ItemIdPath, collection: CollectionDep, settings: SettingsDep) -> FileResponse:
    """A JPEG thumbnail of an image item (cached on disk); 404 for audio and text items."""
    item = _get(collection, item_id)
    if item.modality != "image" or not item.uri or not Path(item.uri).is_file():
        raise APIError(404, f"item {item_id} has no thumbnail (only images have one)")
    path = thumbnail(item, settings.thumbnail_path, settings.thumbnail_size)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})


@router.delete("/{item_id}", response_model=Deleted, responses=error_responses(401, 404, 422))
def delete_item(item_id: ItemIdPath, collection: CollectionDep, settings: SettingsDep) -> Deleted:
    """Remove the item from the index; an uploaded file (in the media dir) and its thumbnail go too."""
    item = _get(collection, item_id)
    if collection.delete([item_id]) == 0:
        raise APIError(404, f"item {item_id} not found")
    if item.uri and collection.find_by_uri(item.uri) is None:
        remove_owned_files(item, settings.media_path, settings.thumbnail_path)
    return Deleted(deleted=item_id)
