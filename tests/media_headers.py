"""Files whose headers claim more than they hold: decompression bombs, hour-long WAVs and sparse giants,
for tests that prove a file is refused from its header, before any pixel or sample is decoded."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_header(w: int, h: int) -> bytes:
    """A valid RGB PNG claiming ``w`` x ``h`` pixels, holding almost no data (13 000 x 13 000: 0.5 GB)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def wav_header(frames: int, rate: int = 8000, width: int = 1) -> bytes:
    """A PCM mono WAV header that declares ``frames`` samples of ``width`` bytes."""
    data = frames * width
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * width, width, 8 * width)
    return (
        b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
        + b"data" + struct.pack("<I", data)
    )  # fmt: skip


def sparse(path: Path, head: bytes, size: int) -> Path:
    """A file of ``size`` bytes starting with ``head``; the rest is a hole (costs no disk, reads as NULs)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path
