"""Image encoders: pretrained EfficientNet-Lite, open_clip's visual tower, or a from-scratch ViT patch stem.

``prepare(images)`` takes paths, bytes or PIL images, decodes them safely with :func:`mm.media.load_image`,
resizes the shorter side and centre-crops to a square, and returns ``{"pixels": (B, 3, S, S) float}``
normalised for the encoder. All images have the same size, so ``collate`` is a plain concatenation.

Index letters: b batch, c channels, h/w feature-map grid, t tokens (= h * w, row-major).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mm.config import ImageEncoderConfig
from mm.encoders.base import Encoder, EncoderOutput, create_open_clip, masked_mean

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pixels(
    raw: list[Any], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:  # -> (B, 3, S, S)
    """Decode, resize the shorter side to ``size`` (bicubic), centre-crop, scale to [0, 1] and normalise."""
    from PIL import Image

    from mm.media import load_image

    if isinstance(raw, (str, Path, bytes)) or not isinstance(raw, (list, tuple)):
        raise TypeError("prepare expects a list of images (paths, bytes or PIL images); wrap one in a list")
    out = np.empty((len(raw), size, size, 3), dtype=np.float32)
    for i, src in enumerate(raw):
        img = load_image(src)
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out[i] = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(out).permute(0, 3, 1, 2)  # (B, 3, S, S)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def _grid_tokens(fmap: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> tokens (B, H*W, C) row-major, all-True mask (B, H*W)."""
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, T, C)
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return tokens, mask


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite0/1/2 on ImageNet (frozen): the last feature map as tokens, (B, (S/32)^2, 1280):
    (B, 49, 1280) for Lite0 at 224 px, (B, 64, 1280) for Lite1 at 240, (B, 81, 1280) for Lite2 at 260."""

    def __init__(self, cfg: ImageEncoderConfig, pretrained: str | None = None):
        super().__init__()
        from mm.encoders.efficientnet_lite import LITE_MEAN, LITE_STD, efficientnet_lite, fold_batchnorms

        self.variant = cfg.kind.removeprefix("efficientnet_")  # "lite0" | "lite1" | "lite2"
        self.image_size = cfg.image_size
        self.mean, self.std = LITE_MEAN, LITE_STD
        self.net = efficientnet_lite(self.variant, pretrained if pretrained is not None else "default")
        self.out_dim = self.net.head_dim
        self.external_weights = True
        self.freeze()
        fold_batchnorms(self.net)  # frozen for good: BatchNorms folded into the convs (exact, faster)
        # channels_last lets oneDNN run the depthwise/1x1 convs directly: ~1.6x faster on CPU here.
        self.net.to(memory_format=torch.channels_last)
        self.int8: nn.Module | None = None  # static INT8 features (quantize_convs), not state

    def quantize_convs(self, calibration: dict[str, Any] | None = None) -> bool:
        """Run the frozen network in static INT8 from now on (oneDNN); False if this torch lacks the kernels.

        ``calibration``: ``Calibration.to_dict()`` of :mod:`mm.encoders.efficientnet_int8`; default: the
        one shipped for this variant (ValueError naming ``mm quantize --calibrate`` when none ships).
        """
        from mm.encoders.efficientnet_int8 import (
            Calibration,
            Int8EfficientNetFeatures,
            default_calibration,
            int8_convs_available,
        )

        if not int8_convs_available():
            logger.warning("no oneDNN quantized convolutions in this torch build: EfficientNet stays fp32")
            return False
        cal = (
            Calibration.from_dict(calibration)
            if calibration is not None
            else default_calibration(self.variant)
        )
        self.int8 = Int8EfficientNetFeatures(self.net, cal)
        return True

    def calibrate_convs(self, images: list[Any], batch_size: int = 32) -> Any:
        """Activation ranges and depthwise input means of the fp32 network on ``images`` (a Calibration)."""
        from mm.encoders.efficientnet_int8 import calibrate

        batches = (
            self.prepare(images[s : s + batch_size])["pixels"] for s in range(0, len(images), batch_size)
        )
        return calibrate(self.net, batches)

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        return {"pixels": to_pixels(raw, self.image_size, self.mean, self.std)}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        pixels = batch["pixels"].contiguous(memory_format=torch.channels_last)
        net = self.int8 if self.int8 is not None else self.net.features
        fmap = net(pixels)  # (B, 1280, S/32, S/32)
        tokens, mask = _grid_tokens(fmap)  # (B, T, 1280)
        return EncoderOutput(tokens, mask, fmap.mean(dim=(2, 3)))


class PatchImageEncoder(Encoder):
    """From scratch ViT stem: Conv2d(3, C, p, stride=p) + learned position embedding -> (B, (S/p)^2, C)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        if cfg.image_size % cfg.patch:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch {cfg.patch}")
        self.image_size = cfg.image_size
        self.out_dim = cfg.dim
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)
        n = (cfg.image_size // cfg.patch) ** 2
        self.pos = nn.Parameter(torch.randn(n, cfg.dim) * 0.02)
        self.norm = nn.LayerNorm(cfg.dim)
        if not cfg.trainable:
            self.freeze()

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        return {"pixels": to_pixels(raw, self.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        pixels = batch["pixels"]  # (B, 3, S, S)
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"expected {self.image_size}px images, got {tuple(pixels.shape[-2:])}; use prepare()"
            )
        tokens, mask = _grid_tokens(self.proj(pixels))  # (B, T, C)
        tokens = self.norm(tokens + self.pos)
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))


class OpenCLIPImageEncoder(Encoder):
    """open_clip's visual tower: per-patch tokens for ViTs, else its pooled output as a single token."""

    def __init__(self, cfg: ImageEncoderConfig, pretrained: str | None = None):
        super().__init__()
        model = create_open_clip(cfg.open_clip_model, pretrained)
        self.visual = model.visual
        size = getattr(self.visual, "image_size", cfg.image_size)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        if self.image_size != cfg.image_size:
            logger.warning(
                "open_clip %s expects %dpx images; using that instead of image_size=%d",
                cfg.open_clip_model,
                self.image_size,
                cfg.image_size,
            )
        self.has_tokens = hasattr(self.visual, "output_tokens")
        if self.has_tokens:
            self.visual.output_tokens = True
            self.out_dim = int(self.visual.transformer.width)
        else:
            self.out_dim = int(self.visual.output_dim)
        mean = getattr(self.visual, "image_mean", None) or CLIP_MEAN
        std = getattr(self.visual, "image_std", None) or CLIP_STD
        self.mean, self.std = tuple(mean), tuple(std)
        self.external_weights = pretrained is not None
        if pretrained is not None or not cfg.trainable:
            self.freeze()

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        return {"pixels": to_pixels(raw, self.image_size, self.mean, self.std)}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        pixels = batch["pixels"]  # (B, 3, S, S)
        if self.has_tokens:
            _, tokens = self.visual(pixels)  # (B, T, C)
        else:
            tokens = self.visual(pixels).unsqueeze(1)  # (B, 1, C)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))


def build_image_encoder(cfg: ImageEncoderConfig, pretrained: str | None = None) -> Encoder:
    """Image encoder for ``cfg.kind``; ``pretrained`` overrides the weights (.pth file or open_clip tag)."""
    if cfg.kind in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        return EfficientNetLiteEncoder(cfg, pretrained)
    if cfg.kind == "open_clip":
        return OpenCLIPImageEncoder(cfg, pretrained)
    if cfg.kind == "patch":
        if pretrained is not None:
            raise ValueError(
                "image kind 'patch' is trained from scratch; load its weights with the model checkpoint"
            )
        return PatchImageEncoder(cfg)
    raise ValueError(
        f"unknown image encoder kind {cfg.kind!r}; choose 'efficientnet_lite0', 'efficientnet_lite1', "
        "'efficientnet_lite2', 'open_clip' or 'patch'"
    )
