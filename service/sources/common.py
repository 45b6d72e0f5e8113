"""What every corpus source shares: the plan it hands the builder and the guard on what it may read.

A source scans one named package and returns a :class:`Plan`: manifest rows, files to copy, images to
render. The builder (``service.samples.build_corpus``) carries the plan out, reusing every output file
already in place. Every file a source reads goes through its :class:`PackageGuard`, which refuses paths
outside the package's allowed folders (``..`` in a theme file, a symlink out of the tree) and, when the
source reads the installed package, files that the package did not install (dpkg's file list), so the
corpus holds exactly the media of the packages DATA.md names and nothing else found on the machine.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("service.samples")

_DPKG_INFO = Path("/var/lib/dpkg/info")


class RefusedPath(ValueError):
    """A source was asked to read a file outside the package it is allowed to read."""


class NothingToRender(ValueError):
    """A render job found nothing to draw (no glyph, an invisible element): that image is skipped."""


@dataclass
class Plan:
    """What one source contributes: manifest rows, files to copy, images to render, speech to synthesise."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    copies: dict[str, Path] = field(default_factory=dict)  # relative destination -> source file
    speech: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # rel dest -> (text, voice, wpm)
    # rel dest -> writer(tmp_path); called only when the destination is missing (resumable builds)
    renders: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    provenance: dict[str, Any] = field(default_factory=dict)  # package, version, licence, root, verified
    concepts: dict[str, str] = field(default_factory=dict)  # shared key (an emoji) -> this source's label

    def add_file(self, src: Path, rel: str) -> str:
        self.copies[rel] = src
        return rel


def pick(items: list, limit: int | None, seed: int, key) -> list:
    """All items in sorted order, or a seeded sample of ``limit`` of them (stable across runs)."""
    if limit is None or limit >= len(items):
        return items
    ranked = sorted(items, key=lambda it: hashlib.sha1(f"{seed}:{key(it)}".encode()).hexdigest())
    return sorted(ranked[:limit], key=key)


def words(name: str) -> str:
    """A file or id name as plain lower-case words: ``HorseGallop-2`` -> ``horse gallop``."""
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    name = re.sub(r"[_\-.]+", " ", name)
    name = re.sub(r"\d+", " ", name)
    return " ".join(name.lower().split())


def article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def dpkg_version(package: str) -> str | None:
    """The installed version of a Debian package, or None (not installed / no dpkg-query)."""
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def dpkg_files(package: str) -> frozenset[str] | None:
    """The files a Debian package installed (dpkg's own list), or None when it is not installed."""
    for name in (f"{package}.list", f"{package}:amd64.list", f"{package}:all.list"):
        path = _DPKG_INFO / name
        if path.is_file():
            return frozenset(line.strip() for line in path.read_text(errors="replace").splitlines())
    return None


@dataclass(frozen=True)
class PackageGuard:
    """The only files a source may read: under ``allowed`` (resolved folders or files) and, when
    ``listed`` is given (the installed package's file list), named in it."""

    package: str
    allowed: tuple[Path, ...]
    listed: frozenset[str] | None = None

    @classmethod
    def for_root(
        cls, package: str, root: Path, subpaths: tuple[str, ...], default_root: Path | None
    ) -> PackageGuard:
        """A guard for ``root``/``subpaths``; checked against dpkg's file list when ``root`` is where the
        package installs (``default_root``), since only then can the list speak for the files."""
        root = root.resolve()
        listed = None
        if default_root is not None and root == default_root.resolve():
            listed = dpkg_files(package)
        return cls(package, tuple((root / s).resolve() for s in subpaths), listed)

    def check(self, path: Path) -> Path:
        """``path`` resolved (symlinks followed), or :class:`RefusedPath` when the source may not read it."""
        resolved = path.resolve()
        if not any(resolved == a or resolved.is_relative_to(a) for a in self.allowed):
            raise RefusedPath(f"{path}: outside the {self.package} folders this source may read")
        if self.listed is not None and str(resolved) not in self.listed and str(path) not in self.listed:
            raise RefusedPath(f"{path}: not a file of the Debian package {self.package}")
        return resolved

    def readable(self, path: Path, skipped: Counter, source: str) -> Path | None:
        """:meth:`check` for a scan loop: a refused path is logged, counted and skipped."""
        try:
            resolved = self.check(path)
        except RefusedPath as e:
            if not path.exists():  # named by a theme file but not shipped: missing, nothing to refuse
                skipped[f"{source}_missing_file"] += 1
                return None
            logger.warning("refused: %s", e)
            skipped[f"{source}_refused"] += 1
            return None
        if not resolved.is_file():
            skipped[f"{source}_missing_file"] += 1
            return None
        return resolved

    @property
    def verified(self) -> bool:
        return self.listed is not None


def provenance(
    package: str, licence: str, root: Path, guard: PackageGuard | None, version: str | None = None
) -> dict[str, Any]:
    return {
        "package": package,
        "version": version if version is not None else dpkg_version(package.removeprefix("debian:")),
        "licence": licence,
        "root": str(root),
        "verified_against_package": bool(guard and guard.verified),
    }


def crop_to_content(src: Path, dest: Path, size: int, background: tuple[int, int, int] | None) -> None:
    """Crop a rendered RGBA image to its visible pixels, fit it in ``size`` x ``size`` (centred, aspect
    kept) and save a PNG to ``dest``; ``background`` flattens transparency onto that colour."""
    from PIL import Image

    with Image.open(src) as opened:
        im = opened.convert("RGBA")
    box = im.getchannel("A").getbbox()
    if box is None:
        raise NothingToRender(f"{src.name}: nothing visible was rendered")
    im = im.crop(box)
    scale = (size - 8) / max(im.size)
    im = im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS
    )
    canvas = Image.new("RGBA", (size, size), (*background, 255) if background else (0, 0, 0, 0))
    canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
    (canvas.convert("RGB") if background else canvas).save(dest, format="PNG", optimize=False)


def rsvg_render(rsvg: str, svg: Path, dest: Path, size: int, element: str | None = None, bg=None) -> None:
    """Render ``svg`` (or one element of it, by id) large with rsvg-convert, then crop and fit it."""
    big = dest.with_name(dest.name + ".big.png")
    cmd = [rsvg, "-w", str(size * 2), "-h", str(size * 2), "-a", "-o", str(big)]
    if element:
        cmd.append(f"--export-id={element}")
    cmd.append(str(svg))
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=120)
        if proc.returncode != 0 or not big.is_file():
            raise ValueError(f"rsvg-convert failed on {svg}#{element}: {proc.stderr.decode()[:200]}")
        crop_to_content(big, dest, size, bg)
    finally:
        big.unlink(missing_ok=True)
