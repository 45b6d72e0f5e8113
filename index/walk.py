"""Listing the files under a folder for ingest, with every path resolved before it is trusted.

A symlink is followed to where it really leads: a target outside the allowed roots (when the caller
gives roots, as the server does with ``MM_ALLOWED_ROOTS``) is refused, a dangling link or a loop is
reported, each as a per-item :class:`~index.types.ItemError` (never skipped silently), and so is a pipe,
socket or device file (never opened: reading a pipe would block the ingest). Hidden names
(``.*``) are skipped, and a folder reached twice (through a link) is walked once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from index.types import ItemError

OUTSIDE = "symlink leads outside the allowed roots"
DANGLING = "broken symlink: its target does not exist"
LOOP = "symlink loop"
SPECIAL = "not a regular file (a pipe, socket or device): not read"


def inside(path: Path, roots: Sequence[Path] | None) -> bool:
    """Whether the resolved ``path`` lies under one of the (resolved) ``roots``; always when roots is None."""
    if roots is None:
        return True
    return any(path == r or r in path.parents for r in roots)


def resolve_roots(roots: Sequence[str | Path] | None) -> list[Path] | None:
    return None if roots is None else [Path(r).expanduser().resolve() for r in roots]


def resolve_link(path: Path) -> tuple[Path | None, str]:
    """``(target, "")`` for a symlink that resolves, else ``(None, why)`` (dangling, loop, unreadable)."""
    try:
        return path.resolve(strict=True), ""
    except FileNotFoundError:
        return None, DANGLING
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return None, LOOP
    except OSError as e:
        return None, LOOP if e.errno == errno.ELOOP else f"cannot resolve symlink: {e.strerror}"


def walk(folder: Path, roots: Sequence[Path] | None, errors: list[ItemError]) -> list[Path]:
    """Resolved paths of the regular files under ``folder`` (itself resolved and allowed), name order.

    ``roots`` must be resolved (:func:`resolve_roots`). Problems are appended to ``errors`` under the
    path as walked (the link's own path, never its target: a refused target's name is not echoed back).
    """
    files: list[Path] = []
    walked: set[Path] = set()
    chain: set[Path] = set()  # the folders from ``folder`` down to the one being listed (a link to one loops)

    def listing(shown: Path, real: Path) -> Iterator[os.DirEntry[str]]:
        walked.add(real)
        chain.add(real)
        try:
            with os.scandir(real) as it:
                return iter(sorted(it, key=lambda e: e.name))
        except OSError as e:
            errors.append(ItemError(str(shown), f"cannot list folder: {e.strerror}"))
            return iter(())

    # Depth first in name order, with a stack instead of recursion: 1,500 nested folders fit in PATH_MAX,
    # more than Python's recursion limit.
    stack = [(folder, folder, listing(folder, folder))]
    while stack:
        shown, real, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            chain.discard(real)
            continue
        if entry.name.startswith("."):
            continue
        path = shown / entry.name
        target = real / entry.name  # real already: ``real`` is resolved and this entry is no link
        if entry.is_symlink():
            resolved, why = resolve_link(target)
            if resolved is None:
                errors.append(ItemError(str(path), why))
                continue
            if not inside(resolved, roots):
                errors.append(ItemError(str(path), OUTSIDE))
                continue
            target = resolved
        try:
            is_dir = target.is_dir()
        except OSError as e:
            errors.append(ItemError(str(path), f"cannot stat: {e.strerror}"))
            continue
        if is_dir:
            if target in chain:
                errors.append(ItemError(str(path), f"{LOOP}: leads back into a folder above it"))
            elif target not in walked:  # a second way into a folder already walked adds nothing
                stack.append((path, target, listing(path, target)))
        elif target.is_file():
            files.append(target)
        else:
            errors.append(ItemError(str(path), SPECIAL))
    return files
