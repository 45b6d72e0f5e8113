"""Crash-safe file writes and the locks that keep one writer and many readers apart.

A save either leaves the old file or the new one, never a torn mix: write a temp file in the same
directory, fsync it, ``os.replace`` it over the target, then fsync the directory so the rename itself
survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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


_TEMP_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp puts between the prefix and the suffix


def atomic_temp_files(*targets: str | Path) -> list[Path]:
    """Temp files :func:`atomic_write` left next to ``targets`` (a writer killed before its rename).

    Only names of exactly the form it makes (``.<name>.<8 random>.tmp``) match. Remove them only while
    holding the lock every writer of those targets holds, or a running write loses its file.
    """
    found: list[Path] = []
    for target in map(Path, targets):
        pattern = re.compile(rf"\.{re.escape(target.name)}\.{_TEMP_RANDOM}\.tmp")
        with contextlib.suppress(OSError):
            found += [p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file()]
    return sorted(set(found))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class FileLock:
    """An ``fcntl.flock`` on a lock file, re-entrant within one process (counted); exclusive by default.

    Other processes that take the same lock wait; the OS drops it if the holder dies, so a crash never
    leaves a stale lock behind. ``shared=True`` holders coexist with each other, and keep out an
    exclusive holder (e.g. uploads in progress against a sweep of unreferenced files).
    """

    def __init__(self, path: str | Path, *, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self._fd: int | None = None
        self._depth = 0
        self._mutex = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting, unless ``blocking`` is False); whether it was taken."""
        import fcntl

        with self._mutex:
            if self._depth == 0:
                fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
                mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
                try:
                    fcntl.flock(fd, mode if blocking else mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return False
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            return True

    def release(self) -> None:
        import fcntl

        with self._mutex:
            assert self._depth > 0, "FileLock released more often than acquired"
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RWLock:
    """Many concurrent readers or one writer (writer-preferring, so a stream of searches cannot starve it).

    FAISS searches may run in parallel, but not while the index is being mutated.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
