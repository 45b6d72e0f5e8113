"""Which quantized-kernel engine packs our int8 weights.

PyTorch's quantized ops take weights "prepacked" for one engine (FBGEMM, oneDNN, ...); a packed weight
keeps its engine, so the global ``torch.backends.quantized.engine`` only matters while packing. On x86,
oneDNN's int8 kernels use VNNI / AMX and measured 2x faster than FBGEMM's for dynamic linears and 2-4x
faster than fp32 (``quantized::linear_dynamic``, 1 thread, shapes of MiniLM and the backbone), and FBGEMM's
static convolutions were slower than fp32 here while oneDNN's were ~7x faster. But a oneDNN call has a
higher fixed cost: below ~256 rows (an MoE expert's share of a batch) FBGEMM's dynamic linear is faster
(16 x 256 -> 128: 47 us against 69 us). So convolutions pack for oneDNN, and dynamic linears pack for
both and pick per call by row count (:func:`linear_engine`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

ONEDNN = "onednn"
ONEDNN_MIN_ROWS = 256  # dynamic linears with fewer rows run on the default engine (lower fixed cost)
_lock = threading.Lock()


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized kernels (x86 builds do)."""
    return ONEDNN in torch.backends.quantized.supported_engines


@functools.cache
def default_engine() -> str:
    """The build's default quantized engine (FBGEMM-based "x86" or "fbgemm" on x86)."""
    return torch.backends.quantized.engine


def linear_engine(rows: int) -> str:
    """The engine a dynamic int8 linear over ``rows`` input rows should run on."""
    return ONEDNN if onednn_available() and rows >= ONEDNN_MIN_ROWS else default_engine()


def linear_engines() -> tuple[str, ...]:
    """Every engine :func:`linear_engine` may pick here."""
    return tuple(dict.fromkeys((linear_engine(0), linear_engine(ONEDNN_MIN_ROWS))))


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    """Pack weights for engine ``name`` inside the block; restores the previous engine after it."""
    with _lock:
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = old
