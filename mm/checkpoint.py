"""Checkpoint directories, one format for both model kinds (the embedder of :mod:`mm.model` and the LM of
:mod:`mm.lm`).

```
<dir>/config.json        the model's config (``ModelConfig`` or ``LMConfig`` as JSON)
<dir>/model.safetensors  its weights (what each kind stores: see ``save_model`` and ``save_lm``)
<dir>/quantization.json  a quantized checkpoint only: the ``QuantSpec`` and the replaced module names
```

The model modules own which tensors go in and how a config reads; this module owns the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mm.quantize import QuantSpec, quantize_model

QUANT_FILE = "quantization.json"


def read_spec(checkpoint: str | Path) -> QuantSpec | None:
    """The quantization spec stored beside a checkpoint (a directory, or its weights file), or None."""
    p = Path(checkpoint)
    f = (p if p.is_dir() else p.parent) / QUANT_FILE
    if not p.exists() or not f.exists():
        return None
    try:
        return QuantSpec.from_dict(json.loads(f.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f} is not a valid quantization spec: {e}") from e


def apply_checkpoint_quantization(model: nn.Module, checkpoint: str | Path) -> QuantSpec | None:
    """Make ``model`` match a quantized checkpoint's layout before its weights load (no-op otherwise)."""
    spec = read_spec(checkpoint)
    if spec is not None:
        quantize_model(model, spec)
    return spec


def checkpoint_size_mb(path: str | Path) -> float:
    """Bytes on disk of a checkpoint directory (all files), in MB."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6
