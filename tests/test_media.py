"""mm.media: decoding generated images and sounds, and a MediaError of the right kind for each bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
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


def _png_header(w: int, h: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


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
    _expect("too_large", load_image, _png_header(100_000, 100_000))
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
