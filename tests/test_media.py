"""mm.media: decoding generated images and sounds, and a MediaError of the right kind for each bad input."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from media_headers import png_header, sparse, wav_header
from PIL import Image

from mm.errors import MediaError
from mm.media import load_audio, load_image, modality_of, probe, read_text

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _two_halves(w: int = 40, h: int = 20) -> Image.Image:
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(Image.new("RGB", (w // 2, h), RED), (0, 0))  # left half red
    return img


def _expect(kind: str, fn, *args, name: str | None = None, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.kind == kind, f"expected kind {kind!r}, got {err.kind!r}: {err}"
    assert "\n" not in str(err)
    if name is not None:
        assert name in str(err)
    return err


def _sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spec) * rate / len(wave))


# ------------------------------------------------------------------------------------------ images


def test_modality_of():
    assert modality_of("a/B.JPG") == "image"
    assert modality_of("x.flac") == "audio"
    assert modality_of("notes.md") == "text"
    assert modality_of("x.tiff") is None


def test_an_upload_named_by_its_type_gets_a_suffix_of_that_modality():
    """The MIME table (mm.media, beside the suffix tables) names only suffixes the sniffer takes as the
    type's own modality, so an upload called ``blob`` is stored under a name ingest reads back."""
    from mm.media import MIME_SUFFIX
    from service.store import safe_suffix

    assert MIME_SUFFIX
    for mime, suffix in MIME_SUFFIX.items():
        assert modality_of("blob" + suffix) == mime.split("/")[0], mime
        assert safe_suffix("blob", mime.upper() + "; charset=binary") == suffix
    assert safe_suffix("clip.OGG", "image/png") == ".ogg"  # a usable suffix of its own wins
    assert safe_suffix("blob", "application/zip") == ""


def test_png_alpha_is_composited_onto_white(tmp_path):
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue -> light blue
    path = tmp_path / "alpha.png"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((3, 1)) == WHITE
    r, g, b = out.getpixel((1, 0))
    assert 120 <= r <= 135 and 120 <= g <= 135 and b == 255


def test_jpeg_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    _two_halves().save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # width and height swapped
    top, bottom = out.getpixel((10, 3)), out.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_first_frame_and_transparency_is_white(tmp_path):
    frames = [Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 2)]
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    for f in frames:
        f.putpalette(palette)
    frames[0].putpixel((0, 0), 0)  # index 0 is transparent
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], transparency=0, duration=50, loop=0)
    out = load_image(path)
    assert out.getpixel((4, 4)) == RED  # first frame, not the blue second one
    assert out.getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "PNG", "JPEG"])
def test_formats_decode_from_path_and_bytes(tmp_path, fmt):
    img = _two_halves().convert("L") if fmt == "BMP" else _two_halves()  # also exercises mode conversion
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt)
    for src in (path, str(path), path.read_bytes()):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (40, 20)
    assert load_image(img).size == (40, 20)


def test_format_is_checked_on_content_not_extension(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    _two_halves().save(path, format="PNG")
    assert load_image(path).getpixel((0, 0)) == RED


def test_bad_images_raise_media_error(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _expect("empty", load_image, empty, name="empty.png")
    _expect("empty", load_image, b"")

    png = io.BytesIO()
    _two_halves(64, 64).save(png, format="PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    _expect("corrupt", load_image, tmp_path / "cut.png", name="cut.png")
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpg, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) * 2 // 3])
    _expect("corrupt", load_image, tmp_path / "cut.jpg", name="cut.jpg")
    (tmp_path / "bad_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    _expect("corrupt", load_image, tmp_path / "bad_header.png")

    rng = np.random.default_rng(0)
    (tmp_path / "noise.png").write_bytes(b"\x00" + rng.bytes(1000))
    _expect("unsupported", load_image, tmp_path / "noise.png", name="noise.png")
    (tmp_path / "notes.png").write_text("just some text renamed to .png\n")
    _expect("unsupported", load_image, tmp_path / "notes.png")
    _two_halves().save(tmp_path / "pic.tiff", format="TIFF")
    err = _expect("unsupported", load_image, tmp_path / "pic.tiff", name="pic.tiff")
    assert "TIFF" in str(err)

    _expect("too_large", load_image, png.getvalue(), max_pixels=64 * 64 - 1)
    # A header that claims 100000 x 100000 pixels: refused before any pixel is decoded.
    _expect("too_large", load_image, png_header(100_000, 100_000))
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_probe_image_and_text(tmp_path):
    _two_halves().save(tmp_path / "a.webp")
    assert probe(tmp_path / "a.webp") == {
        "modality": "image",
        "mime": "image/webp",
        "width": 40,
        "height": 20,
    }
    (tmp_path / "t.md").write_text("# hi\n")
    assert probe(tmp_path / "t.md")["mime"] == "text/markdown"
    (tmp_path / "x.tiff").write_bytes(b"II*\x00")
    _expect("unsupported", probe, tmp_path / "x.tiff")
    (tmp_path / "fake.png").write_text("hello")
    _expect("unsupported", probe, tmp_path / "fake.png")


def test_read_text(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffhéllo".encode())
    assert read_text(p) == "héllo"
    p.write_bytes(b"\xff\xfe bad")
    _expect("corrupt", read_text, p, name="a.txt")
    p.write_text("x" * 100)
    _expect("too_large", read_text, p, max_bytes=10)
    p.write_bytes(b"")
    _expect("empty", read_text, p)


# ------------------------------------------------------------------------------------------- audio


def test_stereo_44k_wav_becomes_mono_16k(tmp_path):
    import soundfile as sf

    left = _sine(440.0, 1.0, 44100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # (n, 2)
    sf.write(tmp_path / "st.wav", stereo, 44100)
    out = load_audio(tmp_path / "st.wav", target_rate=16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 1
    assert abs(_peak_hz(out, 16000) - 440.0) < 3.0
    assert 0.22 < np.abs(out[100:-100]).max() < 0.28  # mean of the channels halves the amplitude


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg"), ("WAV", "wav"), ("MP3", "mp3")])
def test_audio_formats(tmp_path, fmt, ext):
    import soundfile as sf

    path = tmp_path / f"s.{ext}"
    sf.write(path, _sine(1000.0, 0.5, 22050), 22050, format=fmt)
    for src in (path, path.read_bytes()):
        out = load_audio(src, target_rate=16000)
        assert abs(len(out) - 8000) <= 2
        assert abs(_peak_hz(out, 16000) - 1000.0) < 5.0
    info = probe(path)
    assert info["modality"] == "audio" and info["sample_rate"] == 22050
    assert abs(info["duration"] - 0.5) < 1e-3


def test_waveform_tuples_and_centre_crop(tmp_path):
    import soundfile as sf
    import torch

    ramp = np.linspace(0, 1, 3000, dtype=np.float32)
    out = load_audio((torch.from_numpy(ramp), 1000), target_rate=1000, crop_seconds=1.0)
    assert len(out) == 1000 and out[0] == pytest.approx(ramp[1000])
    sf.write(tmp_path / "ramp.wav", ramp, 1000, subtype="FLOAT")
    from_file = load_audio(tmp_path / "ramp.wav", target_rate=1000, crop_seconds=1.0)
    np.testing.assert_allclose(from_file, out)
    both = np.stack([ramp, -ramp])  # (channels, samples) -> silence
    assert np.abs(load_audio((both, 1000), target_rate=1000)).max() == 0.0
    assert len(load_audio((both.T, 1000), target_rate=1000)) == 3000  # (samples, channels) also works


def test_bad_audio_raises_media_error(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "long.wav", np.zeros(16000, np.float32), 16000)
    _expect("too_large", load_audio, tmp_path / "long.wav", max_seconds=0.5, name="long.wav")
    _expect("too_large", load_audio, (np.zeros(16000, np.float32), 16000), max_seconds=0.5)
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    _expect("empty", load_audio, tmp_path / "zero.wav", name="zero.wav")
    _expect("empty", load_audio, (np.zeros(0, np.float32), 16000))
    (tmp_path / "empty.flac").write_bytes(b"")
    _expect("empty", load_audio, tmp_path / "empty.flac")
    rng = np.random.default_rng(1)
    (tmp_path / "noise.wav").write_bytes(b"\x00" + rng.bytes(2000))
    _expect("unsupported", load_audio, tmp_path / "noise.wav", name="noise.wav")
    (tmp_path / "text.ogg").write_text("not audio at all")
    _expect("unsupported", probe, tmp_path / "text.ogg")
    _expect("corrupt", load_audio, (np.array([0.0, np.nan], np.float32), 16000))
    flac = (tmp_path / "s.flac").as_posix()
    sf.write(flac, _sine(300.0, 0.5, 16000), 16000)
    Path(flac).write_bytes(Path(flac).read_bytes()[:60])  # header cut in the middle
    _expect("corrupt", load_audio, flac)


# ------------------------------------------------------------------- limits from the header (issue 18)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if Pillow decodes pixels or libsndfile reads samples."""
    import soundfile as sf
    from PIL import ImageFile

    def refuse(*args, **kwargs):
        raise AssertionError("the decoder was reached")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(sf.SoundFile, "read", refuse)


def test_bombs_and_huge_files_are_refused_from_the_header(tmp_path, no_decoding, monkeypatch):
    from mm.media import MAX_MEDIA_BYTES, MediaInfo, MediaReader, sniff

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(13_000, 13_000))  # 169 M pixels: 0.5 GB once decoded
    err = _expect("too_large", sniff, bomb, name="bomb.png")
    assert "13000x13000" in str(err)
    _expect("too_large", load_image, bomb, name="bomb.png")
    told = MediaInfo("image", "image/png", 0)  # decode checks the bytes again, whatever it is told
    _expect("too_large", MediaReader().decode, bomb.read_bytes(), told, "bomb.png", name="bomb.png")

    hour = sparse(tmp_path / "hour.wav", wav_header(8000 * 3600), 44 + 8000 * 3600)
    err = _expect("too_large", sniff, hour, name="hour.wav")
    assert "3600.0 s > 600 s" in str(err)
    _expect("too_large", load_audio, hour, name="hour.wav")

    # A 500 MB "image" is refused by its size before it is opened at all.
    big = sparse(tmp_path / "big.png", png_header(64, 64), 500 * (1 << 20))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    err = _expect("too_large", sniff, big, name="big.png")
    assert f"> {MAX_MEDIA_BYTES} bytes" in str(err)
    _expect("too_large", load_image, big)
    _expect("too_large", load_audio, big)
    assert str(big) not in opened


def test_small_lying_and_nul_files_get_one_line_errors(tmp_path):
    import soundfile as sf

    from mm.media import sniff

    (tmp_path / "silent.mp3").write_bytes(b"")
    err = _expect("empty", sniff, tmp_path / "silent.mp3", name="silent.mp3")
    assert "empty" in str(err) and "exist" not in str(err)
    _expect("empty", load_audio, tmp_path / "silent.mp3", name="silent.mp3")

    buf = io.BytesIO()
    sf.write(buf, np.zeros(28, np.int16), 16000, format="WAV", subtype="PCM_16")
    assert len(buf.getvalue()) == 100
    (tmp_path / "tiny.wav").write_bytes(buf.getvalue())
    err = _expect("empty", sniff, tmp_path / "tiny.wav", name="tiny.wav")
    assert "too short" in str(err)

    buf = io.BytesIO()
    sf.write(buf, _sine(440.0, 1.0, 16000), 16000, format="WAV", subtype="PCM_16")
    lying = bytearray(buf.getvalue())
    lying[40:44] = struct.pack("<I", 16000 * 2 * 3600)  # the data chunk claims an hour
    (tmp_path / "lying.wav").write_bytes(bytes(lying))
    err = _expect("corrupt", sniff, tmp_path / "lying.wav", name="lying.wav")
    assert "declares" in str(err)
    # the same sound with an honest header passes
    assert sniff(buf.getvalue(), "ok.wav", "audio").duration == pytest.approx(1.0)

    for name in ("nul.wav", "nul.png", "nul.mp3", "nul.txt"):
        (tmp_path / name).write_bytes(b"\x00" * 4096)
        err = _expect("unsupported", sniff, tmp_path / name, name=name)
    _expect("unsupported", read_text, tmp_path / "nul.txt")


def test_messages_name_the_source_not_temp_paths_or_object_reprs(tmp_path):
    from mm.media import MediaReader, sniff

    secret = tmp_path / "server-only" / "mm-query-abc123.png"
    secret.parent.mkdir()
    cut = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(cut, format="PNG")
    secret.write_bytes(cut.getvalue()[: len(cut.getvalue()) // 2])
    flac = secret.with_suffix(".flac")
    flac.write_bytes(b"fLaC" + b"\x01" * 64)
    reader = MediaReader()
    for fn in (
        lambda: reader.decode(secret, sniff(secret, "holiday.png"), "holiday.png"),
        lambda: load_image(secret.read_bytes(), name="holiday.png"),
        lambda: load_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10),
        lambda: load_audio(b"RIFF" + b"\x00" * 100),
        lambda: load_audio(flac, name="a.flac"),
    ):
        with pytest.raises(MediaError) as info:
            fn()
        message = str(info.value)
        assert str(tmp_path) not in message and "object at 0x" not in message and "\n" not in message, message


# ----------------------------------------------------------------------- text: stored, embedded, shown


def test_text_is_bounded_at_the_read(tmp_path, monkeypatch):
    from mm.media import MAX_TEXT_BYTES, read_caption, sniff

    huge = sparse(tmp_path / "huge.txt", b"words " * 10, 50_000_000)
    reads = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or b"")
    _expect("too_large", sniff, huge, name="huge.txt")
    err = _expect("too_large", read_text, huge, name="huge.txt")
    assert f"> {MAX_TEXT_BYTES} bytes" in str(err) and not reads

    (tmp_path / "ok.md").write_text("# héllo\n" * 1000)
    assert read_text(tmp_path / "ok.md") == "# héllo\n" * 1000
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    _expect("empty", read_text, tmp_path / "blank.txt")

    # A sidecar caption never blocks its media file: read up to the limit, NULs and bad bytes dropped.
    cap = tmp_path / "cap.txt"
    cap.write_bytes(b"a red\x00 circle \xff" + b"x" * (2 * MAX_TEXT_BYTES))
    got = read_caption(cap)
    assert got.startswith("a red circle \ufffd") and len(got.encode()) <= MAX_TEXT_BYTES + 3


def test_text_as_embedded_and_as_shown():
    from mm.media import MAX_EMBED_CHARS, SNIPPET_CHARS, text_for_embedding, text_snippet

    long = "word " * 300_000  # 1.5 MB
    assert text_for_embedding(long) == long[:MAX_EMBED_CHARS]
    assert text_for_embedding("short") == "short"
    snip = text_snippet(long)
    assert len(snip) <= SNIPPET_CHARS and snip.endswith("…") and long.startswith(snip[:-1])
    assert text_snippet("a frog") == "a frog" and text_snippet(None) == ""


def test_tokenizer_sees_only_what_the_embedding_needs():
    from mm.media import MAX_EMBED_CHARS
    from mm.model import create_model

    emb = create_model("tiny")
    enc = emb.model.encoders["text"]
    seen: list[int] = []
    tokenize = enc.tokenizer

    def spy(texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return tokenize(texts, *args, **kwargs)

    enc._tokenizer = spy
    long = "a red circle on white paper " * 40_000  # ~1.1 M characters
    vec = emb.encode_text([long, "a red circle"])
    assert seen and max(seen) <= MAX_EMBED_CHARS
    np.testing.assert_allclose(vec[0], emb.encode_text([long[:MAX_EMBED_CHARS]])[0], atol=1e-6)


# ---------------------------------------------------------------------------------- the reader


def test_reader_decodes_audio_as_the_encoder_would(tmp_path):
    import soundfile as sf

    from mm.media import MediaReader

    sf.write(tmp_path / "s.flac", _sine(440.0, 3.0, 22050), 22050)
    reader = MediaReader(sample_rate=16000, crop_seconds=1.0)
    info = reader.sniff(tmp_path / "s.flac")
    assert info.modality == "audio" and info.duration == pytest.approx(3.0) and info.sample_rate == 22050
    wave, rate = reader.decode((tmp_path / "s.flac").read_bytes(), info, "s.flac")
    assert rate == 16000
    want = load_audio(tmp_path / "s.flac", target_rate=16000, crop_seconds=1.0)
    np.testing.assert_array_equal(wave, want)
    assert abs(len(wave) - 16000) <= 1
    assert reader.modality_of("x.JPG") == "image" and ".wav" in reader.media_suffixes


@pytest.mark.parametrize("fmt,ext", [("MP3", "mp3"), ("WAV", "wav")])
def test_audio_cut_short_is_corrupt_not_a_shorter_sound(tmp_path, fmt, ext):
    # An MP3 cut short keeps claiming its full length (Xing header) and libsndfile decodes what is left
    # without complaint; a cut WAV's header declares more data than the file holds.
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _sine(440.0, 2.0, 16000), 16000, format=fmt)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 10])
    err = _expect("corrupt", load_audio, cut, name=f"cut.{ext}")
    assert "declares" in str(err)
    full = tmp_path / f"full.{ext}"
    full.write_bytes(buf.getvalue())
    assert abs(len(load_audio(full, target_rate=16000)) - 32000) <= 1152


def test_wav_riff_size_off_by_a_header_still_passes(tmp_path):
    # Some writers count the RIFF header in its own size (8 bytes too many): the samples are all there.
    import soundfile as sf

    from mm.media import sniff

    buf = io.BytesIO()
    sf.write(buf, _sine(440.0, 0.5, 16000), 16000, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    data[4:8] = struct.pack("<I", len(data))  # should be len - 8
    (tmp_path / "sloppy.wav").write_bytes(bytes(data))
    assert sniff(tmp_path / "sloppy.wav").duration == pytest.approx(0.5)
    assert len(load_audio(tmp_path / "sloppy.wav", target_rate=16000)) == 8000
    data[4:8] = struct.pack("<I", len(data) + 4096)  # but not a RIFF that claims kilobytes more
    (tmp_path / "lying.wav").write_bytes(bytes(data))
    _expect("corrupt", sniff, tmp_path / "lying.wav", name="lying.wav")


def test_an_mp3_without_a_length_header_is_not_called_truncated():
    """libsndfile guesses a headerless (VBR) MP3's length from its first frame; only a Xing/Info/VBRI frame
    states it, so only then is a shortfall truncation (Scratch ships such files, all of them whole)."""
    from mm.media import _mp3_declares_length

    frame = b"\xff\xfb\x90\x64" + b"\0" * 400
    tag = b"ID3\x03\x00\x00" + bytes([0, 0, 1, 0]) + b"\0" * 128  # a 128-byte ID3v2 tag (syncsafe size)
    assert not _mp3_declares_length(frame * 3)
    assert not _mp3_declares_length(tag + frame * 3)
    assert _mp3_declares_length(tag + b"\xff\xfb\x90\x64" + b"\0" * 32 + b"Xing" + frame)
    assert _mp3_declares_length(b"\xff\xfb\x90\x64" + b"\0" * 32 + b"Info" + frame)
