"""A minimal BERT encoder (Devlin et al. 2019) that loads Hugging Face BERT folders without transformers.

Used for all-MiniLM-L6-v2: it reads ``config.json``, ``model.safetensors`` and ``tokenizer.json`` from a
local folder. Module names match the Hugging Face layout (``encoder.layer.N.attention.self.query``...), so
the checkpoint loads with ``strict=True`` (the unused ``pooler`` is dropped). It exists because the
pinned torchao breaks ``import transformers`` here, and because this path imports in a fraction of the time.

Index letters: b batch, t tokens, d hidden width, h heads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        d = json.loads(path.read_text())
        if d.get("model_type", "bert") != "bert" or d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only BERT models with GELU are supported, got {d.get('model_type')}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, T, D), (B, T) bool -> (B, T, D)
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, D/H)

        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T) keys that are real
        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=attn_mask
        )
        return out.transpose(1, 2).reshape(b, t, d)


class AddNorm(nn.Module):
    """Post-LN residual: LayerNorm(residual + dense(x)), as in the original BERT."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = AddNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = AddNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class BertModel(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:  # (B, T) long, (B, T) bool -> (B, T, D)
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def load_bert(folder: str | Path) -> tuple[BertModel, Any]:
    """``(model, tokenizer)`` from a local Hugging Face BERT folder (a ``tokenizers.Tokenizer``)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; expected a Hugging Face BERT model folder")
    model = BertModel(BertConfig.from_json(folder / "config.json"))
    state = load_file(str(folder / "model.safetensors"))
    state = {
        k.removeprefix("bert."): v
        for k, v in state.items()
        if not k.removeprefix("bert.").startswith(("pooler.", "embeddings.position_ids"))
    }
    model.load_state_dict(state, strict=True)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    logger.info("loaded BERT encoder from %s", folder)
    return model.eval(), tokenizer
