"""What a kill leaves behind is cleaned on the next start: save temp files and orphaned uploads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import FakeEmbedder, image_bytes
from fastapi.testclient import TestClient

from index.atomic import FileLock
from index.collection import Collection
from index.types import Item
from service.app import create_app
from service.settings import Settings
from service.store import UPLOADS_LOCK, remove_orphan_uploads

ORPHAN = "0123456789abcdef01234567.png"  # the name save_upload gives an upload
CUT_SHORT = ".upload-ab_cd123.png"  # save_upload's temp file, copy interrupted
NOT_OURS = ["notes.txt", "0123.png", ".hidden.png"]


def _leave_leftovers(media: Path) -> None:
    media.mkdir(parents=True, exist_ok=True)
    (media / ORPHAN).write_bytes(image_bytes())
    (media / CUT_SHORT).write_bytes(b"half an upload")
    for name in NOT_OURS:
        (media / name).write_text("not the service's")


def test_restart_removes_uploads_no_item_refers_to(tmp_path):
    settings = Settings(collection=tmp_path / "coll")
    with TestClient(create_app(settings, embedder=FakeEmbedder())) as client:
        resp = client.post("/items", files={"file": ("red.png", image_bytes((255, 0, 0)), "image/png")})
        assert resp.status_code == 201, resp.text
        item = resp.json()
    media = settings.media_path
    kept = Path(item["uri"])
    assert kept.parent == media.resolve() and kept.exists()
    _leave_leftovers(media)  # as a kill between storing an upload and committing its item leaves them
    with TestClient(create_app(settings, embedder=FakeEmbedder())) as client:
        assert not (media / ORPHAN).exists() and not (media / CUT_SHORT).exists()
        assert kept.exists() and all((media / n).exists() for n in NOT_OURS)
        assert client.get(f"/items/{item['id']}/media").content == kept.read_bytes()


def test_uploads_in_flight_are_never_swept(tmp_path):
    coll = Collection.create(tmp_path / "coll", dim=4, embedder_id="f")
    media = tmp_path / "coll" / "media"
    _leave_leftovers(media)
    in_flight = FileLock(media / UPLOADS_LOCK, shared=True)  # another process mid-upload holds this
    with in_flight:
        assert remove_orphan_uploads(coll, media) == []
        assert (media / ORPHAN).exists() and (media / CUT_SHORT).exists()
    # a recorded error row refers to its file too: only files no row names are orphans
    coll.record_error(str((media / ORPHAN).resolve()), "cannot decode image", "image")
    assert [p.name for p in remove_orphan_uploads(coll, media)] == [CUT_SHORT]
    assert (media / ORPHAN).exists()
    coll.close()


def test_a_media_folder_outside_the_collection_is_not_swept(tmp_path):
    """A shared MM_MEDIA_DIR may hold another collection's uploads."""
    coll = Collection.create(tmp_path / "coll", dim=4, embedder_id="f")
    coll.add(np.eye(4, dtype=np.float32)[:1], [Item(id=0, modality="image", uri="/elsewhere", sha256="s")])
    shared = tmp_path / "shared-media"
    _leave_leftovers(shared)
    assert remove_orphan_uploads(coll, shared) == []
    assert (shared / ORPHAN).exists()
    coll.close()
