"""Safe decoding of user media: images (Pillow), audio (soundfile + torchaudio resampling) and text.

Every corrupt, truncated, empty, oversized or unsupported input raises :class:`mm.errors.MediaError`
with a one-line message naming the source and what is wrong, and ``kind`` set for the caller
(``unsupported`` / ``corrupt`` / ``empty`` / ``too_large``); raw Pillow or libsndfile exceptions never
escape. A missing file raises ``FileNotFoundError``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mm.errors import MediaError

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from torch import Tensor

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3"}
TEXT_EXTS = {".txt", ".md"}

# Checked on the format Pillow decoded, never on the file name.
IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}
AUDIO_MIME = {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg", "MP3": "audio/mpeg"}
TEXT_MIME = {".txt": "text/plain", ".md": "text/markdown"}

# Leading bytes of formats we accept: a file that starts like one of these but fails to decode is
# "corrupt"; anything else Pillow/libsndfile cannot identify is "unsupported".
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def modality_of(path: str | Path) -> str | None:
    """``"image"``, ``"audio"``, ``"text"`` or None, from the file extension."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    return None


def _name(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _read_head(src: str | Path | bytes, n: int = 16) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[:n])
    with open(src, "rb") as f:
        return f.read(n)


def _check_not_empty(src: str | Path | bytes, name: str) -> None:
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{name}: no such file")
        if path.is_dir():
            raise MediaError(f"{name}: is a directory, not a media file", kind="unsupported", path=name)
        size = path.stat().st_size
    else:
        size = len(src)
    if size == 0:
        raise MediaError(f"{name}: file is empty (0 bytes)", kind="empty", path=name)


def _unidentified(src: str | Path | bytes, name: str, what: str, magic: tuple[bytes, ...]) -> MediaError:
    head = _read_head(src)
    if head.startswith(magic):
        return MediaError(
            f"{name}: corrupt {what} (header looks valid but cannot be decoded)", "corrupt", name
        )
    return MediaError(f"{name}: not a supported {what} format", kind="unsupported", path=name)


# --------------------------------------------------------------------------------------------- images


def load_image(src: str | Path | bytes | PILImage.Image, max_pixels: int = 50_000_000) -> PILImage.Image:
    """Decode an image to a fully loaded RGB ``PIL.Image``.

    Allowed formats (by decoded content): JPEG, PNG, WEBP, GIF, BMP. EXIF orientation is applied,
    transparency is composited onto white, an animated GIF gives its first frame, and images with more
    than ``max_pixels`` pixels are refused before decoding (decompression bombs).
    """
    from PIL import Image, UnidentifiedImageError

    name = _name(src)
    if isinstance(src, Image.Image):
        img = src
    else:
        if not isinstance(src, (str, Path, bytes, bytearray, memoryview)):
            raise TypeError(f"load_image expects a path, bytes or PIL.Image, got {type(src).__name__}")
        _check_not_empty(src, name)
        fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise MediaError(f"{name}: image too large ({e})", kind="too_large", path=name) from e
        except UnidentifiedImageError as e:
            raise _unidentified(src, name, "image", _IMAGE_MAGIC) from e
        except Exception as e:  # Pillow raises many types for broken headers
            raise MediaError(f"{name}: corrupt image ({e})", kind="corrupt", path=name) from e
        if img.format not in IMAGE_FORMATS:
            fmt = img.format
            img.close()
            raise MediaError(
                f"{name}: image format {fmt} is not supported (use one of {sorted(IMAGE_FORMATS)})",
                kind="unsupported",
                path=name,
            )
    w, h = img.size
    if w * h > max_pixels:
        raise MediaError(
            f"{name}: image too large ({w}x{h} = {w * h} pixels > {max_pixels})", kind="too_large", path=name
        )
    if w == 0 or h == 0:
        raise MediaError(f"{name}: image has no pixels ({w}x{h})", kind="empty", path=name)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()  # forces the full decode so truncated files fail here, not later
        return _to_rgb(_exif_transpose(img, name))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: image too large ({e})", kind="too_large", path=name) from e
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{name}: corrupt or truncated image ({e})", kind="corrupt", path=name) from e


def _exif_transpose(img: PILImage.Image, name: str) -> PILImage.Image:
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # broken EXIF should not cost the pixels
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return img


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
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


# ---------------------------------------------------------------------------------------------- audio


def load_audio(
    src: str | Path | bytes | tuple[np.ndarray | Tensor, int],
    target_rate: int = 16000,
    max_seconds: float | None = 600.0,
    crop_seconds: float | None = None,
) -> np.ndarray:
    """Decode audio to float32 mono ``(n,)`` at ``target_rate``.

    ``src`` is a path or bytes (WAV, FLAC, OGG/Vorbis, MP3 via libsndfile) or ``(waveform, rate)`` where a
    2-D waveform is ``(channels, samples)`` or ``(samples, channels)`` (the shorter axis is channels).
    Inputs longer than ``max_seconds`` raise ``MediaError(kind="too_large")``; ``crop_seconds`` keeps only
    the centre window of that length (read without decoding the rest for files).
    """
    if target_rate <= 0:
        raise ValueError(f"target_rate must be positive, got {target_rate}")
    name = _name(src)
    if isinstance(src, tuple):
        wave, rate = _from_array(src, name)
        _check_duration(len(wave), rate, max_seconds, name)
        if crop_seconds is not None and len(wave) > int(crop_seconds * rate):
            keep = max(1, int(crop_seconds * rate))
            start = (len(wave) - keep) // 2
            wave = wave[start : start + keep]
    elif isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        wave, rate = _read_sound(src, name, max_seconds, crop_seconds)
    else:
        raise TypeError(f"load_audio expects a path, bytes or (waveform, rate), got {type(src).__name__}")
    if wave.size == 0:
        raise MediaError(f"{name}: audio has no samples", kind="empty", path=name)
    if not np.isfinite(wave).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples", kind="corrupt", path=name)
    if rate != target_rate:
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
    src: str | Path | bytes, name: str, max_seconds: float | None, crop_seconds: float | None
) -> tuple[np.ndarray, int]:
    import soundfile as sf

    _check_not_empty(src, name)

    def _open() -> Any:
        return io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else str(src)

    try:
        with sf.SoundFile(_open()) as f:
            rate, frames = f.samplerate, f.frames
            _check_duration(frames, rate, max_seconds, name)
            start, count = 0, -1
            if crop_seconds is not None and 0 < crop_seconds * rate < frames:
                count = max(1, int(crop_seconds * rate))
                start = (frames - count) // 2
                f.seek(start)
            data = f.read(frames=count, dtype="float32", always_2d=True)  # (n, channels)
    except MediaError:
        raise
    except sf.LibsndfileError as e:
        if "not recognised" in str(e).lower() or "unknown format" in str(e).lower():
            raise _unidentified(src, name, "audio", _AUDIO_MAGIC) from e
        raise MediaError(f"{name}: corrupt audio ({e})", kind="corrupt", path=name) from e
    except Exception as e:
        raise MediaError(f"{name}: corrupt audio ({e})", kind="corrupt", path=name) from e
    return data.mean(axis=1), rate


def _resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, target_rate)
    return out.numpy()


# ----------------------------------------------------------------------------------------- probe, text


def probe(path: str | Path) -> dict[str, Any]:
    """Cheap header check of a media file (no full decode).

    Returns ``{"modality", "mime", "width", "height"}`` for images, ``{"modality", "mime", "duration",
    "sample_rate"}`` for audio and ``{"modality", "mime", "bytes"}`` for text; raises ``MediaError``.
    """
    name = str(path)
    modality = modality_of(path)
    if modality is None:
        raise MediaError(f"{name}: unsupported file extension {Path(path).suffix!r}", "unsupported", name)
    _check_not_empty(path, name)
    if modality == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                fmt, (w, h) = img.format, img.size
        except UnidentifiedImageError as e:
            raise _unidentified(path, name, "image", _IMAGE_MAGIC) from e
        except Exception as e:
            raise MediaError(f"{name}: corrupt image ({e})", kind="corrupt", path=name) from e
        if fmt not in IMAGE_FORMATS:
            raise MediaError(f"{name}: image format {fmt} is not supported", kind="unsupported", path=name)
        return {
            "modality": "image",
            "mime": Image.MIME.get(fmt, "image/" + fmt.lower()),
            "width": w,
            "height": h,
        }
    if modality == "audio":
        import soundfile as sf

        try:
            info = sf.info(str(path))
        except Exception as e:
            raise _unidentified(path, name, "audio", _AUDIO_MAGIC) from e
        if info.frames == 0:
            raise MediaError(f"{name}: audio has no samples", kind="empty", path=name)
        return {
            "modality": "audio",
            "mime": AUDIO_MIME.get(info.format, "application/octet-stream"),
            "duration": info.frames / info.samplerate,
            "sample_rate": info.samplerate,
        }
    return {
        "modality": "text",
        "mime": TEXT_MIME[Path(path).suffix.lower()],
        "bytes": Path(path).stat().st_size,
    }


def read_text(path: str | Path, max_bytes: int = 1_000_000) -> str:
    """Read a UTF-8 text file (a BOM is dropped); larger than ``max_bytes`` -> ``MediaError(too_large)``."""
    name = str(path)
    _check_not_empty(path, name)
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise MediaError(f"{name}: text file too large ({size} bytes > {max_bytes})", "too_large", name)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MediaError(
            f"{name}: not valid UTF-8 text ({e.reason} at byte {e.start})", "corrupt", name
        ) from e
    if "\x00" in text:
        raise MediaError(f"{name}: binary data, not text (contains NUL bytes)", kind="unsupported", path=name)
    return text
