"""The ``gguf`` backend: a local GGUF chat model through the optional ``llama-cpp-python``."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.generation.backends.openai import delta_text
from service.generation.base import GeneratorUnavailable, with_stop
from service.generation.prompts import chat_messages

if TYPE_CHECKING:
    from index.types import Hit


class GGUFGenerator:
    """A local GGUF chat model through the optional ``llama-cpp-python`` (never built here on demand)."""

    name = "gguf"
    max_items = None

    def __init__(self, path: str | Path | None, n_ctx: int = 2048):
        self.path = Path(path) if path else None
        self.n_ctx = n_ctx
        self._llm: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._llm is None:
                try:
                    import llama_cpp
                except ImportError as exc:
                    raise GeneratorUnavailable(
                        "gguf", "llama-cpp-python is not installed: pip install llama-cpp-python"
                    ) from exc
                if self.path is None or not self.path.is_file():
                    raise GeneratorUnavailable(
                        "gguf", f"no GGUF model file at {self.path} (set MM_GGUF_PATH)"
                    )
                self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, verbose=False)
            return self._llm

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        llm = self._load()
        chunks = llm.create_chat_completion(
            messages=chat_messages(question, hits),
            max_tokens=max_tokens,
            temperature=temperature,
            stop=list(stop) or None,
            stream=True,
        )
        return with_stop((delta_text(c) for c in chunks), stop)
