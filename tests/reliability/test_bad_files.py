"""The bad-file zoo (zoo.py) through every door: folder ingest, ``POST /items`` and ``/search/upload``.

Every bad file gets a clear per-item error or a 4xx with a JSON error body, never a 5xx, and is not
indexed. A file refusable from its size, header, magic bytes or link target (``expect == "refused"``) is
refused before any pixel or sample decoder runs: the low-level decoders (Pillow's ``ImageFile.load``,
soundfile's ``SoundFile.read``) are wrapped to record every file they decode. Text has no decoder; it is
bounded by traced memory instead. No assertion here measures time.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
import zoo
from conftest import wait_job
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

CASES = zoo.cases()
UPLOADS = [c for c in CASES if c.uploadable]
PEAK_BYTES = 64 << 20  # traced Python memory while handling the whole zoo (the files add up to ~700 MB)


class DecodeLog:
    """Names of the files the low-level decoders were asked to decode, in call order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import soundfile
        from PIL import ImageFile

        log = self.names
        image_load, sound_read = ImageFile.ImageFile.load, soundfile.SoundFile.read

        def load(img, *args, **kwargs):
            name = getattr(img, "filename", None) or getattr(getattr(img, "fp", None), "name", None)
            log.append(str(name or "<stream>"))
            return image_load(img, *args, **kwargs)

        def read(sf, *args, **kwargs):
            log.append(str(getattr(sf, "name", None) or "<stream>"))
            return sound_read(sf, *args, **kwargs)

        mp.setattr(ImageFile.ImageFile, "load", load)
        mp.setattr(soundfile.SoundFile, "read", read)

    def decoded(self, name: str) -> bool:
        return any(os.path.basename(n) == name for n in self.names)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "zoo"
    zoo.build(root)
    return root


@pytest.fixture(scope="module")
def decodes():
    log = DecodeLog()
    with pytest.MonkeyPatch.context() as mp:
        log.install(mp)
        yield log


@pytest.fixture(scope="module")
def client(tmp_path_factory, embedder, zoo_dir, decodes):
    settings = Settings(
        collection=tmp_path_factory.mktemp("zoo-coll") / "c", allowed_roots=[zoo_dir], max_upload_mb=16
    )
    with TestClient(create_app(settings, embedder=embedder)) as c:
        yield c


def clear_error(resp) -> str | None:
    """Why ``resp`` is not a clear 4xx error (None when it is)."""
    if not 400 <= resp.status_code < 500:
        return f"status {resp.status_code}: {resp.text[:200]}"
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"status {resp.status_code} without a JSON error body: {resp.text[:200]}"
    if not message or "object at 0x" in message or "mm-query-" in message:
        return f"unclear message: {message!r}"
    return None


@pytest.fixture(scope="module")
def ingested(client, zoo_dir, decodes):
    """Index the zoo folder once (traced); the job, the indexed names and the traced peak."""
    decodes.names.clear()
    tracemalloc.start()
    try:
        resp = client.post("/ingest", json={"path": str(zoo_dir)})
        assert resp.status_code == 202, resp.text
        job = wait_job(client, resp.json()["id"], timeout=300.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    items = client.get("/items", params={"limit": 1000}).json()["items"]
    indexed = {Path(i["uri"]).name for i in items if i.get("uri")}
    return {"job": job, "indexed": indexed, "peak": peak, "decoded": list(decodes.names)}


def test_ingest_finishes_and_reports_per_item(ingested):
    job = ingested["job"]
    assert job["status"] == "done", job
    assert job["failed"] == len(job["errors"])
    assert all(e["error"] for e in job["errors"]), job["errors"]


@pytest.mark.parametrize("case", CASES, ids=[c.name[:40] for c in CASES])
def test_ingest_of_each_case(ingested, case):
    errors = {os.path.basename(e["path"]): e["error"] for e in ingested["job"]["errors"]}
    if case.bad:
        assert case.name not in ingested["indexed"], f"{case.why}: indexed"
        assert case.name in errors, f"{case.why}: no per-item error (errors: {sorted(errors)})"
    else:
        assert case.name in ingested["indexed"], f"{case.why}: not indexed ({errors.get(case.name)})"
    if case.expect == "refused":
        assert not any(os.path.basename(n) == case.name for n in ingested["decoded"]), (
            f"{case.why}: decoded before it was refused"
        )


def test_ingest_memory_stays_bounded(ingested):
    assert ingested["peak"] < PEAK_BYTES, f"traced peak {ingested['peak'] / 2**20:.0f} MB"


def _upload(client, url: str, case: zoo.Case, zoo_dir: Path, decodes: DecodeLog):
    decodes.names.clear()
    data = (zoo_dir / case.name).read_bytes()
    resp = client.post(url, files={"file": (case.name, data, zoo.upload_content_type(case))})
    return resp, list(decodes.names)


@pytest.mark.parametrize("case", UPLOADS, ids=[c.name[:40] for c in UPLOADS])
def test_post_items_with_each_case(client, zoo_dir, decodes, case):
    resp, decoded = _upload(client, "/items", case, zoo_dir, decodes)
    if case.bad:
        assert clear_error(resp) is None, f"{case.why}: {clear_error(resp)}"
    else:
        assert resp.status_code == 201, resp.text
    if case.expect == "refused":
        assert not decoded, f"{case.why}: the decoder ran on {decoded}"


@pytest.mark.parametrize("case", UPLOADS, ids=[c.name[:40] for c in UPLOADS])
def test_search_upload_with_each_case(client, zoo_dir, decodes, case):
    resp, decoded = _upload(client, "/search/upload", case, zoo_dir, decodes)
    if case.bad:
        assert clear_error(resp) is None, f"{case.why}: {clear_error(resp)}"
    else:
        assert resp.status_code == 200, resp.text
    if case.expect == "refused":
        assert not decoded, f"{case.why}: the decoder ran on {decoded}"
