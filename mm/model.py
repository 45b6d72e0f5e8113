"""The multimodal model, its numpy-facing embedder, and the one factory ``create_model``.

Data flow (per modality m): raw media -> ``encoders[m].prepare`` (CPU decode) -> ``encoders[m]`` ->
tokens (B, T, C_m) -> ``in_proj[m]`` + sinusoidal positions -> shared ``Backbone`` -> masked mean pool
-> ``out_proj`` (+ a linear map of the encoder's pooled features, which keeps the frozen encoders'
semantics reachable from step one) -> L2-normalised (B, E) vector in the shared space.

Index letters: b batch, t tokens, c encoder width, d backbone width, e embedding width.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mm.atomic import atomic_write_text
from mm.backbone import Backbone, BackboneOutput, l2_normalize, masked_mean, sinusoidal_positions
from mm.calibration import Calibration
from mm.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    apply_checkpoint_quantization,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from mm.config import ModelConfig
from mm.encoders import EncoderOutput, build_audio_encoder, build_image_encoder, build_text_encoder
from mm.errors import ConfigError
from mm.media import MediaReader

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


class MultimodalModel(nn.Module):
    """Encoders + shared D-MoE/AAM backbone + projection into one embedding space."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.backbone.dim, cfg.embed_dim
        builders = {
            "text": lambda: build_text_encoder(cfg.text, cfg.text.pretrained),
            "image": lambda: build_image_encoder(cfg.image, cfg.image.pretrained),
            "audio": lambda: build_audio_encoder(cfg.audio),
        }
        self.encoders = nn.ModuleDict({m: builders[m]() for m in cfg.modalities})
        if cfg.head == "backbone":
            self.in_proj = nn.ModuleDict({m: nn.Linear(enc.out_dim, d) for m, enc in self.encoders.items()})
            self.backbone = Backbone(cfg.backbone)
            self.out_proj = nn.Linear(d, e, bias=False)
        elif not cfg.residual_pooled:
            raise ConfigError('head="linear" needs residual_pooled=true (the linear map is the whole model)')
        if cfg.residual_pooled:
            if cfg.head == "backbone":
                # Start as the linear probe on the encoders' pooled features; the backbone learns a residual.
                nn.init.zeros_(self.out_proj.weight)
            self.pooled_proj = nn.ModuleDict(
                {m: nn.Linear(enc.out_dim, e, bias=False) for m, enc in self.encoders.items()}
            )
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / cfg.init_temperature))))

    def embed(
        self, modality: str, feats: EncoderOutput, pooled_drop: float = 0.0, detach_pooled: bool = False
    ) -> tuple[Tensor, BackboneOutput | None]:
        """Encoder outputs -> (B, E) normalised embeddings (and the backbone's output for its stats).

        ``pooled_drop`` (training only): the probability that a sample's pooled-feature residual is left
        out, so that the backbone path must stand on its own (a path drop, as in stochastic depth).
        ``detach_pooled`` (training only): no gradient flows back through the pooled residual, so the loss
        on this embedding trains the backbone path only (the trainer's ``pooled_probe``).
        """
        if self.cfg.head == "linear":
            return l2_normalize(self.pooled_proj[modality](feats.pooled.float())), None
        tokens, mask = feats.tokens, feats.mask  # (B, T, C), (B, T)
        limit = self.cfg.backbone.max_tokens
        if tokens.shape[1] > limit:
            tokens, mask = tokens[:, :limit], mask[:, :limit]
        x = self.in_proj[modality](tokens.float())  # (B, T, D)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        out = self.backbone(x, mask, modality)
        z = self.out_proj(masked_mean(out.hidden, mask))  # (B, E)
        if self.cfg.residual_pooled:
            res = self.pooled_proj[modality](feats.pooled.float())  # (B, E)
            if detach_pooled:
                res = res.detach()
            if self.training and pooled_drop > 0:
                keep = torch.rand(res.shape[0], 1, device=res.device) >= pooled_drop  # (B, 1)
                res = res * keep
            z = z + res
        return l2_normalize(z), out

    def encode_batch(self, modality: str, batch: dict[str, Tensor]) -> Tensor:
        """A prepared batch (from ``encoders[modality].prepare``) -> (B, E) normalised embeddings."""
        return self.embed(modality, self.encoders[modality](batch))[0]


class MultimodalEmbedder:
    """The numpy-facing embedder the index and service use (``index.protocol.Embedder``)."""

    def __init__(self, model: MultimodalModel, name: str = "custom", batch_size: int = 32):
        self.model = model.eval()
        self.name = name
        self.batch_size = batch_size
        self._model_id: str | None = None
        # raw cosine -> P(relevant) per modality pair (identity until a checkpoint brings a fitted one)
        self.calibration = Calibration()
        # speech recogniser the service attaches (decoded clip -> {"text", "language"} | None); spoken
        # queries are searched by their clip and transcript fused (service.search)
        self.transcribe: Callable[[Any], dict[str, str] | None] | None = None
        # Files decode for this model as its encoders would (audio at their rate, cropped to their window),
        # in ingest's worker threads and the service's uploads alike (index.protocol.MediaReader).
        audio = model.cfg.audio
        self.media = (
            # the rate the audio encoder reads (44.1 kHz with the sfx tower), not only the log-mel's
            MediaReader(
                sample_rate=getattr(model.encoders["audio"], "sample_rate", audio.sample_rate),
                crop_seconds=audio.max_seconds,
            )
            if "audio" in model.encoders
            else MediaReader()
        )

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.model.cfg.modalities)

    @property
    def model_id(self) -> str:
        """Name plus a digest of the weights: collections refuse vectors from a different model."""
        if self._model_id is None:
            h = hashlib.sha256()
            for k, v in sorted(trainable_state_dict(self.model).items()):
                h.update(k.encode())
                h.update(v.detach().float().contiguous().numpy().tobytes())
            self._model_id = f"{self.name}:{h.hexdigest()[:12]}"
        return self._model_id

    def weights_changed(self) -> None:
        """Call after changing the model's weights in place (an adapter loaded, a fine-tune): ``model_id``
        is then computed again from the new weights, so collections see a different model."""
        self._model_id = None

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        return self._encode("text", list(texts))

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        return self._encode("image", list(images))

    def encode_audio(self, clips: Sequence[Any]) -> np.ndarray:
        return self._encode("audio", list(clips))

    def encode(self, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        return self._encode(modality, list(inputs))

    @torch.inference_mode()
    def _encode(self, modality: str, inputs: list[Any]) -> np.ndarray:
        if modality not in self.model.encoders:
            raise ValueError(f"this model does not encode {modality!r}; it encodes {list(self.modalities)}")
        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        enc = self.model.encoders[modality]
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            z = self.model.encode_batch(modality, enc.prepare(chunk))
            out[start : start + len(chunk)] = z.float().numpy()
        return out


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """State dict without frozen pretrained encoders (they load from their packages, not our checkpoint).

    Any module under ``encoders`` may be external (a tower of a combined audio encoder, for one).
    """
    frozen = [
        f"encoders.{n}."
        for n, mod in model.encoders.named_modules()
        if n and getattr(mod, "external_weights", False)
    ]
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in frozen)}


def save_model(
    model: MultimodalModel, out_dir: str | Path, cast: Callable[[str, Tensor], Tensor] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (frozen packaged encoders excluded) atomically.

    ``cast(name, tensor)`` may change how a tensor is stored (e.g. float16 on disk; loading copies it
    back into the model's own dtype).
    """
    state = {k: v.detach().contiguous().clone() for k, v in trainable_state_dict(model).items()}
    if cast is not None:
        state = {k: cast(k, v) for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = external_weights_info(model)
    if info:  # written before config.json, which marks the checkpoint complete
        atomic_write_text(out / EXTERNAL_WEIGHTS_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    else:
        (out / EXTERNAL_WEIGHTS_FILE).unlink(missing_ok=True)
    return save_checkpoint(out, state, model.cfg.to_dict(), model.cfg.name)


EXTERNAL_WEIGHTS_FILE = "external_weights.json"


def external_weights_info(model: nn.Module) -> dict[str, Any]:
    """Where each frozen encoder's weights come from (package, version, sha256 of every file), by module.

    Saved beside a checkpoint and compared on load (:func:`check_external_weights`), so a checkpoint
    trained on one package's weights is never served on top of another's.
    """
    return {
        f"encoders.{n}": dict(mod.weights_info)
        for n, mod in model.encoders.named_modules()
        if n and getattr(mod, "external_weights", False) and hasattr(mod, "weights_info")
    }


def check_external_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Raise ConfigError when the checkpoint recorded other external weights than the model loaded."""
    p = Path(checkpoint)
    f = (p if p.is_dir() else p.parent) / EXTERNAL_WEIGHTS_FILE
    if not f.is_file():
        return  # saved before weights were recorded, or no external weights
    recorded = json.loads(f.read_text())
    current = external_weights_info(model)
    for name, rec in recorded.items():
        if current.get(name) != rec:
            raise ConfigError(
                f"checkpoint {p} was trained with {name} weights {json.dumps(rec)[:300]}, but this model "
                f"loads {json.dumps(current.get(name))[:300]}; install the recorded package versions"
            )


def load_weights(model: MultimodalModel, path: str | Path) -> None:
    check_external_weights(model, path)
    state = read_weights(path)
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)


def available_configs() -> list[str]:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    names += sorted(p.name for p in CHECKPOINT_DIR.glob("*") if (p / CONFIG_FILE).exists())
    return names


def resolve(name_or_path: str | Path) -> tuple[ModelConfig, Path | None]:
    """A config name, a shipped checkpoint name, a checkpoint directory or a config JSON file."""
    name = str(name_or_path)
    return resolve_checkpoint(
        name_or_path,
        ModelConfig.from_json,
        [CHECKPOINT_DIR / name, CONFIG_DIR / f"{name}.json"],
        f"unknown model {name!r}: use one of {available_configs()} or a checkpoint directory",
    )


def create_model(
    name_or_path: str | Path = "default",
    pretrained: str | Path | bool | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> MultimodalEmbedder:
    """Build the embedder for a named config/checkpoint or a path.

    ``pretrained``: ``None`` loads the checkpoint's weights when there is one; ``False`` keeps random
    weights; a path loads weights from that checkpoint directory or safetensors file.
    """
    cfg, ckpt = resolve(name_or_path)
    cfg = cfg.with_overrides(overrides)
    # Fixed-seed initialisation: an untrained config gives the same weights (and model_id) every time,
    # so a collection indexed with it can be searched with it later; the caller's RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultimodalModel(cfg)
    weights = ckpt if pretrained is None else (None if pretrained is False else Path(str(pretrained)))
    if weights is not None:
        apply_checkpoint_quantization(model, weights)  # a quantized checkpoint: swap in its layer types
        load_weights(model, weights)
    name = Path(str(name_or_path)).name if Path(str(name_or_path)).exists() else str(name_or_path)
    embedder = MultimodalEmbedder(model, name=name)
    if weights is not None:
        embedder.calibration = Calibration.load_dir(weights if weights.is_dir() else weights.parent)
    return embedder


def default_model_name() -> str:
    """The shipped trained default when present, else the untrained ``small`` config."""
    return "default" if (CHECKPOINT_DIR / "default" / WEIGHTS_FILE).exists() else "small"
