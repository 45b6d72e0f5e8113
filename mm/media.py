"""The one place that sniffs, bounds and decodes user media: images (Pillow), audio (soundfile +
torchaudio resampling) and text. Ingest, ``POST /items``, ``/search/upload``, the CLI and the encoders
all decode through here (``index/`` gets it as ``embedder.media``, a :class:`MediaReader`).

Every corrupt, truncated, empty, oversized or unsupported input raises :class:`mm.errors.MediaError`
with a one-line message naming the source (the name the caller gives: a file name, never a server temp
path or an object repr) and ``kind`` set for the caller (``unsupported`` / ``corrupt`` / ``empty`` /
``too_large``); raw Pillow or libsndfile exceptions never escape. A missing file raises
``FileNotFoundError``.

Limits, all checked before a byte of payload is decoded (:func:`sniff` reads only the header):

=====================  ==========  =============================================================
``MAX_MEDIA_BYTES``    100 MiB     image or audio file size (``stat``, before the file is read)
``MAX_IMAGE_PIXELS``   50 M        width x height from the image header
``MAX_AUDIO_SECONDS``  600 s       duration from the audio header
``MIN_AUDIO_SECONDS``  0.01 s      shorter files hold no usable sound (a 100-byte WAV)
``MAX_TEXT_BYTES``     1 MB        a text file or sidecar caption (the text as stored)
``MAX_DECODE_SIDE``    1024 px     decoded images are shrunk to this (encoders use far less)
``MAX_EMBED_CHARS``    4096        characters a text encoder's tokenizer sees (8 per token of 512)
``SNIPPET_CHARS``      300         the caption a search hit carries
=====================  ==========  =============================================================

The service's request body limit (``MM_MAX_UPLOAD_MB``, 100 MB by default) bounds an upload before it
reaches here; a file written to disk is bounded again by ``MAX_MEDIA_BYTES``.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mm.errors import MediaError

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from torch import Tensor

logger = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3"})
TEXT_EXTS = frozenset({".txt", ".md"})
MODALITIES = ("text", "image", "audio")

MAX_MEDIA_BYTES = 100 * (1 << 20)
MAX_IMAGE_PIXELS = 50_000_000
MAX_AUDIO_SECONDS = 600.0
MIN_AUDIO_SECONDS = 0.01  # 10 ms: the shortest real sound in the sample corpus, a tick, is 19 ms
MAX_TEXT_BYTES = 1_000_000
MAX_DECODE_SIDE = 1024
# Our text encoders keep at most 512 tokens and natural text runs 2-6 characters a token: 8 per token
# leaves every token they keep, and a 1 MB text costs the tokenizer 4096 characters, not a megabyte.
MAX_EMBED_CHARS = 8 * 512
SNIPPET_CHARS = 300

# Checked on the format Pillow decoded, never on the file name.
IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}
AUDIO_MIME = {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg", "MP3": "audio/mpeg"}
TEXT_MIME = {".txt": "text/plain", ".md": "text/markdown"}
# The suffix an upload named without one (``blob``) is stored under, from the type it was sent as.
MIME_SUFFIX = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/webp": ".webp",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
}

# Leading bytes of formats we accept: a file that starts like one of these but fails to decode is
# "corrupt"; anything else Pillow/libsndfile cannot identify is "unsupported".
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
# Library messages name their input: a server path, or "<_io.BytesIO object at 0x7f...>".
_OBJECT_REPR = re.compile(r"'?<[\w.]+ object at 0x[0-9a-fA-F]+>'?")

Src = str | Path | bytes | bytearray | memoryview


@dataclass(frozen=True)
class MediaLimits:
    """Sizes refused before decoding (see the module docstring for why each exists)."""

    max_bytes: int = MAX_MEDIA_BYTES  # image / audio file size
    max_pixels: int = MAX_IMAGE_PIXELS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    min_audio_seconds: float = MIN_AUDIO_SECONDS
    max_text_bytes: int = MAX_TEXT_BYTES


LIMITS = MediaLimits()


def describe_limits(limits: MediaLimits = LIMITS) -> str:
    """The limits in words, for API descriptions (e.g. the OpenAPI text of an upload field)."""
    return (
        f"at most {limits.max_bytes / (1 << 20):g} MB, {limits.max_pixels / 1e6:g} M pixels, "
        f"{limits.min_audio_seconds:g}-{limits.max_audio_seconds:g} s of audio"
    )


@dataclass(frozen=True)
class MediaInfo:
    """What a file's header says (:func:`sniff`): enough to refuse it or to describe it without decoding."""

    modality: str  # "image" | "audio" | "text"
    mime: str
    size: int  # bytes
    width: int | None = None  # images: as stored (before EXIF rotation)
    height: int | None = None
    duration: float | None = None  # audio seconds
    sample_rate: int | None = None  # audio


# ----------------------------------------------------------------------------------- names and sources


def modality_of(name: str | Path | None, content_type: str | None = None) -> str | None:
    """``"image"``, ``"audio"``, ``"text"`` or None, from the file suffix (or, with no suffix, from the
    major type of ``content_type``, e.g. an upload named ``blob`` sent as ``image/png``)."""
    ext = Path(name or "").suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    major = (content_type or "").split("/", 1)[0].strip().lower()
    if not ext and major in ("image", "audio", "text"):
        return major
    return None


def require_modality(
    name: str | None, content_type: str | None = None, allowed: tuple[str, ...] = MODALITIES
) -> str:
    """:func:`modality_of`, refusing (``MediaError(unsupported)``) what is unknown or not ``allowed``."""
    modality = modality_of(name, content_type)
    if modality in allowed:
        return modality
    exts = {"image": IMAGE_EXTS, "audio": AUDIO_EXTS, "text": TEXT_EXTS}
    wanted = " or ".join(f"{m} ({', '.join(sorted(exts[m]))})" for m in allowed)
    what = Path(name or "").suffix.lower() or content_type or "(none)"
    raise MediaError(f"unsupported file type {what!r}: send {wanted}", kind="unsupported", path=name)


def _name(src: Any, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _reason(exc: BaseException, src: Any, name: str) -> str:
    """A library's message without the paths and object reprs it embeds (users see ``name`` instead)."""
    text = str(exc)
    if isinstance(src, (str, Path)):
        text = text.replace(f"'{src}'", name).replace(str(src), name)
    text = _OBJECT_REPR.sub("the data", text)
    return " ".join(text.split()) or type(exc).__name__


def _size(src: Src, name: str) -> int:
    """Bytes in ``src``; FileNotFoundError for a missing path, MediaError for a directory."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file")
    if path.is_dir():
        raise MediaError(f"{name}: is a directory, not a media file", kind="unsupported", path=name)
    return path.stat().st_size


def _check_size(src: Src, name: str, max_bytes: int | None, what: str = "file") -> int:
    size = _size(src, name)
    if size == 0:
        raise MediaError(f"{name}: file is empty (0 bytes)", kind="empty", path=name)
    if max_bytes is not None and size > max_bytes:
        raise MediaError(
            f"{name}: {what} too large ({size} bytes > {max_bytes} bytes)", kind="too_large", path=name
        )
    return size


def _read_head(src: Src, n: int = 16) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[:n])
    with open(src, "rb") as f:
        return f.read(n)


def _fp(src: Src) -> Any:
    return io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _unidentified(src: Src, name: str, what: str, magic: tuple[bytes, ...]) -> MediaError:
    if _read_head(src).startswith(magic):
        return MediaError(
            f"{name}: corrupt {what} (header looks valid but cannot be decoded)", "corrupt", name
        )
    return MediaError(f"{name}: not a supported {what} format", kind="unsupported", path=name)


# ------------------------------------------------------------------------------------- sniff (header)


def sniff(
    src: Src, name: str | None = None, modality: str | None = None, limits: MediaLimits = LIMITS
) -> MediaInfo:
    """Read only the header of a file (or bytes) and refuse it if it breaks a limit or is not media.

    ``modality`` defaults to the one the path's suffix names (bytes need it). Raises ``MediaError``
    (``FileNotFoundError`` for a missing path). The file size is checked before the file is opened.
    """
    label = _name(src, name)
    if modality is None:
        modality = modality_of(src) if isinstance(src, (str, Path)) else None
    if modality is None:
        suffix = Path(src).suffix if isinstance(src, (str, Path)) else ""
        raise MediaError(f"{label}: unsupported file extension {suffix!r}", "unsupported", label)
    if modality == "text":
        size = _check_size(src, label, limits.max_text_bytes, "text file")
        if b"\x00" in _read_head(src, 4096):  # UTF-8 text never holds NUL: a binary file renamed
            raise MediaError(f"{label}: binary data, not text (contains NUL bytes)", "unsupported", label)
        ext = Path(src).suffix.lower() if isinstance(src, (str, Path)) else ""
        return MediaInfo("text", TEXT_MIME.get(ext, "text/plain"), size)
    size = _check_size(src, label, limits.max_bytes, f"{modality} file")
    if modality == "image":
        return _sniff_image(src, label, size, limits)
    if modality == "audio":
        return _sniff_audio(src, label, size, limits)
    raise ValueError(f"unknown modality {modality!r}; use one of {MODALITIES}")


def _sniff_image(src: Src, name: str, size: int, limits: MediaLimits) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_fp(src)) as img:  # reads the header only
            fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: image too large ({_reason(e, src, name)})", "too_large", name) from e
    except UnidentifiedImageError as e:
        raise _unidentified(src, name, "image", _IMAGE_MAGIC) from e
    except Exception as e:  # Pillow raises many types for broken headers
        raise MediaError(f"{name}: corrupt image ({_reason(e, src, name)})", "corrupt", name) from e
    if fmt not in IMAGE_FORMATS:
        raise MediaError(
            f"{name}: image format {fmt} is not supported (use one of {sorted(IMAGE_FORMATS)})",
            kind="unsupported",
            path=name,
        )
    _check_pixels(w, h, limits.max_pixels, name)
    return MediaInfo("image", Image.MIME.get(fmt, "image/" + fmt.lower()), size, width=w, height=h)


def _check_pixels(w: int, h: int, max_pixels: int, name: str) -> None:
    if w * h > max_pixels:
        raise MediaError(
            f"{name}: image too large ({w}x{h} = {w * h} pixels > {max_pixels})", kind="too_large", path=name
        )
    if w == 0 or h == 0:
        raise MediaError(f"{name}: image has no pixels ({w}x{h})", kind="empty", path=name)


def _sniff_audio(src: Src, name: str, size: int, limits: MediaLimits) -> MediaInfo:
    import soundfile as sf

    try:
        info = sf.info(_fp(src))
    except Exception as e:
        raise _unidentified(src, name, "audio", _AUDIO_MAGIC) from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError(f"{name}: audio has no samples", kind="empty", path=name)
    if info.format == "WAV":
        _check_wav_length(src, name, size)
    duration = info.frames / info.samplerate
    _check_duration(info.frames, info.samplerate, limits.max_audio_seconds, name)
    if duration < limits.min_audio_seconds:
        raise MediaError(
            f"{name}: audio too short ({duration * 1000:.1f} ms < {limits.min_audio_seconds * 1000:g} ms)",
            kind="empty",
            path=name,
        )
    mime = AUDIO_MIME.get(info.format, "application/octet-stream")
    return MediaInfo("audio", mime, size, duration=duration, sample_rate=int(info.samplerate))


def _check_wav_length(src: Src, name: str, size: int) -> None:
    """Refuse a WAV whose RIFF or data chunk claims more bytes than the file holds.

    libsndfile quietly reads what is there, so a truncated upload or a header that lies would be
    indexed as a shorter sound. 0 and 0xFFFFFFFF mean "length unknown" (streaming writers) and pass;
    the RIFF size gets 8 bytes of slack (writers that count its own header, or a missing pad byte).
    """
    head = _read_head(src, 4096)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    declared = [(struct.unpack("<I", head[4:8])[0], 8, 8)]  # (length, offset, slack)
    pos = 12
    while pos + 8 <= len(head):
        tag, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if tag == b"data":
            declared.append((length, pos + 8, 0))
            break
        pos += 8 + length + (length & 1)
    for length, offset, slack in declared:
        if length not in (0, 0xFFFFFFFF) and offset + length > size + slack:
            raise MediaError(
                f"{name}: corrupt WAV (its header declares {offset + length} bytes, the file holds {size})",
                kind="corrupt",
                path=name,
            )


def probe(path: str | Path) -> dict[str, Any]:
    """:func:`sniff` as a dict: ``{"modality", "mime", "width", "height"}`` for images, ``{"modality",
    "mime", "duration", "sample_rate"}`` for audio and ``{"modality", "mime", "bytes"}`` for text."""
    info = sniff(path)
    keys = {
        "image": ("modality", "mime", "width", "height"),
        "audio": ("modality", "mime", "duration", "sample_rate"),
        "text": ("modality", "mime", "size"),
    }[info.modality]
    out = {k: v for k, v in asdict(info).items() if k in keys}
    if info.modality == "text":
        out["bytes"] = out.pop("size")
    return out


# --------------------------------------------------------------------------------------------- images


def load_image(
    src: Src | PILImage.Image,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_side: int | None = MAX_DECODE_SIDE,
    name: str | None = None,
    max_bytes: int = MAX_MEDIA_BYTES,
) -> PILImage.Image:
    """Decode an image to a fully loaded RGB ``PIL.Image``.

    Allowed formats (by decoded content): JPEG, PNG, WEBP, GIF, BMP. EXIF orientation is applied,
    transparency is composited onto white, an animated GIF gives its first frame, and the result is
    shrunk to ``max_side`` (a JPEG is decoded at a reduced scale already). Files over ``max_bytes`` and
    images over ``max_pixels`` are refused from the header, before decoding (decompression bombs).
    """
    from PIL import Image

    label = _name(src, name)
    if isinstance(src, Image.Image):
        img = src
        _check_pixels(*img.size, max_pixels, label)
    else:
        if not isinstance(src, (str, Path, bytes, bytearray, memoryview)):
            raise TypeError(f"load_image expects a path, bytes or PIL.Image, got {type(src).__name__}")
        info = sniff(src, label, "image", MediaLimits(max_bytes=max_bytes, max_pixels=max_pixels))
        try:
            img = Image.open(_fp(src))
        except Exception as e:  # sniff opened it a moment ago: the file changed under us
            raise MediaError(f"{label}: corrupt image ({_reason(e, src, label)})", "corrupt", label) from e
        if img.size != (info.width, info.height):
            raise MediaError(f"{label}: the image changed while it was read", kind="corrupt", path=label)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        if max_side is not None and img.format == "JPEG":
            img.draft("RGB", (2 * max_side, 2 * max_side))  # decode at a reduced DCT scale
        img.load()  # forces the full decode so truncated files fail here, not later
        out = _to_rgb(_exif_transpose(img, label))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{label}: image too large ({_reason(e, src, label)})", "too_large", label) from e
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(
            f"{label}: corrupt or truncated image ({_reason(e, src, label)})", kind="corrupt", path=label
        ) from e
    if max_side is not None and max(out.size) > max_side:
        out = out.copy() if out is src else out
        out.thumbnail((max_side, max_side))
    return out


def _exif_transpose(img: PILImage.Image, name: str) -> PILImage.Image:
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # broken EXIF should not cost the pixels
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return img


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
    """RGB, with transparent parts composited onto white (what the encoders were trained on)."""
    from PIL import Image

    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if not has_alpha:
        return img.convert("RGB") if img.mode != "RGB" else img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def thumbnail(src: Src, size: int, name: str | None = None) -> PILImage.Image:
    """An RGB thumbnail (longest side ``size``) decoded like every other image: same limits, EXIF
    rotation, transparency on white."""
    return load_image(src, max_side=size, name=name)


# ---------------------------------------------------------------------------------------------- audio


def load_audio(
    src: Src | tuple[np.ndarray | Tensor, int],
    target_rate: int | None = 16000,
    max_seconds: float | None = MAX_AUDIO_SECONDS,
    crop_seconds: float | None = None,
    name: str | None = None,
    max_bytes: int = MAX_MEDIA_BYTES,
) -> np.ndarray:
    """Decode audio to float32 mono ``(n,)`` at ``target_rate`` (None: the source's own rate).

    ``src`` is a path or bytes (WAV, FLAC, OGG/Vorbis, MP3 via libsndfile) or ``(waveform, rate)`` where a
    2-D waveform is ``(channels, samples)`` or ``(samples, channels)`` (the shorter axis is channels).
    Inputs longer than ``max_seconds`` raise ``MediaError(kind="too_large")`` (files: from the header,
    before decoding); ``crop_seconds`` keeps only the centre window of that length (read without decoding
    the rest for files).
    """
    if target_rate is not None and target_rate <= 0:
        raise ValueError(f"target_rate must be positive, got {target_rate}")
    label = _name(src, name)
    if isinstance(src, tuple):
        wave, rate = _from_array(src, label)
        _check_duration(len(wave), rate, max_seconds, label)
        if crop_seconds is not None and len(wave) > int(crop_seconds * rate):
            keep = max(1, int(crop_seconds * rate))
            start = (len(wave) - keep) // 2
            wave = wave[start : start + keep]
    elif isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        _check_size(src, label, max_bytes, "audio file")
        wave, rate = _read_sound(src, label, max_seconds, crop_seconds)
    else:
        raise TypeError(f"load_audio expects a path, bytes or (waveform, rate), got {type(src).__name__}")
    if wave.size == 0:
        raise MediaError(f"{label}: audio has no samples", kind="empty", path=label)
    if not np.isfinite(wave).all():
        raise MediaError(f"{label}: audio contains NaN or infinite samples", kind="corrupt", path=label)
    if target_rate is not None and rate != target_rate:
        wave = _resample(wave, rate, target_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _from_array(src: tuple, name: str) -> tuple[np.ndarray, int]:
    if len(src) != 2:
        raise TypeError("audio tuples must be (waveform, sample_rate)")
    wave, rate = src
    if hasattr(wave, "detach"):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name}: sample rate must be a positive int, got {rate!r}")
    if wave.ndim == 2:
        wave = wave.mean(axis=0 if wave.shape[0] <= wave.shape[1] else 1)
    elif wave.ndim != 1:
        raise ValueError(f"{name}: waveform must be 1-D or 2-D, got shape {wave.shape}")
    return wave, int(rate)


def _check_duration(n: int, rate: int, max_seconds: float | None, name: str) -> None:
    if max_seconds is not None and n > max_seconds * rate:
        raise MediaError(
            f"{name}: audio too long ({n / rate:.1f} s > {max_seconds:g} s)", kind="too_large", path=name
        )


def _read_sound(
    src: Src, name: str, max_seconds: float | None, crop_seconds: float | None
) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        with sf.SoundFile(_fp(src)) as f:
            rate, frames = f.samplerate, f.frames
            _check_duration(frames, rate, max_seconds, name)  # from the header: nothing decoded yet
            if f.format == "WAV":
                _check_wav_length(src, name, _size(src, name))
            start, count = 0, -1
            if crop_seconds is not None and 0 < crop_seconds * rate < frames:
                count = max(1, int(crop_seconds * rate))
                start = (frames - count) // 2
                f.seek(start)
            data = f.read(frames=count, dtype="float32", always_2d=True)  # (n, channels)
        if f.format != "MP3" or _mp3_declares_length(src):
            _check_complete(len(data), count if count > 0 else frames - start, name)
    except MediaError:
        raise
    except sf.LibsndfileError as e:
        if "not recognised" in str(e).lower() or "unknown format" in str(e).lower():
            raise _unidentified(src, name, "audio", _AUDIO_MAGIC) from e
        raise MediaError(f"{name}: corrupt audio ({_reason(e, src, name)})", "corrupt", name) from e
    except Exception as e:
        raise MediaError(f"{name}: corrupt audio ({_reason(e, src, name)})", "corrupt", name) from e
    return data.mean(axis=1), rate


def _mp3_declares_length(src: Src) -> bool:
    """Whether an MP3 states its length (a Xing/Info or VBRI frame after any ID3v2 tag). Without one,
    libsndfile estimates the length from the first frame's bitrate, which is wrong for every variable
    bitrate file (Scratch's sounds: "declared" 50,693 samples, all 39,168 there), so a shortfall proves
    nothing about truncation."""
    head = _read_head(src, 10)
    skip = 0
    if head[:3] == b"ID3" and len(head) == 10:  # ID3v2: a syncsafe size (7 bits per byte) after the flags
        skip = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
    if isinstance(src, (bytes, bytearray, memoryview)):
        first = bytes(src[skip : skip + 4096])
    else:
        with open(src, "rb") as f:
            f.seek(skip)
            first = f.read(4096)
    return any(tag in first for tag in (b"Xing", b"Info", b"VBRI"))


def _check_complete(got: int, expected: int, name: str) -> None:
    """Refuse a file that decodes to fewer samples than its header declares (an MP3 cut short still
    claims its full length in its Xing header; libsndfile returns what is left without a word). The
    slack covers encoder padding (two MP3 frames) and rounding."""
    if expected - got > max(2304, expected // 100):
        raise MediaError(
            f"{name}: truncated audio (its header declares {expected} samples, {got} could be decoded)",
            kind="corrupt",
            path=name,
        )


def _resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, target_rate)
    return out.numpy()


# ----------------------------------------------------------------------------------------------- text


def read_text(src: Src, max_bytes: int = MAX_TEXT_BYTES, name: str | None = None) -> str:
    """The text as stored: a UTF-8 file (or bytes) of at most ``max_bytes``, BOM dropped.

    Larger -> ``MediaError(too_large)`` before the file is read; invalid UTF-8 -> ``corrupt``; NUL bytes
    (a binary file) or only whitespace -> ``unsupported`` / ``empty``.
    """
    label = _name(src, name)
    _check_size(src, label, max_bytes, "text file")
    raw = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else _read_at_most(src, max_bytes)
    if len(raw) > max_bytes:  # the file grew after the size check
        raise MediaError(f"{label}: text file too large (> {max_bytes} bytes)", "too_large", label)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MediaError(
            f"{label}: not valid UTF-8 text ({e.reason} at byte {e.start})", "corrupt", label
        ) from e
    if "\x00" in text:
        raise MediaError(f"{label}: binary data, not text (contains NUL bytes)", "unsupported", label)
    if not text.strip():
        raise MediaError(f"{label}: text file holds only whitespace", kind="empty", path=label)
    return text


def _read_at_most(path: str | Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_caption(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str | None:
    """A sidecar caption: at most ``max_bytes`` read, undecodable bytes replaced, NULs dropped, stripped.

    A caption never stops its media file from being indexed, so nothing here raises for bad content.
    """
    try:
        raw = _read_at_most(path, max_bytes)[:max_bytes]
    except OSError as e:
        logger.warning("cannot read caption %s: %s", path, e)
        return None
    text = raw.decode("utf-8-sig", errors="replace").replace("\x00", "").strip()
    return text or None


def text_for_embedding(text: str, max_chars: int = MAX_EMBED_CHARS) -> str:
    """The text as embedded: its first ``max_chars`` characters (the text encoders call this before
    tokenizing; they keep only their first ``max_len`` tokens of it anyway)."""
    return text if len(text) <= max_chars else text[:max_chars]


def text_snippet(text: str | None, max_chars: int = SNIPPET_CHARS) -> str:
    """The text as a search hit shows it: at most ``max_chars`` characters, cut at a word with an ellipsis."""
    if not text or len(text) <= max_chars:
        return text or ""
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


# ----------------------------------------------------------------------------------------- the reader


@dataclass(frozen=True)
class MediaReader:
    """Sniff, bound and decode media the way one embedder wants it (``index.protocol.MediaReader``).

    The embedder exposes one as ``embedder.media`` so that ``index`` (which never imports ``mm``) decodes
    exactly as the encoders do. ``decode`` returns what ``encode_<modality>`` takes: an RGB
    ``PIL.Image`` (at most ``max_side``), ``(waveform (n,), rate)`` (resampled to ``sample_rate`` and
    cropped to the centre ``crop_seconds`` when set, as the audio encoder would) or the stored text.
    """

    limits: MediaLimits = LIMITS
    sample_rate: int | None = None
    crop_seconds: float | None = None
    max_side: int = MAX_DECODE_SIDE
    media_suffixes: frozenset[str] = IMAGE_EXTS | AUDIO_EXTS  # files a ``.txt`` may caption

    def modality_of(self, path: str | Path) -> str | None:
        return modality_of(path)

    def sniff(self, src: Src, name: str | None = None, modality: str | None = None) -> MediaInfo:
        return sniff(src, name, modality, self.limits)

    def decode(self, src: Src, info: MediaInfo, name: str | None = None) -> Any:
        label = _name(src, name)
        lim = self.limits
        if info.modality == "image":
            return load_image(src, lim.max_pixels, self.max_side, label, lim.max_bytes)
        if info.modality == "audio":
            wave = load_audio(
                src, self.sample_rate, lim.max_audio_seconds, self.crop_seconds, label, lim.max_bytes
            )
            return wave, self.sample_rate or info.sample_rate
        if info.modality == "text":
            return read_text(src, lim.max_text_bytes, label)
        raise ValueError(f"unknown modality {info.modality!r}")

    def read_caption(self, path: str | Path) -> str | None:
        return read_caption(path, self.limits.max_text_bytes)
