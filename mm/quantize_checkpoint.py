"""Quantized checkpoints: quantize a model (:mod:`mm.quantize`) and write it as a checkpoint directory.

A quantized checkpoint is an ordinary one (:mod:`mm.checkpoint`) plus ``quantization.json``; loading it
needs nothing from here (``create_model`` re-applies the spec before the weights load).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mm.atomic import atomic_write_text
from mm.checkpoint import QUANT_FILE, read_spec
from mm.model import create_model, resolve, save_model
from mm.quantize import QuantSpec, calibrate_convs, quantize_model


def save_quantized(model: nn.Module, spec: QuantSpec, out_dir: str | Path) -> Path:
    """Write a quantized model as a checkpoint: config.json, model.safetensors, quantization.json."""
    if not spec.modules:
        raise ValueError("spec lists no quantized modules: pass the spec quantize_model returned")
    cast = _residuals_in_fp16(spec.modules) if spec.fp16_residuals else None
    out = save_model(model, out_dir, cast)  # type: ignore[arg-type]
    atomic_write_text(out / QUANT_FILE, json.dumps(spec.to_dict(), indent=2) + "\n")
    return out


def _residuals_in_fp16(modules: tuple[str, ...]) -> Callable[[str, Tensor], Tensor]:
    """A ``save_model`` cast storing the unquantized float32 tensors (not scalars) in float16.

    Loading upcasts them: ``load_state_dict`` copies into the model's float32 parameters and buffers.
    """
    quantized = tuple(f"{m}." for m in modules)

    def cast(name: str, t: Tensor) -> Tensor:
        keep = name.startswith(quantized) and not name.endswith(".bias")  # codes and scales stay as they are
        return t.half() if t.dtype == torch.float32 and t.numel() > 1 and not keep else t

    return cast


def quantize_checkpoint(
    model: str | Path,
    mode: str,
    out_dir: str | Path,
    group_size: int = 64,
    encoders: bool | None = None,
    calibration_images: Sequence[str | Path] | None = None,
) -> tuple[Path, QuantSpec]:
    """Load ``model`` (a name or checkpoint), quantize it and save it to ``out_dir``.

    ``calibration_images``: recalibrate the static INT8 convolutions on these (int8 only); the result is
    stored in ``quantization.json``. Default: the shipped calibration of the packaged image encoder.
    """
    spec = QuantSpec(mode=mode, group_size=group_size, encoders=encoders)  # type: ignore[arg-type]
    if calibration_images and not spec.static_convs:
        raise ValueError("calibration images are for int8 with quantized encoders (static INT8 convolutions)")
    ckpt = resolve(model)[1]
    if ckpt is not None and read_spec(ckpt) is not None:
        raise ValueError(f"{model} is already quantized; quantize the fp32 checkpoint instead")
    emb = create_model(model)
    if calibration_images:
        spec = dataclasses.replace(spec, calibration=calibrate_convs(emb.model, calibration_images))
    spec = quantize_model(emb.model, spec)
    return save_quantized(emb.model, spec, out_dir), spec
