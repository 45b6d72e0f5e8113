"""REST service round trips on the fixture folder (TestClient, one app per module)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, SOUNDS, TEXTS, image_bytes, wait_job, wav_bytes
from fastapi.testclient import TestClient

from service.app import create_app
from service.schemas import SearchResponse
from service.settings import Settings

N_GOOD = len(IMAGES) + len(SOUNDS) + len(TEXTS)


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, media_root) -> Settings:
    return Settings(
        collection=tmp_path_factory.mktemp("svc") / "coll",
        allowed_roots=[media_root],
        max_upload_mb=0.25,
    )


@pytest.fixture(scope="module")
def client(settings, embedder, media_root):
    with TestClient(create_app(settings, embedder=embedder)) as c:
        resp = c.post("/ingest", json={"path": str(media_root), "tags": ["fixture"]})
        assert resp.status_code == 202, resp.text
        job = wait_job(c, resp.json()["id"])
        assert job["status"] == "done", job
        c.ingest_job = job
        yield c


def ids_by_name(client: TestClient) -> dict[str, int]:
    items = client.get("/items", params={"limit": 1000}).json()["items"]
    return {Path(i["uri"]).name: i["id"] for i in items if i["uri"]}


def test_ingest_job_reports_progress_and_per_item_errors(client):
    job = client.ingest_job
    assert job["added"] == N_GOOD
    assert job["done"] == job["total"] >= N_GOOD
    failed = {Path(e["path"]).name for e in job["errors"]}
    assert {"broken.png", "empty.wav"} <= failed
    assert job["failed"] == len(job["errors"])
    stats = client.get("/stats").json()
    assert stats["count"] == N_GOOD
    assert stats["by_modality"] == {"text": len(TEXTS), "image": len(IMAGES), "audio": len(SOUNDS)}


def test_health_and_openapi(client, embedder):
    h = client.get("/health").json()
    assert h == {"status": "ok", "model": embedder.model_id, "dim": embedder.dim, "items": N_GOOD}
    spec = client.get("/openapi.json").json()
    for path in (
        "/search",
        "/search/upload",
        "/items",
        "/items/{item_id}/media",
        "/ingest",
        "/jobs/{job_id}",
    ):
        assert path in spec["paths"]
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    search_request = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"query", "item_id", "vector", "k", "filters"} <= set(search_request["properties"])
    filters_ref = search_request["properties"]["filters"]["anyOf"][0]["$ref"]
    assert filters_ref.rsplit("/", 1)[1] in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_text_search_filters_modality_and_tags(client):
    resp = client.post("/search", json={"query": TEXTS["cats.txt"], "k": 5})
    body = resp.json()
    assert resp.status_code == 200 and body["query"] == {"type": "text", "value": TEXTS["cats.txt"]}
    assert Path(body["results"][0]["uri"]).name == "cats.txt"  # the identical text ranks first
    SearchResponse.model_validate(body)  # the documented response model
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5

    images = client.post("/search", json={"query": "a red circle", "modalities": ["image"], "k": 10}).json()
    assert len(images["results"]) == len(IMAGES)
    assert {r["modality"] for r in images["results"]} == {"image"}
    first = images["results"][0]
    assert first["media_url"] == f"/items/{first['id']}/media" and first["thumbnail_url"]
    assert first["width"] == 64 and first["height"] == 48 and "fixture" in first["tags"]

    none = client.post("/search", json={"query": "x", "filters": {"tags": ["no-such-tag"]}}).json()
    assert none["results"] == []
    sounds_dir = str(Path(first["uri"]).parent.parent / "sounds")
    audio = client.post("/search", json={"query": "tone", "filters": {"path_prefix": sounds_dir}}).json()
    assert {r["modality"] for r in audio["results"]} == {"audio"} and len(audio["results"]) == len(SOUNDS)
    later = client.post("/search", json={"query": "x", "filters": {"since": time.time() + 3600}}).json()
    assert later["results"] == []
    earlier = client.post("/search", json={"query": "x", "filters": {"until": "2001-01-01T00:00:00Z"}}).json()
    assert earlier["results"] == []


def test_paging_with_offset(client):
    full = client.post("/search", json={"query": "ocean", "k": 6}).json()["results"]
    page2 = client.post("/search", json={"query": "ocean", "k": 3, "offset": 3}).json()["results"]
    assert [r["id"] for r in page2] == [r["id"] for r in full[3:6]]


def test_more_like_this_excludes_the_item(client):
    ids = ids_by_name(client)
    target = ids["red_circle.png"]
    results = client.post("/search", json={"item_id": target, "k": 20}).json()["results"]
    assert target not in [r["id"] for r in results] and len(results) == N_GOOD - 1
    assert_error(client.post("/search", json={"item_id": 999_999_999}), 404, "not_found")


def test_search_by_vector_and_upload(client, embedder, media_root):
    path = media_root / "images" / "blue_square.jpg"
    vec = embedder.encode_image([str(path)])[0]
    by_vec = client.post("/search", json={"vector": vec.tolist(), "k": 1}).json()["results"]
    assert Path(by_vec[0]["uri"]).name == "blue_square.jpg" and by_vec[0]["score"] == pytest.approx(
        1.0, abs=1e-4
    )

    with open(path, "rb") as fh:
        resp = client.post("/search/upload", files={"file": ("q.jpg", fh, "image/jpeg")}, data={"k": "2"})
    body = resp.json()
    assert resp.status_code == 200 and body["query"] == {"type": "image", "value": "q.jpg"}
    assert Path(body["results"][0]["uri"]).name == "blue_square.jpg"

    with open(media_root / "sounds" / "tone_mid.wav", "rb") as fh:
        files = {"file": ("q.wav", fh, "audio/wav")}
        resp = client.post("/search/upload", files=files, data={"modalities": "audio", "k": "3"})
    results = resp.json()["results"]
    assert resp.status_code == 200 and Path(results[0]["uri"]).name == "tone_mid.wav"
    assert {r["modality"] for r in results} == {"audio"}
    assert_error(client.post("/search", json={"vector": [0.1, 0.2]}), 422, "validation_error")


def test_add_get_media_range_thumbnail_delete(client, settings):
    data = image_bytes((10, 200, 200), "square")
    resp = client.post(
        "/items",
        files={"file": ("cyan.png", data, "image/png")},
        data={"caption": "a cyan square", "tags": "upload,cyan"},
    )
    assert resp.status_code == 201, resp.text
    item = resp.json()
    assert item["modality"] == "image" and item["caption"] == "a cyan square"
    assert set(item["tags"]) >= {"upload", "cyan"}
    stored = Path(item["uri"])
    assert stored.parent == settings.media_path and stored.read_bytes() == data

    got = client.get(f"/items/{item['id']}").json()
    assert got["id"] == item["id"] and got["sha256"] == item["sha256"]
    media = client.get(item["media_url"])
    assert media.status_code == 200 and media.content == data
    part = client.get(item["media_url"], headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"

    thumb = client.get(item["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:2] == b"\xff\xd8"
    assert list(settings.thumbnail_path.glob(f"{item['id']}-*.jpg"))  # cached on disk

    hits = client.post("/search", json={"query": "cyan", "filters": {"tags": ["cyan"]}}).json()["results"]
    assert [h["id"] for h in hits] == [item["id"]]
    assert client.delete(f"/items/{item['id']}").json() == {"deleted": item["id"]}
    hits = client.post("/search", json={"query": "cyan", "filters": {"tags": ["cyan"]}}).json()["results"]
    assert hits == []
    assert not stored.exists() and not list(settings.thumbnail_path.glob(f"{item['id']}-*.jpg"))
    assert_error(client.get(f"/items/{item['id']}"), 404, "not_found")
    assert_error(client.delete(f"/items/{item['id']}"), 404, "not_found")


def test_text_items_and_listing(client):
    resp = client.post("/items", data={"text": "volcanoes erupt with lava", "tags": "geo"})
    assert resp.status_code == 201, resp.text
    item = resp.json()
    assert item["modality"] == "text" and item["media_url"] is None
    resp = client.post("/items/text", json={"text": "glaciers are slow rivers of ice", "tags": ["geo"]})
    assert resp.status_code == 201
    hits = client.post("/search", json={"query": "volcanoes erupt with lava", "k": 1}).json()["results"]
    assert hits[0]["id"] == item["id"]
    assert_error(client.get(f"/items/{item['id']}/media"), 404)
    assert_error(client.get(f"/items/{item['id']}/thumbnail"), 404)

    page = client.get("/items", params={"modality": "text", "limit": 2, "offset": 0}).json()
    assert page["total"] == len(TEXTS) + 2 and len(page["items"]) == 2
    rest = client.get("/items", params={"modality": "text", "limit": 10, "offset": 2}).json()
    assert {i["id"] for i in page["items"]}.isdisjoint(i["id"] for i in rest["items"])
    for i in (item["id"], resp.json()["id"]):
        assert client.delete(f"/items/{i}").status_code == 200


def test_bad_input_status_codes(client, settings):
    before = client.get("/stats").json()["count"]
    media_before = sorted(p.name for p in settings.media_path.iterdir())

    big = b"\x00" * (settings.max_upload_bytes + 1024)
    assert_error(
        client.post("/items", files={"file": ("big.png", big, "image/png")}), 413, "payload_too_large"
    )
    assert_error(client.post("/search/upload", files={"file": ("big.wav", big, "audio/wav")}), 413)
    assert_error(client.post("/items", files={"file": ("doc.pdf", b"%PDF-1.4", "application/pdf")}), 415)
    assert_error(client.post("/search/upload", files={"file": ("x.zip", b"PK..", "application/zip")}), 415)
    corrupt = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
    assert_error(
        client.post("/items", files={"file": ("bad.png", corrupt, "image/png")}), 422, "invalid_media"
    )
    assert_error(client.post("/search/upload", files={"file": ("bad.png", corrupt, "image/png")}), 422)
    assert_error(client.post("/items", files={"file": ("empty.wav", b"", "audio/wav")}), 422)
    assert_error(client.post("/items", files={"file": ("bad.wav", b"RIFF1234WAVEjunk", "audio/wav")}), 422)

    assert_error(client.post("/search", json={"query": "x", "k": 0}), 422, "validation_error")
    assert_error(client.post("/search", json={"query": "x", "k": 101}), 422)
    assert_error(client.post("/search", json={"k": 3}), 422)
    assert_error(client.post("/search", json={"query": "x", "modalities": ["video"]}), 422)
    assert_error(client.post("/search", json={"query": "x", "filters": {"since": "yesterday"}}), 422)
    # /search parses its body in one pass (service.body): malformed JSON and wrong types are 422s too,
    # and the error names the field
    json_type = {"content-type": "application/json"}
    bad_json = client.post("/search", content=b'{"query": "x", "k": ', headers=json_type)
    assert_error(bad_json, 422, "validation_error")
    wrong_type = client.post("/search", json={"query": "x", "k": "many"})
    assert_error(wrong_type, 422, "validation_error")
    assert wrong_type.json()["error"]["message"].startswith("k:")
    assert_error(
        client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert_error(client.post("/items", data={}), 422)
    assert_error(client.get("/items/abc"), 422)
    assert_error(client.get("/items/123456789"), 404, "not_found")
    assert_error(client.get("/jobs/nope"), 404)
    assert_error(client.get("/no/such/route"), 404)

    # nothing stored by any failed request
    assert client.get("/stats").json()["count"] == before
    assert sorted(p.name for p in settings.media_path.iterdir()) == media_before


def test_chunked_upload_is_cut_off_while_reading(client, settings):
    """No Content-Length (chunked): still a JSON 413 and nothing stored."""
    boundary = "xyzzy"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(64):  # 64 x 64 KiB = 4 MiB, far past the 0.25 MB limit
            yield b"\x00" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    before = client.get("/stats").json()["count"]
    assert_error(client.post("/items", content=body(), headers=headers), 413, "payload_too_large")
    assert client.get("/stats").json()["count"] == before


def test_body_limit_stops_reading_early():
    """At the ASGI level: the app stops pulling body chunks once the limit is passed."""
    import asyncio

    from starlette.requests import Request

    from service.limits import BodyLimitMiddleware

    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": pulled < 100}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        await Request(scope, receive).body()

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=5000)(scope, receive, send))
    assert pulled == 6 and sent[0]["status"] == 413
    assert b'"payload_too_large"' in sent[1]["body"]


def test_ingest_outside_allowed_roots_is_forbidden(client, media_root, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert_error(client.post("/ingest", json={"path": str(outside)}), 403, "forbidden")
    escape = f"{media_root}/images/../../{outside.parent.name}/{outside.name}"
    assert_error(client.post("/ingest", json={"path": escape}), 403)
    link = media_root / "sneaky_link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert_error(client.post("/ingest", json={"path": str(link)}), 403)
    finally:
        link.unlink()
    assert_error(client.post("/ingest", json={"path": "images"}), 422)
    assert_error(client.post("/ingest", json={"path": str(media_root / "missing")}), 404)


def test_metrics_histogram_and_gauges(client):
    client.post("/search", json={"query": "metrics", "k": 1})
    text = client.get("/metrics").text
    assert "mm_http_request_duration_seconds_bucket" in text
    assert 'route="/search"' in text and 'status="200"' in text
    assert 'route="/items/{item_id}"' in text  # the template, not the raw path
    assert f'mm_items{{modality="image"}} {float(len(IMAGES))}' in text
    size = [ln for ln in text.splitlines() if ln.startswith("mm_index_size_bytes ")]
    on_disk = client.app.state.collection.stats()["bytes"]
    assert on_disk > 0 and size and float(size[0].split()[1]) == on_disk


def test_api_keys(tmp_path, embedder):
    settings = Settings(collection=tmp_path / "c", api_keys=["s3cret", "other"])
    with TestClient(create_app(settings, embedder=embedder)) as c:
        assert c.get("/health").status_code == 200
        assert_error(c.post("/search", json={"query": "x"}), 401, "unauthorized")
        assert_error(c.get("/items"), 401)
        assert_error(c.get("/metrics"), 401)
        assert_error(c.get("/items", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/items", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/stats", headers={"X-API-Key": "other"}).status_code == 200


def test_restart_keeps_everything(tmp_path, embedder):
    settings = Settings(collection=tmp_path / "c")
    with TestClient(create_app(settings, embedder=embedder)) as c:
        img = c.post("/items", files={"file": ("a.png", image_bytes((90, 10, 160)), "image/png")}).json()
        snd = c.post(
            "/items", files={"file": ("a.wav", wav_bytes(330.0), "audio/wav")}, data={"tags": "t"}
        ).json()
        txt = c.post("/items/text", json={"text": "persistent words"}).json()
    with TestClient(create_app(Settings(collection=tmp_path / "c"), embedder=embedder)) as c:
        assert c.get("/stats").json()["count"] == 3
        for item in (img, snd, txt):
            assert c.get(f"/items/{item['id']}").json() == item
        assert (
            c.post("/search", json={"query": "persistent words", "k": 1}).json()["results"][0]["id"]
            == txt["id"]
        )
        res = c.post("/search", json={"item_id": img["id"], "k": 5, "modalities": ["audio"]}).json()[
            "results"
        ]
        assert [r["id"] for r in res] == [snd["id"]]
        assert c.get(snd["media_url"]).content == wav_bytes(330.0)


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MM_COLLECTION", str(tmp_path))
    monkeypatch.setenv("MM_API_KEYS", "a, b")
    monkeypatch.setenv("MM_ALLOWED_ROOTS", '["/data", "/srv"]')
    monkeypatch.setenv("MM_MAX_UPLOAD_MB", "2")
    s = Settings()
    assert s.collection == tmp_path and s.api_keys == ["a", "b"]
    assert s.allowed_roots == [Path("/data"), Path("/srv")] and s.max_upload_bytes == 2 * 1024 * 1024
    assert s.media_path == tmp_path / "media"
    assert np.isclose(Settings(max_upload_mb=0.5).max_upload_bytes, 524288)


def test_the_server_searches_with_the_faiss_threads_it_was_given(tmp_path, embedder):
    """OpenMP keeps the thread count per thread: every thread that searches must end up with the setting."""
    import threading

    import faiss

    from index import vectors

    seen = {}

    def search_from_a_new_thread(c: TestClient, name: str) -> None:
        def run():
            c.app.state.collection.search(np.ones(embedder.dim, np.float32), k=1)  # a thread pool's search
            seen[name] = faiss.omp_get_max_threads()

        t = threading.Thread(target=run)
        t.start()
        t.join()

    try:
        with TestClient(create_app(Settings(collection=tmp_path / "c"), embedder=embedder)) as c:
            c.post("/items/text", json={"text": "one item"})
            search_from_a_new_thread(c, "default")
        two = Settings(collection=tmp_path / "c", search_threads=2)
        with TestClient(create_app(two, embedder=embedder)) as c:
            search_from_a_new_thread(c, "two")
    finally:
        vectors.set_search_threads(None)
    assert seen == {"default": 1, "two": 2}
