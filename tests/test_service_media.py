"""One decoder behind every door: ingest, ``POST /items`` and ``/search/upload`` decode alike, refuse the
same files from their headers (before any pixel is decoded), never echo a server path, and thumbnails
composite transparency on white as indexing does (issues 14.1, 17.7, 18.4, 18.10)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import encode_image, wait_job
from fastapi.testclient import TestClient
from media_headers import png_header

from service.app import create_app
from service.settings import Settings


def _photo(size=(1600, 1200)) -> bytes:
    """A large noisy JPEG: big enough that every path shrinks it before the encoder does."""
    from PIL import Image

    img = Image.effect_noise(size, 60).convert("RGB")
    img.paste((200, 30, 30), (100, 100, 900, 700))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("allowed")
    (root / "photo.jpg").write_bytes(_photo())
    settings = Settings(collection=tmp_path_factory.mktemp("svc") / "coll", allowed_roots=[root])
    with TestClient(create_app(settings, embedder=embedder)) as client:
        yield client, settings, root


def test_ingest_items_and_upload_embed_a_file_alike(served, embedder):
    client, settings, root = served
    job = wait_job(client, client.post("/ingest", json={"path": str(root)}).json()["id"])
    assert job["status"] == "done" and not job["errors"], job
    (ingested,) = [i for i in client.get("/items").json()["items"] if i["uri"].endswith("photo.jpg")]

    # The same pixels under other bytes (a comment in the JPEG), so that dedup does not answer for it.
    photo = (root / "photo.jpg").read_bytes()
    variant = photo[:2] + b"\xff\xfe\x00\x08variant" + photo[2:]
    resp = client.post("/items", files={"file": ("copy.jpg", variant, "image/jpeg")})
    assert resp.status_code == 201, resp.text
    uploaded = resp.json()
    assert uploaded["sha256"] != ingested["sha256"]

    coll = client.app.state.collection
    v_ingest, v_items = coll.vector(ingested["id"]), coll.vector(uploaded["id"])
    np.testing.assert_allclose(v_items, v_ingest, atol=1e-6)
    # what the encoder gives for the file when it decodes the path itself (the CLI, training)
    np.testing.assert_allclose(embedder.encode_image([root / "photo.jpg"])[0], v_ingest, atol=1e-6)

    resp = client.post("/search/upload", files={"file": ("q.jpg", photo, "image/jpeg")}, data={"k": "2"})
    assert resp.status_code == 200, resp.text
    scores = {r["id"]: r["score"] for r in resp.json()["results"]}
    assert scores[ingested["id"]] == pytest.approx(1.0, abs=1e-5)
    assert scores[uploaded["id"]] == pytest.approx(1.0, abs=1e-5)


def test_thumbnail_of_a_transparent_png_is_on_white(served):
    from PIL import Image

    client, _, _ = served
    sticker = Image.new("RGBA", (80, 60), (0, 0, 0, 0))  # transparent black: garbage if alpha is dropped
    sticker.paste((20, 40, 220, 255), (20, 15, 60, 45))  # an opaque blue box
    resp = client.post("/items", files={"file": ("sticker.png", encode_image(sticker), "image/png")})
    assert resp.status_code == 201, resp.text
    thumb = client.get(resp.json()["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content)).convert("RGB")
    assert img.size == (80, 60)  # never enlarged
    px = np.asarray(img, dtype=int)
    assert (px[:8, :8] > 240).all() and (px[-8:, -8:] > 240).all()  # the transparent corners are white
    assert np.abs(px[30, 40] - (20, 40, 220)).max() < 12  # the box keeps its colour


def test_bombs_are_refused_at_every_door_before_decoding(served, monkeypatch):
    from PIL import ImageFile

    def refuse(*args, **kwargs):
        raise AssertionError("the decoder was reached")

    client, settings, root = served
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    bomb = png_header(13_000, 13_000)
    for route in ("/items", "/search/upload"):
        resp = client.post(route, files={"file": ("bomb.png", bomb, "image/png")})
        assert resp.status_code == 413, resp.text
        message = resp.json()["error"]["message"]
        assert "13000x13000" in message and message.startswith("bomb.png")
    (root / "bomb_dir").mkdir()
    (root / "bomb_dir" / "bomb.png").write_bytes(bomb)
    job = wait_job(client, client.post("/ingest", json={"path": str(root / "bomb_dir")}).json()["id"])
    (err,) = job["errors"]
    assert "too large" in err["error"] and "13000x13000" in err["error"]
    assert not list(settings.media_path.glob("*.png")) or all(
        p.read_bytes() != bomb for p in settings.media_path.glob("*.png")
    )  # a refused upload leaves no file behind


@pytest.mark.parametrize(
    "name,data,status,word",
    [
        ("cut.png", None, 422, "corrupt"),
        ("silent.mp3", b"", 422, "empty"),
        ("zeros.wav", b"\x00" * 4096, 415, "not a supported audio"),
        ("tiny.wav", "tiny", 422, "too short"),
    ],
)
def test_bad_uploads_name_the_upload_never_a_server_path(served, name, data, status, word):
    import soundfile as sf
    from PIL import Image

    client, settings, _ = served
    if data is None:
        full = encode_image(Image.effect_noise((64, 64), 50).convert("RGB"))
        data = full[: len(full) // 2]
    elif data == "tiny":
        buf = io.BytesIO()
        sf.write(buf, np.zeros(28, np.int16), 16000, format="WAV", subtype="PCM_16")
        data = buf.getvalue()  # 100 bytes
    for route in ("/items", "/search/upload"):
        resp = client.post(route, files={"file": (name, data, "application/octet-stream")})
        assert resp.status_code == status, (route, resp.text)
        message = resp.json()["error"]["message"]
        assert word in message, (route, message)
        for secret in ("/tmp", str(settings.media_path), "mm-query-", "object at 0x"):
            assert secret not in message, (route, message)
    stored = [p for p in settings.media_path.glob("*") if p.is_file() and not p.name.startswith(".")]
    assert not [p for p in stored if p.read_bytes() == data]  # a refused upload leaves no file


def test_hits_carry_a_snippet_and_the_item_its_stored_text(served):
    from mm.media import SNIPPET_CHARS

    client, _, _ = served
    text = "a quiet harbour at dawn with fishing boats " * 400  # 17 kB
    resp = client.post("/items", data={"text": text, "tags": "harbour"})
    assert resp.status_code == 201, resp.text
    item_id = resp.json()["id"]
    assert client.get(f"/items/{item_id}").json()["caption"] == text
    hits = client.post("/search", json={"query": "harbour at dawn", "filters": {"tags": ["harbour"]}})
    (hit,) = hits.json()["results"]
    assert (
        hit["id"] == item_id and len(hit["caption"]) <= SNIPPET_CHARS and text.startswith(hit["caption"][:-1])
    )
