"""Ingest: folders of images / audio / text with sidecar captions and bad files, resume, single files."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import encode_image
from media_headers import png_header, sparse, wav_header

from index.collection import Collection
from index.ingest import add_text, ingest, ingest_one
from index.types import Filter
from mm.media import MediaReader

RATE = 8000


class FakeEmbedder:
    """Deterministic features (pixels / spectrum / word hashes) through a fixed projection; no model.

    An all-magenta image is "media the model rejects": a decodable file that makes the batch fail.
    """

    dim = 16
    modalities = ("text", "image", "audio")
    model_id = "fake-embedder:1"
    media = MediaReader()  # the real decoder: fakes replace the model, never the decoding

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._img = rng.standard_normal((48, self.dim)).astype(np.float32)
        self._aud = rng.standard_normal((8, self.dim)).astype(np.float32)
        self.calls = 0

    @staticmethod
    def _norm(x: np.ndarray) -> np.ndarray:
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)).astype(np.float32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.full((len(texts), self.dim), 1e-3, np.float32)
        for i, t in enumerate(texts):
            for word in t.lower().split():
                out[i, hashlib.sha256(word.encode()).digest()[0] % self.dim] += 1.0
        return self._norm(out)

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        self.calls += 1
        feats = []
        for im in images:
            px = np.asarray(im.convert("RGB").resize((4, 4)), np.float32)
            if (px == [255, 0, 255]).all():
                raise ValueError("image rejected by the model")
            feats.append(px.reshape(-1) / 255.0 - 0.5)
        return self._norm(np.stack(feats) @ self._img)

    def encode_audio(self, clips: Sequence[Any]) -> np.ndarray:
        self.calls += 1
        feats = []
        for wave, rate in clips:
            assert wave.ndim == 1 and rate == RATE
            spec = np.abs(np.fft.rfft(wave[:1024], n=1024))[:512]
            feats.append(np.log1p(spec.reshape(8, -1).sum(axis=1)))
        return self._norm(np.stack(feats) @ self._aud)


def _png(path: Path, colour: tuple[int, int, int], fmt: str | None = None) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (40, 30), colour)
    ImageDraw.Draw(im).rectangle((5, 5, 20, 20), fill=(colour[2], colour[0], colour[1]))
    im.save(path, format=fmt)


def _tone(path: Path, freq: float) -> None:
    import soundfile as sf

    t = np.arange(RATE // 4) / RATE
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), RATE)


GOOD = 10  # 5 images + 3 sounds + 2 texts


def make_folder(root: Path) -> Path:
    (root / "img" / "sub").mkdir(parents=True)
    (root / "snd").mkdir()
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        _png(root / "img" / f"p{i}.png", colour)
    _png(root / "img" / "sub" / "q.jpg", (120, 120, 10), "JPEG")
    _png(root / "img" / "sub" / "g.gif", (10, 120, 120), "GIF")
    (root / "img" / "p0.txt").write_text("A red box.\n")  # sidecar caption, not a text item
    shutil.copy(root / "img" / "p1.png", root / "img" / "sub" / "p1_copy.png")  # duplicate content
    for i, freq in enumerate([220.0, 880.0]):
        _tone(root / "snd" / f"t{i}.wav", freq)
    _tone(root / "snd" / "t2.flac", 440.0)
    (root / "snd" / "t2.txt").write_text("a middle tone")
    (root / "note.txt").write_text("hello collection world")
    (root / "readme.md").write_text("# notes about the ocean")
    (root / "ignored.xyz").write_text("not media")
    (root / ".hidden").mkdir()
    _png(root / ".hidden" / "h.png", (1, 2, 3))
    # bad: garbage PNG, garbage WAV, empty text, an image the model rejects
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    (root / "snd" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    (root / "empty.txt").write_text("   \n")
    _png_solid(root / "img" / "sub" / "rejected.png", (255, 0, 255))
    return root


def _png_solid(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16), colour).save(path)


BAD = {"broken.png", "broken.wav", "empty.txt", "rejected.png"}


@pytest.fixture
def setup(tmp_path):
    root = make_folder(tmp_path / "media")
    emb = FakeEmbedder()
    coll = Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id)
    yield root, emb, coll
    coll.close()


def test_ingest_folder_good_bad_captions_dedup_and_reingest(setup):
    root, emb, coll = setup
    progress: list[tuple[int, int]] = []
    report = ingest(
        coll,
        emb,
        [root],
        batch_size=32,
        workers=2,
        progress=False,
        tags=["demo"],
        on_progress=lambda *a: progress.append(a),
    )
    assert report.added == GOOD and report.failed == len(BAD) and report.skipped == 1  # the copy
    assert {Path(e.path).name for e in report.errors} == BAD
    assert report.seen == GOOD + len(BAD) + 1 and progress[-1] == (report.seen, report.seen)
    assert (
        coll.count() == GOOD
        and coll.count("image") == 5
        and coll.count("audio") == 3
        and coll.count("text") == 2
    )
    assert {Path(e.uri).name for e in coll.errors()} == BAD and coll.stats()["errors"] == len(BAD)
    p0 = coll.find_by_uri(str((root / "img" / "p0.png").resolve()))
    assert p0.caption == "A red box." and p0.tags == ["demo"] and (p0.width, p0.height) == (40, 30)
    assert (
        p0.mime == "image/png"
        and p0.sha256 == hashlib.sha256((root / "img" / "p0.png").read_bytes()).hexdigest()
    )
    t2 = coll.find_by_uri(str((root / "snd" / "t2.flac").resolve()))
    assert t2.caption == "a middle tone" and t2.duration == pytest.approx(0.25)
    assert coll.find_by_uri(str((root / "img" / "p0.txt").resolve())) is None
    note = coll.find_by_uri(str((root / "note.txt").resolve()))
    assert note.modality == "text" and note.caption == "hello collection world"
    hit = coll.search(emb.encode_text(["hello collection world"]), k=1, filter=Filter(modalities=["text"]))[
        0
    ][0]
    assert hit.id == note.id and hit.score == pytest.approx(1.0, abs=1e-5)
    p1 = coll.find_by_uri(str((root / "img" / "p1.png").resolve()))
    assert coll.search(coll.vector(p1.id), k=1)[0][0].id == p1.id

    calls = emb.calls
    again = ingest(coll, emb, [root], progress=False, tags=["demo"])
    assert (again.added, again.updated, again.failed) == (0, 0, 0) and again.skipped == again.seen
    assert emb.calls == calls  # nothing re-encoded

    # a changed file keeps its id; a changed sidecar only updates the caption
    _png(root / "img" / "p2.png", (90, 90, 250))
    os.utime(root / "img" / "p2.png", (1e9, 1e9))
    (root / "img" / "p0.txt").write_text("A crimson box.")
    p2_id = coll.find_by_uri(str((root / "img" / "p2.png").resolve())).id
    third = ingest(coll, emb, [root], progress=False, tags=["demo"])
    assert third.updated == 2 and third.added == 0 and coll.count() == GOOD
    assert coll.find_by_uri(str((root / "img" / "p2.png").resolve())).id == p2_id
    assert coll.get(p0.id).caption == "A crimson box."


def test_batch_failure_is_isolated_item_by_item(setup):
    root, emb, coll = setup
    report = ingest(coll, emb, [root / "img"], batch_size=64, progress=False)
    assert report.added == 5 and {Path(e.path).name for e in report.errors} == {"broken.png", "rejected.png"}
    assert any("rejected by the model" in e.error for e in report.errors)


def test_interrupted_ingest_resumes(setup, tmp_path):
    root, emb, coll = setup
    done: list[int] = []
    first = ingest(
        coll,
        emb,
        [root],
        batch_size=3,
        workers=2,
        progress=False,
        on_progress=lambda n, total: done.append(n),
        should_stop=lambda: bool(done),
    )
    assert first.seen == 3 and len(done) == 1 and coll.count() + len(coll.errors()) + first.skipped <= 3
    coll.close()  # as after a restart
    coll2 = Collection.open(tmp_path / "coll")
    rest = ingest(coll2, emb, [root], batch_size=3, progress=False)
    assert coll2.count() == GOOD and len(coll2.errors()) == len(BAD)
    assert rest.added + first.added == GOOD and rest.skipped >= first.added + first.failed
    coll2.close()


def test_crash_mid_ingest_loses_nothing_committed(setup, tmp_path, caplog):
    """Batches commit to SQLite; the FAISS file lags until the end, so a crash is repaired on open."""
    root, emb, coll = setup

    def crash(done: int, total: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt

    coll.save = lambda: None  # type: ignore[method-assign]  # the process dies before any FAISS write
    with pytest.raises(KeyboardInterrupt):
        ingest(coll, emb, [root], batch_size=3, progress=False, on_progress=crash)
    committed = coll.store.count()
    assert committed >= 3
    with caplog.at_level(logging.INFO, logger="index"):
        reopened = Collection.open(tmp_path / "coll")
    # the stale FAISS file is caught up from the change log (or, past it, rebuilt from SQLite)
    assert any(w in r.getMessage() for r in caplog.records for w in ("rebuilding", "change log"))
    assert reopened.count() == committed and reopened.stats()["ntotal"] == committed
    assert reopened.check()["ok"]
    reopened.close()


def test_ingest_one_and_add_text(setup):
    root, emb, coll = setup
    item = ingest_one(coll, emb, root / "img" / "p1.png", caption="green", tags=["upload"])
    assert item.id > 0 and item.modality == "image" and item.caption == "green" and item.tags == ["upload"]
    assert ingest_one(coll, emb, root / "img" / "p1.png").id == item.id
    assert ingest_one(coll, emb, root / "img" / "sub" / "p1_copy.png").id == item.id  # same content
    audio = ingest_one(coll, emb, root / "snd" / "t2.flac")
    assert audio.modality == "audio" and audio.caption == "a middle tone"
    for bad in ("img/broken.png", "img/sub/rejected.png", "snd/broken.wav", "ignored.xyz"):
        with pytest.raises(ValueError):
            ingest_one(coll, emb, root / bad)
    assert coll.count() == 2 and coll.errors() == []  # nothing stored for bad uploads

    t = add_text(coll, emb, "a cat on a mat", tags=["note"])
    assert t.modality == "text" and t.caption == "a cat on a mat" and t.uri == ""
    assert add_text(coll, emb, "a cat on a mat").id == t.id
    assert coll.search(emb.encode_text(["a cat on a mat"]), k=1)[0][0].id == t.id
    with pytest.raises(ValueError, match="empty"):
        add_text(coll, emb, "  ")


def test_ingest_refuses_other_embedder_and_missing_paths(setup, tmp_path):
    root, emb, coll = setup
    other = FakeEmbedder()
    other.model_id = "another-model"
    with pytest.raises(ValueError, match="another-model"):
        ingest(coll, other, [root], progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        ingest(coll, emb, [tmp_path / "nope"], progress=False)


def test_transparent_and_rotated_images_decode_as_the_embedder_was_trained():
    # Ingest hands the embedder the pixels mm.media.load_image gives (training's decoder), through the
    # embedder's reader: transparency on white, EXIF orientation applied; a plain convert("RGB") shows
    # what lies under transparent pixels instead.
    import io

    from PIL import Image

    from mm.media import load_image

    reader = FakeEmbedder.media
    rgba = Image.new("RGBA", (8, 6), (10, 200, 30, 0))  # fully transparent green
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    pal = rgba.convert("RGB").quantize(4)
    pal.info["transparency"] = bytes(255 if i == 0 else 0 for i in range(4))  # index 0 opaque only
    rotated = Image.new("RGB", (8, 6), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    for img, fmt, kw in ((rgba, "PNG", {}), (pal, "PNG", {}), (rotated, "JPEG", {"exif": exif.tobytes()})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        data = buf.getvalue()
        info = reader.sniff(data, "x", "image")
        got = reader.decode(data, info)
        want = load_image(data)
        assert (info.width, info.height) == (8, 6) and got.mode == "RGB" and got.size == want.size
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert got.size == (6, 8)  # the JPEG came back upright
    data = encode_image(rgba)
    got = reader.decode(data, reader.sniff(data, "x", "image"))
    assert got.getpixel((3, 3)) == (255, 255, 255) and got.getpixel((0, 0)) == (255, 0, 0)


# symlinks: resolved before they are trusted, and reported when they lead nowhere -------------------------
def _linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed folder whose links lead out, nowhere, in circles, and (one) to a file inside it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "secret"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    _png(allowed / "own.png", (200, 20, 20))
    _png(outside / "private.png", (20, 200, 20))
    (outside / "private.txt").write_text("the outside file's words")
    (outside / "dir").mkdir()
    _png(outside / "dir" / "deep.png", (20, 20, 200))
    (allowed / "out.png").symlink_to(outside / "private.png")  # a file outside
    (allowed / "outdir").symlink_to(outside / "dir")  # a folder outside
    (allowed / "own.txt").symlink_to(outside / "private.txt")  # own.png's caption, read from outside
    (allowed / "sub" / "again.png").symlink_to(allowed / "own.png")  # inside: fine
    (allowed / "dangling.png").symlink_to(allowed / "gone.png")
    (allowed / "sub" / "up").symlink_to(allowed)  # a folder loop
    (allowed / "self.png").symlink_to(allowed / "self.png")  # a link loop
    return allowed, outside


def test_walk_refuses_symlinks_out_of_the_allowed_roots_and_reports_each(tmp_path):
    allowed, outside = _linked_folder(tmp_path)
    emb = FakeEmbedder()
    with Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id) as coll:
        report = ingest(coll, emb, [allowed], progress=False, allowed_roots=[allowed])
        uris = {it.uri for it in coll.items(limit=100)}
        assert uris == {str((allowed / "own.png").resolve())}  # again.png is the same file
        assert coll.items()[0].caption == ""  # the caption link out was not read
        errors = {Path(e.path).name: e.error for e in report.errors}
        assert {k: v for k, v in errors.items() if "outside" in v}.keys() == {"out.png", "outdir", "own.txt"}
        assert "does not exist" in errors["dangling.png"]
        assert "loop" in errors["self.png"] and "loop" in errors["up"]
        assert all(str(outside) not in e.error for e in report.errors)  # targets are not echoed back
        assert report.failed == len(report.errors) == 6


def test_walk_without_roots_follows_links_and_still_reports_broken_ones(tmp_path):
    """`mm index` on one's own files: links anywhere are followed; dangling ones and loops are reported."""
    allowed, outside = _linked_folder(tmp_path)
    emb = FakeEmbedder()
    with Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id) as coll:
        report = ingest(coll, emb, [allowed], progress=False)
        uris = {Path(it.uri).name for it in coll.items(limit=100)}
        assert uris == {"own.png", "private.png", "deep.png"}
        assert coll.find_by_uri(str(allowed / "own.png")).caption == "the outside file's words"
        assert {Path(e.path).name for e in report.errors} == {"dangling.png", "self.png", "up"}


def test_a_pipe_in_the_folder_is_reported_and_never_opened(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the walk reports it and never reads it."""
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "real.txt").write_text("a red circle")
    os.mkfifo(folder / "pipe.png")
    (folder / "link.wav").symlink_to(folder / "pipe.png")
    emb = FakeEmbedder()
    with Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id) as coll:
        report = ingest(coll, emb, [folder], progress=False)
        assert [Path(it.uri).name for it in coll.items()] == ["real.txt"]
    errors = {Path(e.path).name: e.error for e in report.errors}
    assert errors.keys() == {"pipe.png", "link.wav"}
    assert all("not a regular file" in why for why in errors.values())


def test_post_ingest_does_not_serve_files_a_symlink_leads_out_to(tmp_path):
    from conftest import FakeEmbedder as ServiceEmbedder
    from conftest import wait_job
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    allowed, outside = _linked_folder(tmp_path)
    settings = Settings(collection=tmp_path / "coll", allowed_roots=[allowed])
    with TestClient(create_app(settings, embedder=ServiceEmbedder())) as client:
        job = wait_job(client, client.post("/ingest", json={"path": str(allowed)}).json()["id"])
        assert job["status"] == "done", job
        refused = {Path(e["path"]).name for e in job["errors"] if "outside" in e["error"]}
        assert refused == {"out.png", "outdir", "own.txt"}
        items = client.get("/items").json()["items"]
        assert [Path(it["uri"]).name for it in items] == ["own.png"]
        secret = (outside / "private.png").read_bytes()
        assert all(client.get(f"/items/{it['id']}/media").content != secret for it in items)
        assert client.post("/ingest", json={"path": str(allowed / "out.png")}).status_code == 403


# ------------------------------------------------------------------ hostile files (issue 18.4, 18.5, 18.10)


def _hostile_folder(root: Path) -> dict[str, str]:
    """Bad files -> a word their error must hold. None of them may reach a decoder."""
    import io

    import soundfile as sf

    root.mkdir()
    (root / "bomb.png").write_bytes(png_header(13_000, 13_000))
    sparse(root / "big.png", png_header(64, 64), 500 * (1 << 20))
    sparse(root / "hour.wav", wav_header(8000 * 3600), 44 + 8000 * 3600)
    (root / "silent.mp3").write_bytes(b"")
    buf = io.BytesIO()
    sf.write(buf, np.zeros(28, np.int16), 16000, format="WAV", subtype="PCM_16")
    (root / "tiny.wav").write_bytes(buf.getvalue())  # 100 bytes, 1.75 ms
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000, np.int16), 8000, format="WAV", subtype="PCM_16")
    (root / "lying.wav").write_bytes(buf.getvalue()[:4000])  # the header still says 16 kB
    (root / "zeros.txt").write_bytes(b"\x00" * 2048)
    (root / "nul.png").write_bytes(b"\x00" * 2048)
    sparse(root / "huge.txt", b"many words ", 50_000_000)
    return {
        "bomb.png": "13000x13000",
        "big.png": "too large",
        "hour.wav": "too long",
        "silent.mp3": "empty",
        "tiny.wav": "too short",
        "lying.wav": "declares",
        "zeros.txt": "NUL",
        "nul.png": "not a supported image",
        "huge.txt": "too large",
    }


def test_ingest_refuses_hostile_files_before_reading_or_decoding_them(tmp_path, monkeypatch):
    import mm.media

    bad = _hostile_folder(tmp_path / "hostile")
    _png(tmp_path / "hostile" / "fine.png", (10, 200, 30))
    decoded: list[str] = []
    read_whole: list[str] = []

    def spy(real):
        def decode(src, *args, **kwargs):  # records the name the decoder is called with
            decoded.extend(x for x in (*args, *kwargs.values()) if isinstance(x, str))
            return real(src, *args, **kwargs)

        return decode

    for fn in ("load_image", "load_audio", "read_text"):
        monkeypatch.setattr(mm.media, fn, spy(getattr(mm.media, fn)))
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read_whole.append(self.name) or real_read(self))

    emb = FakeEmbedder()
    with Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id) as coll:
        report = ingest(coll, emb, [tmp_path / "hostile"], progress=False, workers=1)
        errors = {Path(e.path).name: e.error for e in report.errors}
        assert report.added == 1 and set(errors) == set(bad), errors
        for name, word in bad.items():
            assert word in errors[name], (name, errors[name])
            assert str(tmp_path) not in errors[name] and "object at 0x" not in errors[name]
        assert set(decoded) == {"fine.png"} and set(read_whole) == {"fine.png"}, (decoded, read_whole)
        assert coll.count() == 1

        # ingest_one (POST /items) refuses them alike, with the MediaError's kind kept for the API
        from mm.errors import MediaError

        for name in ("bomb.png", "big.png", "hour.wav"):
            with pytest.raises(MediaError) as info:
                ingest_one(coll, emb, tmp_path / "hostile" / name, name="upload-" + name)
            assert info.value.kind == "too_large" and str(info.value).startswith("upload-" + name)
        assert set(decoded) == {"fine.png"} and coll.count() == 1


def test_long_text_is_stored_bounded_and_embedded(tmp_path):
    from mm.media import MAX_TEXT_BYTES

    emb = FakeEmbedder()
    seen: list[int] = []
    encode_text = emb.encode_text
    emb.encode_text = lambda texts: seen.extend(len(t) for t in texts) or encode_text(texts)
    (tmp_path / "docs").mkdir()
    text = "the quick brown fox " * 40_000  # 800 kB: under the limit, stored whole
    (tmp_path / "docs" / "long.txt").write_text(text)
    (tmp_path / "docs" / "over.txt").write_text("x" * (MAX_TEXT_BYTES + 1))
    with Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id) as coll:
        report = ingest(coll, emb, [tmp_path / "docs"], progress=False)
        assert report.added == 1 and [Path(e.path).name for e in report.errors] == ["over.txt"]
        (item,) = coll.items()
        assert item.caption == text and seen == [len(text)]  # the fake has no tokenizer to spare


def test_a_folder_deeper_than_the_recursion_limit_is_walked(tmp_path):
    """1,200 nested folders fit in PATH_MAX; the walk used to recurse once per folder, and such a tree
    failed the whole ingest with a RecursionError (issue 18: hostile folders)."""
    import sys

    from index.walk import walk

    top = tmp_path / "deep"
    top.mkdir()
    (top / "a.txt").write_text("the top note")
    levels = [top]
    try:
        for _ in range(sys.getrecursionlimit() + 200):  # os.makedirs recurses once per folder too
            (levels[-1] / "d").mkdir()
            levels.append(levels[-1] / "d")
        bottom = levels[-1]
        (bottom / "z.txt").write_text("the deepest note")
        (bottom / "up").symlink_to(top)  # a loop at the bottom is still reported
        errors: list = []
        assert walk(top, None, errors) == [top / "a.txt", bottom / "z.txt"]
        assert [Path(e.path).name for e in errors] == ["up"] and "loop" in errors[0].error
        emb = FakeEmbedder()
        with Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id) as coll:
            report = ingest(coll, emb, [top], progress=False)
            assert report.added == 2 and report.failed == 1
    finally:  # bottom up: shutil.rmtree (pytest's tmp_path cleanup) recurses once per folder as well
        for level in reversed(levels):
            for child in level.iterdir():
                if child.is_symlink() or child.is_file():
                    child.unlink()
            level.rmdir()
