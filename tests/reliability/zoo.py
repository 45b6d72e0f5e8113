"""A generated zoo of hostile and broken media files, for the reliability tests and bench_hostile.py.

Each :class:`Case` is a file (or a link) that ingest, ``POST /items`` and ``/search/upload`` must answer
with a clear per-item error or a 4xx, never a 5xx; ``expect`` says more:

- ``"refused"``: refused from what is known without decoding (size, header, magic bytes, link target): the
  pixel or sample decoder must not be reached for it.
- ``"error"``: only decoding can tell (a corrupt or truncated body): the decoder may run, and must fail
  with a clear error.
- ``"ok"``: a valid file with an awkward name: it must be accepted.

Big files are made sparse (``truncate``), never written: a "600 MB image" costs no disk and no time.
Nothing is written at import; :func:`build` writes the zoo into a folder.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16000
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}
# Bytes kept before the noise of a "corrupt" case: the format's signature only. Noise after a whole
# header can be valid data (PCM samples, a VP8 frame), which no decoder can refuse.
MAGIC = {"png": 8, "jpg": 2, "webp": 12, "gif": 6, "bmp": 2, "wav": 12, "flac": 4, "ogg": 4, "mp3": 3}
UPLOAD_MAX_BYTES = 8 << 20  # cases bigger than this go through ingest only (an upload is bounded by its body)


@dataclass(frozen=True)
class Case:
    name: str  # the file name in the zoo folder
    modality: str  # what its extension claims: image, audio or text
    expect: str  # "refused", "error" or "ok" (see the module docstring)
    make: Callable[[Path], None]  # writes the file at the given path
    why: str
    uploadable: bool = True  # False: a link, or bigger than UPLOAD_MAX_BYTES

    @property
    def bad(self) -> bool:
        return self.expect != "ok"


# valid bodies ----------------------------------------------------------------------------------------
def image_bytes(fmt: str, size: tuple[int, int] = (96, 64)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(img).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=(200, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def audio_bytes(fmt: str, seconds: float = 1.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * RATE)) / RATE
    wave = (0.3 * np.sin(2 * math.pi * 440 * t) + 0.05 * np.sin(2 * math.pi * 3100 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, RATE, format=fmt)
    return buf.getvalue()


def wav_header(
    *, rate: int, channels: int, bits: int, data_bytes: int, riff_bytes: int | None = None
) -> bytes:
    """A canonical 44-byte PCM WAV header (``riff_bytes`` lets it lie independently of the data chunk)."""
    block = channels * bits // 8
    riff = 36 + data_bytes if riff_bytes is None else riff_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of ``width x height`` zeros: kilobytes on disk, width*height*3 bytes as RGB."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed pixels
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.compress(
        row * (height % 1000)
    )
    body += comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# writers ---------------------------------------------------------------------------------------------
def _bytes(data: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data())


def _truncated(data: Callable[[], bytes], keep: float = 0.5) -> Callable[[Path], None]:
    return lambda path: path.write_bytes((b := data())[: max(1, int(len(b) * keep))])


def _corrupt(data: Callable[[], bytes], head: int) -> Callable[[Path], None]:
    """The first ``head`` bytes of a real file, then noise."""

    def make(path: Path) -> None:
        b = data()
        noise = np.random.default_rng(len(b)).integers(0, 256, len(b) - head, dtype=np.uint8).tobytes()
        path.write_bytes(b[:head] + noise)

    return make


def _sparse(head: Callable[[], bytes], size: int) -> Callable[[Path], None]:
    """``head`` then a hole up to ``size`` bytes (no blocks written)."""

    def make(path: Path) -> None:
        path.write_bytes(head())
        os.truncate(path, size)

    return make


def _symlink(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def cases() -> list[Case]:
    out: list[Case] = []
    for ext, fmt in IMAGE_FORMATS.items():
        body = lambda fmt=fmt: image_bytes(fmt)  # noqa: E731
        out += [
            Case(f"truncated.{ext}", "image", "error", _truncated(body), f"a {fmt} cut in half"),
            Case(
                f"corrupt.{ext}",
                "image",
                "error",
                _corrupt(body, MAGIC[ext]),
                f"{fmt} magic bytes, then noise",
            ),
            Case(f"empty.{ext}", "image", "refused", _bytes(lambda: b""), "zero bytes"),
        ]
    for ext, fmt in AUDIO_FORMATS.items():
        body = lambda fmt=fmt: audio_bytes(fmt)  # noqa: E731
        out += [
            Case(f"truncated.{ext}", "audio", "error", _truncated(body, 0.3), f"a {fmt} cut short"),
            Case(
                f"corrupt.{ext}",
                "audio",
                "error",
                _corrupt(body, MAGIC[ext]),
                f"{fmt} magic bytes, then noise",
            ),
            Case(f"empty.{ext}", "audio", "refused", _bytes(lambda: b""), "zero bytes"),
        ]
    wav1s = lambda: audio_bytes("WAV")  # noqa: E731
    out += [
        # bombs and lying headers: the header alone says no
        Case("bomb.png", "image", "refused", _bytes(lambda: png_bomb(13000, 13000)), "13000x13000 in ~20 KB"),
        Case(
            "bomb_header.png",
            "image",
            "refused",
            _bytes(lambda: png_bomb(60000, 1)[:33]),
            "60000x1 header, no data",
        ),
        Case(
            "huge_sparse.png",
            "image",
            "refused",
            _sparse(lambda: image_bytes("PNG"), 600 << 20),
            "a valid PNG padded to 600 MB",
            uploadable=False,
        ),
        Case(
            "huge_sparse.wav",
            "audio",
            "refused",
            _sparse(
                lambda: wav_header(rate=8000, channels=1, bits=8, data_bytes=3600 * 8000), 44 + 3600 * 8000
            ),
            "one hour of 8 kHz silence (sparse, 29 MB)",
            uploadable=False,
        ),
        Case(
            "too_long.wav",
            "audio",
            "refused",
            _sparse(
                lambda: wav_header(rate=8000, channels=1, bits=8, data_bytes=700 * 8000), 44 + 700 * 8000
            ),
            "700 s of 8 kHz silence (sparse, 5.6 MB): over the 600 s limit",
        ),
        Case(
            "lying_data.wav",
            "audio",
            "refused",
            _bytes(
                lambda: wav_header(rate=16000, channels=1, bits=16, data_bytes=3600 * 32000) + wav1s()[44:]
            ),
            "data chunk declares an hour, holds 1 s",
        ),
        Case(
            "lying_riff.wav",
            "audio",
            "refused",
            _bytes(
                lambda: (
                    wav_header(rate=16000, channels=1, bits=16, data_bytes=32000, riff_bytes=1 << 30)
                    + wav1s()[44:]
                )
            ),
            "RIFF size declares 1 GB",
        ),
        Case(
            "tiny.wav",
            "audio",
            "refused",
            _bytes(lambda: wav_header(rate=16000, channels=1, bits=16, data_bytes=56) + b"\x00" * 56),
            "100 bytes: 28 samples (under 2 ms)",
        ),
        # the extension lies: magic bytes say otherwise
        Case("png_named.wav", "audio", "refused", _bytes(lambda: image_bytes("PNG")), "a PNG named .wav"),
        Case("wav_named.jpg", "image", "refused", _bytes(wav1s), "a WAV named .jpg"),
        Case(
            "text_named.png", "image", "refused", _bytes(lambda: b"just some words\n" * 20), "text named .png"
        ),
        Case("zeros.png", "image", "refused", _bytes(lambda: b"\x00" * 4096), "4 KB of NUL named .png"),
        # text (no media file shares these stems: a .txt beside one is its sidecar caption)
        Case("nul.txt", "text", "refused", _bytes(lambda: b"\x00" * 4096), "4 KB of NUL bytes as text"),
        Case("blank_text.txt", "text", "refused", _bytes(lambda: b""), "zero-byte text"),
        Case(
            "huge_text.txt",
            "text",
            "refused",
            _sparse(lambda: b"words ", 50 << 20),
            "50 MB text (sparse)",
            uploadable=False,
        ),
        # links: reported per item, never followed into a loop or silently skipped
        Case(
            "loop_a.png", "image", "refused", _symlink("loop_b.png"), "symlink loop a -> b", uploadable=False
        ),
        Case(
            "loop_b.png", "image", "refused", _symlink("loop_a.png"), "symlink loop b -> a", uploadable=False
        ),
        Case(
            "dangling.wav", "audio", "refused", _symlink("nowhere.wav"), "dangling symlink", uploadable=False
        ),
        # awkward names of valid files: accepted
        Case("n" * 200 + ".png", "image", "ok", _bytes(lambda: image_bytes("PNG")), "a 204-byte name"),
        Case("sön 音 🎵 'q\" .wav", "audio", "ok", _bytes(wav1s), "unicode, spaces and quotes"),
    ]
    return out


def build(root: Path, only: list[Case] | None = None) -> list[Case]:
    """Write the zoo (or ``only`` these cases) into ``root``; links are made after the files."""
    root.mkdir(parents=True, exist_ok=True)
    chosen = only if only is not None else cases()
    for case in chosen:
        case.make(root / case.name)  # a link may point at a name not written yet
    return chosen


def upload_content_type(case: Case) -> str:
    ext = Path(case.name).suffix.lower().lstrip(".")
    if case.modality == "image":
        return "image/jpeg" if ext == "jpg" else f"image/{ext}"
    if case.modality == "audio":
        return {"mp3": "audio/mpeg", "wav": "audio/wav"}.get(ext, f"audio/{ext}")
    return "text/plain"
