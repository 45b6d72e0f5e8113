"""Shared fixtures: a generated media folder (images, sounds, texts, sidecar captions, bad files) and the
session's embedder (the ``tiny`` model; a broken ``mm.model`` fails every test that uses it).

``FakeEmbedder`` is a deterministic stand-in that tests opt into by name (for a fixed dim or exact features);
it is never substituted silently for the real model."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray_cluster import ray_add_worker, ray_cluster, ray_cluster_handle, stop_cluster  # noqa: F401 (fixtures)

from mm.media import MediaReader

SAMPLE_RATE = 16000

# name -> (colour, shape); captions are written as sidecar .txt files for some of them
IMAGES = {
    "red_circle.png": ((220, 30, 30), "circle"),
    "blue_square.jpg": ((30, 40, 220), "square"),
    "green_triangle.png": ((30, 200, 60), "triangle"),
    "yellow_stripes.jpg": ((230, 220, 40), "stripes"),
}
SIDECARS = {"green_triangle.png": "A green triangle on white."}
SOUNDS = {"tone_low.wav": 220.0, "tone_high.flac": 1760.0, "tone_mid.wav": 660.0}
TEXTS = {
    "cats.txt": "Cats are small furry animals that purr and chase mice.",
    "ocean.txt": "The ocean is deep, salty and full of waves.",
}
BAD = ("broken.png", "empty.wav")  # a PNG of garbage bytes and a zero-byte WAV


def make_image(colour: tuple[int, int, int], shape: str, size: tuple[int, int] = (64, 48)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    w, h = size
    if shape == "circle":
        draw.ellipse((8, 4, w - 8, h - 4), fill=colour)
    elif shape == "square":
        draw.rectangle((10, 6, w - 10, h - 6), fill=colour)
    elif shape == "triangle":
        draw.polygon([(w // 2, 4), (6, h - 4), (w - 6, h - 4)], fill=colour)
    else:
        for x in range(0, w, 8):
            draw.rectangle((x, 0, x + 3, h), fill=colour)
    return img


def tone(freq: float, seconds: float = 0.5, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def encode_image(img, fmt: str = "PNG") -> bytes:
    """A PIL image as the bytes of a ``fmt`` file."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_bytes(colour=(200, 100, 50), shape="circle", fmt="PNG") -> bytes:
    return encode_image(make_image(colour, shape), fmt)


def wav_bytes(freq: float = 440.0, seconds: float = 0.5) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, tone(freq, seconds), SAMPLE_RATE, format="WAV")
    return buf.getvalue()


def wait_job(client: Any, job_id: str, timeout: float = 60.0) -> dict:
    """The job's final state (done, failed or cancelled), polled through the API's ``GET /jobs/{id}``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def write_media(root: Path, *, with_bad: bool = True) -> Path:
    """Write the fixture folder: images/, sounds/, texts/ and (optionally) bad/."""
    import soundfile as sf

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "sounds").mkdir(exist_ok=True)
    (root / "texts").mkdir(exist_ok=True)
    for name, (colour, shape) in IMAGES.items():
        make_image(colour, shape).save(root / "images" / name)
    for name, caption in SIDECARS.items():
        (root / "images" / Path(name).with_suffix(".txt").name).write_text(caption + "\n")
    for name, freq in SOUNDS.items():
        sf.write(root / "sounds" / name, tone(freq), SAMPLE_RATE)
    for name, text in TEXTS.items():
        (root / "texts" / name).write_text(text + "\n")
    if with_bad:
        (root / "bad").mkdir(exist_ok=True)
        (root / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
        (root / "bad" / "empty.wav").write_bytes(b"")
    return root


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    return write_media(tmp_path_factory.mktemp("media"))


class FakeEmbedder:
    """Deterministic stand-in for ``mm``'s embedder: pixel/spectrum/word-hash features, fixed projection."""

    dim = 32
    modalities = ("text", "image", "audio")
    model_id = "fake:0001"
    media = MediaReader()  # the real decoder: fakes replace the model, never the decoding

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._img = rng.standard_normal((48, self.dim)).astype(np.float32)
        self._aud = rng.standard_normal((16, self.dim)).astype(np.float32)

    @staticmethod
    def _norm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for word in t.lower().split():
                h = hashlib.sha256(word.encode()).digest()
                out[i, struct.unpack("<I", h[:4])[0] % self.dim] += 1.0
            out[i, 0] += 1e-3
        return self._norm(out)

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        from mm.errors import MediaError

        feats = []
        for img in images:
            if not isinstance(img, Image.Image):
                if Path(img).stat().st_size == 0:
                    raise MediaError(f"{img} is empty", kind="empty", path=str(img))
                try:
                    with Image.open(img) as im:
                        img = im.convert("RGB")
                except (UnidentifiedImageError, OSError) as exc:
                    raise MediaError(
                        f"cannot decode image {img}: {exc}", kind="corrupt", path=str(img)
                    ) from exc
            small = np.asarray(img.convert("RGB").resize((4, 4)), np.float32).reshape(-1) / 255.0 - 0.5
            feats.append(small)
        return self._norm(np.stack(feats) @ self._img) if feats else np.zeros((0, self.dim), np.float32)

    def encode_audio(self, clips: Sequence[Any]) -> np.ndarray:
        import soundfile as sf

        from mm.errors import MediaError

        feats = []
        for clip in clips:
            if isinstance(clip, tuple):
                wave = np.asarray(clip[0], np.float32)
            else:
                try:
                    wave, _ = sf.read(str(clip), dtype="float32", always_2d=False)
                except Exception as exc:
                    kind = "empty" if Path(clip).stat().st_size == 0 else "corrupt"
                    raise MediaError(f"cannot decode audio {clip}: {exc}", kind=kind, path=str(clip)) from exc
            if wave.ndim > 1:
                wave = wave.mean(axis=1)
            spec = np.abs(np.fft.rfft(wave[:8192], n=8192))[:4096]
            feats.append(np.log1p(spec.reshape(16, -1).sum(axis=1)))
        return self._norm(np.stack(feats) @ self._aud) if feats else np.zeros((0, self.dim), np.float32)


@pytest.fixture(scope="session")
def embedder():
    """The ``tiny`` model, loaded once per session. No fallback: if it cannot be built, the tests fail."""
    from mm.model import create_model

    return create_model("tiny")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A saved tiny checkpoint whose backbone counts (untrained configs zero ``out_proj``)."""
    import torch

    from mm.model import create_model, save_model

    torch.manual_seed(0)
    model = create_model("tiny").model
    torch.nn.init.normal_(model.out_proj.weight, std=0.2)
    return save_model(model, tmp_path_factory.mktemp("base"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under ``tests/ray/`` is marked ``ray`` (``pytest -m 'not ray'`` leaves Ray out)."""
    ray_dir = Path(__file__).parent / "ray"
    for item in items:
        if ray_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.ray)


_LAST_RAY_TEST: list[str] = []  # node id of the last selected test using the Ray cluster


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [i.nodeid for i in session.items if "ray_cluster_handle" in getattr(i, "fixturenames", ())]
    _LAST_RAY_TEST[:] = users[-1:]


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The session's Ray cluster stops after the last test that uses it, not at the end of the run."""
    if _LAST_RAY_TEST and item.nodeid == _LAST_RAY_TEST[0]:
        stop_cluster()
