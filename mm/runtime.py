"""Process-wide runtime settings for the entry points (CLI, service, benchmarks): the C allocator.

A forward pass over a batch of images allocates and frees activations of tens to hundreds of MB. glibc's
``malloc`` serves every block above its mmap threshold (at most 32 MB, adapted at run time) with a fresh
``mmap`` and returns it with ``munmap`` on free, so every batch faults its activations in again page by
page: one EfficientNet-Lite0 batch of 32 images took ~10,000 minor page faults per image and spent a
third of its CPU time in the kernel. :func:`tune_allocator` raises the mmap threshold and the heap-trim
threshold to :data:`KEEP_BYTES`, so freed blocks below that stay in the heap and are reused without
faults (image encoding 1.4-1.7x faster on the 2-core reference machine; see ``docs/results.md``). The
cost is that the heap keeps up to ``KEEP_BYTES`` of freed memory instead of returning it to the system,
as jemalloc and tcmalloc also do. Set ``MM_TUNE_MALLOC=0`` to keep glibc's defaults.

Only glibc is tuned; on other C libraries the call does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

KEEP_BYTES = 1 << 30  # blocks below this come from the heap; up to this much free memory is kept
ENV_SWITCH = "MM_TUNE_MALLOC"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3

_tuned: bool | None = None  # the outcome of the first call; later calls return it


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap for reuse. Returns whether the allocator is tuned.

    Idempotent and cheap; does nothing (returns False) when ``MM_TUNE_MALLOC=0`` or off glibc.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
        log.debug("allocator left at glibc defaults (%s=0)", ENV_SWITCH)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    value = ctypes.c_int(KEEP_BYTES)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, value) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, value) == 1
    if not ok:
        log.warning("mallopt refused the allocator settings; keeping glibc's defaults")
    _tuned = ok
    return ok
