"""Which quantized-kernel engine packs our int8 weights.

PyTorch's quantized ops take weights "prepacked" for one engine (FBGEMM, oneDNN, ...); a packed weight
keeps its engine, so the global ``torch.backends.quantized.engine`` only matters while packing. On x86,
oneDNN's int8 kernels use VNNI / AMX and measured 2x faster than FBGEMM's for dynamic linears and 2-4x
faster than fp32 (``quantized::linear_dynamic``, 1 thread, shapes of MiniLM and the backbone), and FBGEMM's
static convolutions were slower than fp32 here while oneDNN's were ~7x faster. So we pack for oneDNN
where the build has it, else for the default engine.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

ONEDNN = "onednn"
_lock = threading.Lock()


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized kernels (x86 builds do)."""
    return ONEDNN in torch.backends.quantized.supported_engines


def packing_engine() -> str:
    """The engine int8 weights are packed for: oneDNN where available, else the build's default."""
    return ONEDNN if onednn_available() else torch.backends.quantized.engine


@contextlib.contextmanager
def engine(name: str | None = None) -> Iterator[None]:
    """Pack weights for ``name`` (default: :func:`packing_engine`) inside the block; restores the old one."""
    with _lock:
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = name or packing_engine()
        try:
            yield
        finally:
            torch.backends.quantized.engine = old
