"""Where the benchmarks find their inputs and keep their caches: inside the project, never in /tmp.

The default manifest is the sample corpus that `make demo` builds (``demo/corpus/manifest.jsonl``), so a
fresh clone runs every benchmark after `make demo`; without it, :func:`default_manifest` builds the corpus
the same way (the Debian media packages must be installed, which `make setup` does).
"""

from __future__ import annotations

import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CORPUS = ROOT / "demo" / "corpus"
CACHE = ROOT / "demo" / "cache"  # benchmark caches (ignored by git with the rest of demo/)

log = logging.getLogger(__name__)


def default_manifest(build: bool = True) -> Path:
    """The demo corpus manifest; built first (minutes, resumable) when absent and ``build`` is true."""
    manifest = DEMO_CORPUS / "manifest.jsonl"
    if not manifest.exists() and build:
        from service.samples import build_corpus

        log.info("no corpus at %s: building it (as `make demo` does)", DEMO_CORPUS)
        build_corpus(DEMO_CORPUS)
    return manifest


def cache_dir(name: str) -> Path:
    """A cache folder of the project's own (``demo/cache/NAME``), created on demand."""
    path = CACHE / name
    path.mkdir(parents=True, exist_ok=True)
    return path
