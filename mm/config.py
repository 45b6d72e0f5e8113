"""Typed, frozen configuration dataclasses for every model component.

Named JSON configs live in ``mm/configs/`` (``tiny`` for tests, ``small`` for the shipped default);
``ModelConfig.from_dict`` / ``to_dict`` convert between the two. Sizes live in JSON, not in code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mm.atomic import atomic_write_text

Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[Modality, ...] = ("text", "image", "audio")


@dataclass(frozen=True)
class MoEConfig:
    dim: int = 256  # token width D (set from the backbone)
    n_experts: int = 16  # routed experts E
    hidden: int = 512  # SwiGLU hidden width per expert
    routing: Literal["topk", "topp"] = "topp"  # fixed top-k or dynamic top-p
    k: int = 2  # experts per token for top-k; upper bound k_max for top-p
    top_p: float = 0.5  # probability mass a token's chosen experts must reach (top-p routing)
    gate_hidden: int = 64  # width of the gating network's light feature extractor
    shared_expert: bool = True  # one always-on expert (DeepSeek-V3)
    collaboration: bool = True  # selected expert outputs attend to each other before combining
    bias_update_gamma: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3)
    seq_balance_weight: float = 1e-4  # tiny sequence-wise balance loss; 0 disables
    dropout: float = 0.0


@dataclass(frozen=True)
class AttentionConfig:
    dim: int = 256  # token width D (set from the backbone)
    n_heads: int = 4
    window: int = 64  # local sliding window: each token sees +-window//2 neighbours
    n_global: int = 4  # learned global tokens that see and are seen by all
    gate: Literal["sequence", "token"] = "sequence"  # granularity of the local/global mix
    impl: Literal["auto", "flex", "chunked"] = "auto"  # kernel for the sparse paths
    dropout: float = 0.0


@dataclass(frozen=True)
class BackboneConfig:
    dim: int = 256  # token width D
    depth: int = 4  # number of (AAM, D-MoE) blocks
    max_tokens: int = 4096  # longest token sequence accepted (longer inputs are cropped)
    pool: Literal["mean", "cls"] = "mean"
    moe_every: int = 1  # D-MoE in every n-th block, dense SwiGLU FFN elsewhere
    ffn: Literal["moe", "dense"] = "moe"  # ablation: dense FFN everywhere
    attention: Literal["aam", "full"] = "aam"  # ablation: full attention everywhere
    moe: MoEConfig = field(default_factory=MoEConfig)
    attn: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass(frozen=True)
class TextEncoderConfig:
    # minilm: all-MiniLM-L6-v2 (English); use_multilingual: USE multilingual v3 (16 languages, 512-d);
    # e5_small: multilingual-e5-small (~100 languages, 384-d); all three frozen, from packaged weights
    kind: Literal["minilm", "use_multilingual", "e5_small", "open_clip", "bpe"] = "bpe"
    dim: int = 256  # width of the tokens the encoder emits (before the backbone's input projection)
    max_len: int = 64  # tokens per text
    open_clip_model: str = "ViT-B-32"  # architecture name for kind="open_clip"
    trainable: bool = True  # pretrained encoders (minilm, open_clip) are frozen by default
    pretrained: str | None = None  # local folder/file or open_clip tag; None = the packaged/random weights
    layers: int = 0  # from-scratch transformer layers on top of BPE embeddings (0: embeddings only)


@dataclass(frozen=True)
class ImageEncoderConfig:
    # efficientnet_lite0/1/2: frozen, packaged ImageNet weights; native image_size 224 / 240 / 260
    kind: Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "open_clip", "patch"] = (
        "patch"
    )
    dim: int = 256  # width of the emitted tokens
    image_size: int = 224  # input resolution (square)
    patch: int = 16  # patch size for kind="patch"
    open_clip_model: str = "ViT-B-32"
    trainable: bool = True
    pretrained: str | None = (
        None  # local .pth/checkpoint or open_clip tag; None = the packaged/random weights
    )


AudioKind = Literal["logmel_patch", "whisper", "sfx"]


@dataclass(frozen=True)
class AudioEncoderConfig:
    # logmel_patch: log-mel patches, trained from scratch; whisper: Whisper's encoder (speech, frozen by
    # default, packaged weights); sfx: the aisfx sound-effects CNN (frozen, packaged weights). A list
    # ("kind": ["whisper", "sfx"]) runs each and feeds all their tokens to the backbone.
    kind: AudioKind | tuple[AudioKind, ...] = "logmel_patch"
    dim: int = 256  # width of the emitted tokens (logmel_patch; whisper and sfx have their own widths)
    sample_rate: int = 16000  # everything is resampled to this rate, mono
    n_mels: int = 64
    n_fft: int = 400
    hop: int = 160  # 10 ms at 16 kHz
    patch_time: int = 8  # frames per patch along time
    patch_freq: int = 16  # mel bins per patch
    max_seconds: float = 30.0  # longer clips are cropped (centre); whisper reads at most 30 s
    whisper_model: Literal["base", "tiny.en"] = "base"  # packaged Whisper (base: ~99 languages)
    whisper_pretrained: str | None = None  # CTranslate2 model.bin/folder, HF folder or openai .pt instead
    whisper_trainable: bool = False  # fine-tune Whisper's encoder with the model (frozen by default)
    sfx_pretrained: str | None = None  # an aisfx-format checkpoint instead of the packaged one

    @property
    def kinds(self) -> tuple[str, ...]:
        """The audio towers in order (a single kind is a one-tower tuple)."""
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 256  # shared embedding space width
    modalities: tuple[Modality, ...] = MODALITIES
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    residual_pooled: bool = True  # add a linear map of the encoder's pooled features to the output
    head: Literal["backbone", "linear"] = "backbone"  # "linear": pooled features + linear map only (baseline)
    init_temperature: float = 0.07

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _build(cls, d)

    def with_overrides(self, overrides: dict[str, Any] | None) -> ModelConfig:
        """Apply nested overrides, e.g. ``{"backbone": {"depth": 2}}`` or ``{"backbone.depth": 2}``."""
        if not overrides:
            return self
        d = self.to_dict()
        for key, value in overrides.items():
            _merge(d, key.split(".") if "." in key else [key], value)
        return ModelConfig.from_dict(d)

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _merge(d: dict[str, Any], keys: list[str], value: Any) -> None:
    head, rest = keys[0], keys[1:]
    if head not in d:
        raise ValueError(f"unknown config key {head!r}; valid keys: {sorted(d)}")
    if rest:
        _merge(d[head], rest, value)
    elif isinstance(value, dict) and isinstance(d[head], dict):
        for k, v in value.items():
            _merge(d[head], [k], v)
    else:
        d[head] = value


def _build(cls: type, d: dict[str, Any]) -> Any:
    """Build a (nested) frozen dataclass from a dict, rejecting unknown keys with a clear message."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None and isinstance(value, dict):
            value = _build(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_NESTED: dict[tuple[str, str], type] = {
    ("ModelConfig", "text"): TextEncoderConfig,
    ("ModelConfig", "image"): ImageEncoderConfig,
    ("ModelConfig", "audio"): AudioEncoderConfig,
    ("ModelConfig", "backbone"): BackboneConfig,
    ("BackboneConfig", "moe"): MoEConfig,
    ("BackboneConfig", "attn"): AttentionConfig,
}
