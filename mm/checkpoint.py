"""Checkpoint directories, one format for both model kinds (the embedder of :mod:`mm.model` and the LM of
:mod:`mm.lm`).

```
<dir>/config.json        the model's config (``ModelConfig`` or ``LMConfig`` as JSON)
<dir>/model.safetensors  its weights (what each kind stores: see ``save_model`` and ``save_lm``)
<dir>/quantization.json  a quantized checkpoint only: the ``QuantSpec`` and the replaced module names
```

The model modules own which tensors go in and how a config reads; this module owns the files: where a
name or path leads, and writing them crash-safely (:mod:`mm.atomic`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

from mm.atomic import atomic_write, atomic_write_text
from mm.errors import ConfigError
from mm.quantize import QuantSpec, quantize_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
QUANT_FILE = "quantization.json"

C = TypeVar("C")


def resolve_checkpoint(
    name_or_path: str | Path,
    from_json: Callable[[Path], C],
    named: Iterable[Path],
    unknown: str,
    what: str = "a checkpoint directory",
) -> tuple[C, Path | None]:
    """The config ``name_or_path`` names, and its checkpoint directory when it has weights to load.

    ``name_or_path``: a checkpoint directory (its weights are used when it holds them), a config JSON file,
    or a name, looked up in ``named`` in order (a directory holding ``config.json`` is a checkpoint, a
    ``.json`` file a bare config). ``unknown``: the message when nothing matches; ``what`` names a
    checkpoint directory in the message for one without a config.
    """
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / CONFIG_FILE).exists():
            raise ConfigError(f"{p} holds no {CONFIG_FILE}; {what} needs it and {WEIGHTS_FILE}")
        return from_json(p / CONFIG_FILE), p if (p / WEIGHTS_FILE).exists() else None
    if p.suffix == ".json" and p.exists():
        return from_json(p), None
    for cand in named:
        if cand.suffix == ".json":
            if cand.exists():
                return from_json(cand), None
        elif (cand / CONFIG_FILE).exists():
            return from_json(cand / CONFIG_FILE), cand
    raise ConfigError(unknown)


def save_checkpoint(out_dir: str | Path, state: dict[str, Tensor], config: dict[str, Any], name: str) -> Path:
    """Write ``model.safetensors`` (``state``) and then ``config.json`` into ``out_dir``, each atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "name": name})
    )
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint directory, or of its weights file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise ConfigError(f"no weights at {path}; expected a directory holding {WEIGHTS_FILE}")
    return load_file(str(path))


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
