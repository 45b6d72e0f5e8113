"""The ``gguf`` backend: a local GGUF model through the optional ``llama-cpp-python`` (the ``llm`` extra).

The model file is ``MM_GGUF_PATH``; unset, it is the packaged Gemma 3 270M (:mod:`mm.gemma`, installed
with the extra; its chunk files are joined once and sha256-checked, no network). A file with a chat
template is prompted as a chat; one without (a base model, such as the packaged Gemma) gets the same
instructions, items and question as plain text ending in ``Answer:``. Asked for a chat, llama-cpp-python
would guess a Llama-2 template for it, which a base model merely continues (measured with the packaged
Gemma: "\\n<</SYS>>\\n<SYS>\\n<COM_DIR>").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.generation.backends.openai import delta_text
from service.generation.base import GeneratorUnavailable, with_stop
from service.generation.prompts import chat_messages

if TYPE_CHECKING:
    from index.types import Hit

log = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()  # the loader below swaps a function of the llama_cpp module while it runs


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp: Any) -> Iterator[None]:
    """Load with llama.cpp's plain CPU weight buffers (``use_extra_bufts = False``).

    Its "extra" buffer types (AMX tiles, weights repacked for AVX512) crash the first decode with a
    segmentation fault on this project's machines: llama-cpp-python 0.3.36 compiled here, the packaged
    Gemma, exit status 139 on a 2-token completion with the defaults, none without them. A segfault takes
    the whole server down, not one request. ``Llama()`` takes no argument for it, so the module's default
    model parameters are wrapped while it loads (under a lock: the swap is process-wide).
    """
    module = llama_cpp.llama.llama_cpp
    with _LOAD_LOCK:
        default = module.llama_model_default_params

        def plain() -> Any:
            params = default()
            params.use_extra_bufts = False
            return params

        module.llama_model_default_params = plain
        try:
            yield
        finally:
            module.llama_model_default_params = default


def model_file(path: Path | None, cache_dir: str | Path | None, who: str) -> tuple[Path, dict | None]:
    """The GGUF file to load: ``path``, else the packaged Gemma 3 270M (:mod:`mm.gemma`), with the
    packaged model's package, version and sha256 (None for a given path). ``who`` names the user in the
    :class:`GeneratorUnavailable` raised when it cannot be found."""
    if path is not None:
        if not path.is_file():
            raise GeneratorUnavailable(who, f"no GGUF model file at {path} (MM_GGUF_PATH)")
        return path, None
    from mm import gemma

    try:
        found = gemma.model_path(cache_dir)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise GeneratorUnavailable(
            who, f"no MM_GGUF_PATH and the packaged model cannot be used: {exc}"
        ) from exc
    return found, {k: v for k, v in gemma.metadata().items() if k != "parts"}


LLAMA_LOG = logging.getLogger("llama_cpp")
_log_forward: Any = None  # the C callback installed by forward_llama_log (kept alive here)


def forward_llama_log(llama_cpp: Any) -> Any:
    """Send llama.cpp's own log lines to Python logging (logger ``llama_cpp``) instead of stderr.

    llama-cpp-python prints every line llama.cpp marks as an error even with ``verbose=False``, and the
    packaged Gemma loads with two benign ones ("control-looking token ... was not control-type", "using
    full-size SWA cache"), which ``mm ask --rewrite`` printed before every answer. They are logged at
    INFO, the rest at DEBUG; a load that fails still raises from ``Llama()``. Installed once a process
    (call it under :func:`plain_cpu_buffers`' lock: a second callback would free the first one's C pointer).
    """
    global _log_forward
    if _log_forward is None:

        @llama_cpp.llama_log_callback
        def forward(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", "replace").rstrip()
            if line:
                LLAMA_LOG.log(logging.INFO if level == 3 else logging.DEBUG, "%s", line)

        _log_forward = forward
        llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
    return _log_forward


def load_llama(
    path: Path | None,
    *,
    n_ctx: int,
    cache_dir: str | Path | None = None,
    n_threads: int | None = None,
    who: str = "gguf",
) -> tuple[Any, dict | None]:
    """A ``llama_cpp.Llama`` over :func:`model_file`'s file, loaded with :func:`plain_cpu_buffers`, and
    the packaged model's record (None for a given path). Raises :class:`GeneratorUnavailable` (naming
    ``who``) when llama-cpp-python or the model is missing. Shared by the ``gguf`` backend and the
    question rewriter (``service.generation.rewrite``)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GeneratorUnavailable(who, "llama-cpp-python is not installed: pip install -e '.[llm]'") from exc
    file, source = model_file(path, cache_dir, who)
    with plain_cpu_buffers(llama_cpp):  # under its lock: the log callback is installed once, too
        forward_llama_log(llama_cpp)
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    log.info("%s: loaded %s (%s)", who, file, source or "MM_GGUF_PATH, not checked")
    return llm, source


def completion_prompt(question: str, hits: Sequence[Hit]) -> str:
    """The chat prompt as plain text, for a model without a chat template (the packaged base Gemma)."""
    system, user = (m["content"] for m in chat_messages(question, hits))
    return f"{system}\n\n{user}\nAnswer:"


class GGUFGenerator:
    """A local GGUF model through the optional ``llama-cpp-python``, loaded on first use.

    ``path``: the model file; None: the packaged Gemma 3 270M (``mm.gemma``). Generations are serialised
    (one llama.cpp context serves every request; it is not safe to share between threads).
    """

    name = "gguf"
    max_items = None

    def __init__(self, path: str | Path | None, n_ctx: int = 2048, cache_dir: str | Path | None = None):
        self.path = Path(path) if path else None
        self.n_ctx = n_ctx
        self.cache_dir = cache_dir  # where mm.gemma keeps the joined packaged file (None: its default)
        self.source: dict[str, object] | None = None  # the packaged model's package, version, sha256
        self.chat = False  # whether the file has a chat template (else: plain completion prompts)
        self._llm: Any = None
        self._lock = threading.Lock()  # loading
        self._run = threading.Lock()  # one generation at a time

    def _load(self) -> Any:
        with self._lock:
            if self._llm is None:
                llm, self.source = load_llama(self.path, n_ctx=self.n_ctx, cache_dir=self.cache_dir)
                self.chat = bool(llm.metadata.get("tokenizer.chat_template"))
                self._llm = llm
            return self._llm

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        llm = self._load()
        return with_stop(self._pieces(llm, question, hits, max_tokens, temperature, list(stop)), stop)

    def _pieces(
        self, llm: Any, question: str, hits: list[Hit], max_tokens: int, temperature: float, stop: list[str]
    ) -> Iterator[str]:
        # the lock is held from the first piece until the stream ends or is closed (bridge.py closes it
        # when the client goes away), so an abandoned request does not keep others waiting
        with self._run:
            args = {
                "max_tokens": max_tokens,
                "temperature": temperature,
                "stop": stop or None,
                "stream": True,
            }
            if self.chat:
                for chunk in llm.create_chat_completion(messages=chat_messages(question, hits), **args):
                    yield delta_text(chunk)
            else:
                prompt = completion_prompt(question, hits)
                n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
                if n_prompt >= llm.n_ctx():  # a request's size, not the server's state: 422
                    raise ValueError(
                        f"the question and its {len(hits)} items take {n_prompt} tokens, over the gguf "
                        f"model's context of {llm.n_ctx()}: ask with fewer items (k) or a shorter question"
                    )
                for chunk in llm.create_completion(prompt, **args):
                    yield chunk["choices"][0]["text"]
