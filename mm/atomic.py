"""Crash-safe file writes for ``mm`` (checkpoints, adapters, training state, feature caches).

A save either leaves the old file or the new one, never a torn mix: write a temp file in the same
directory, fsync it, ``os.replace`` it over the target, then fsync the directory so the rename itself
survives a power cut.

``index/atomic.py`` holds the same functions for ``index`` and ``service``: the layer rule keeps
``mm`` and ``index`` from importing each other, and the library has no third package below both, so
there are exactly two copies; ``tests/test_atomic.py`` fails if they drift apart. Standard library only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """Put the finished file ``tmp`` in place of ``path`` (same directory) so that it survives a crash:
    fsync its data, ``os.replace`` it over ``path``, fsync the directory. For a writer that learns the
    final name only after writing (a content-addressed upload); everything else uses :func:`atomic_write`.
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` to fill a temp file next to ``path``, then atomically put it in place."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
