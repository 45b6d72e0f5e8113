"""Answers grounded in retrieved items, from pluggable backends, streamed piece by piece.

Backends (``MM_GENERATOR`` or a per-request ``backend``):

- ``extractive``: no model; a deterministic sentence naming each retrieved item with its citation.
- ``local``: the project's grounded decoder (``mm/lm.py``); items enter as prefix vectors + captions.
- ``openai``: any OpenAI-compatible endpoint (``MM_OPENAI_BASE_URL``, ``MM_OPENAI_API_KEY``,
  ``MM_OPENAI_MODEL``), streamed with httpx.
- ``gguf``: a local GGUF model through the optional ``llama-cpp-python`` (``MM_GGUF_PATH``).

A backend that cannot answer (not installed, model missing, endpoint down) raises
:class:`GeneratorUnavailable` (HTTP 503); bad parameters raise ``ValueError`` (HTTP 422).
Every answer cites the items it was given (:class:`Citation`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from index.types import Hit
from service.schemas import Citation
from service.settings import BACKENDS

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_LM_PATH = Path(__file__).resolve().parent.parent / "mm" / "checkpoints" / "lm"
SYSTEM_PROMPT = (
    "You answer questions about a media collection. Use only the numbered items you are given and cite "
    "each item you use as [n]. If the items do not answer the question, say so briefly."
)


class GeneratorUnavailable(RuntimeError):
    """A backend cannot answer now (not installed, model missing, endpoint down): HTTP 503."""

    def __init__(self, backend: str, message: str):
        super().__init__(f"{backend} backend unavailable: {message}")
        self.backend = backend


def citations(hits: Sequence[Hit]) -> list[Citation]:
    return [
        Citation(
            id=int(h.id), modality=h.item.modality, score=round(float(h.score), 6), caption=h.item.caption
        )
        for h in hits
    ]


class Generator(Protocol):
    name: str
    max_items: int | None  # how many retrieved items it can use; None = all

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]: ...


def check_params(max_tokens: int, temperature: float, stop: Sequence[str] | None) -> list[str]:
    if not 1 <= max_tokens <= 4096:
        raise ValueError(f"max_tokens must be between 1 and 4096, got {max_tokens}")
    if not 0.0 <= temperature <= 2.0:
        raise ValueError(f"temperature must be between 0 and 2, got {temperature}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop must be at most 4 non-empty strings")
    return stops


def with_stop(pieces: Iterable[str], stop: Sequence[str]) -> Iterator[str]:
    """Cut a stream of pieces at the first stop string (not emitted); closes the source when stopped."""
    from mm.stop_filter import StopFilter

    f = StopFilter(stop)
    source = iter(pieces)
    try:
        for piece in source:
            out = f.push(piece)
            if out:
                yield out
            if f.stopped:
                return
        tail = f.flush()
        if tail:
            yield tail
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def describe(hit: Hit) -> str:
    """A short noun phrase for an item: its caption without the final period, else its file name."""
    text = " ".join((hit.item.caption or "").split())
    if not text and hit.item.uri:
        text = Path(hit.item.uri).stem.replace("_", " ")
    if not text:
        return f"item {hit.id}"
    if len(text) > 80:
        text = text[:77].rsplit(" ", 1)[0] + "..."
    text = text.rstrip(".")
    return text[0].lower() + text[1:] if text[:2].istitle() or len(text) == 1 else text


def numbered_items(hits: Sequence[Hit]) -> str:
    return "\n".join(
        f"[{i}] ({h.item.modality}, score {h.score:.2f}) {describe(h)}" for i, h in enumerate(hits, 1)
    )


# ----------------------------------------------------------------------------------------------------
# backends


class ExtractiveGenerator:
    """No model: "The closest matches are a frog [1] (image), a croak [2] (audio) and ...", word by word."""

    name = "extractive"
    max_items = None

    def compose(self, question: str, hits: Sequence[Hit]) -> str:
        if not hits:
            return "Nothing in the collection matches this question."
        parts = [f"{describe(h)} [{i}] ({h.item.modality})" for i, h in enumerate(hits, 1)]
        if len(parts) == 1:
            return f"The closest match is {parts[0]}."
        return f"The closest matches are {', '.join(parts[:-1])} and {parts[-1]}."

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        words = self.compose(question, hits).split(" ")
        pieces = (w if i == 0 else " " + w for i, w in enumerate(words[:max_tokens]))
        return with_stop(pieces, stop)


class LocalGenerator:
    """The grounded decoder of ``mm/lm.py``: prefix vectors of the first items + their captions."""

    name = "local"

    def __init__(self, path: str | Path, vector_of: Callable[[int], np.ndarray | None]):
        self.path = Path(path)
        self.vector_of = vector_of
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def max_items(self) -> int | None:
        return self._load().cfg.prefix_len

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from mm.errors import ConfigError
                from mm.lm import WEIGHTS_FILE, load_lm

                is_config = self.path.suffix == ".json"
                if not is_config and not (self.path / WEIGHTS_FILE).exists():
                    raise GeneratorUnavailable(
                        "local", f"no LM checkpoint at {self.path} (train one with benchmarks/train_lm.py)"
                    )
                try:
                    self._model = load_lm(self.path)
                except (ConfigError, OSError) as exc:
                    raise GeneratorUnavailable("local", str(exc)) from exc
            return self._model

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        lm = self._load()
        items = hits[: lm.cfg.prefix_len]
        vecs = [self.vector_of(h.id) for h in items]
        prefix = None
        if vecs and all(v is not None and v.shape[-1] == lm.cfg.embed_dim for v in vecs):
            prefix = np.stack(vecs).astype(np.float32)  # (P', M)
        elif vecs:
            log.warning("item vectors do not match the LM's prefix width %d; captions only", lm.cfg.embed_dim)
        prompt = lm.build_prompt(question, [h.item.caption for h in items])
        max_new = min(max_tokens, lm.cfg.max_len - 1)
        return lm.generate(prompt, prefix, max_new_tokens=max_new, temperature=temperature, stop=stop, seed=0)


def chat_messages(question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
    items = numbered_items(hits) or "(no items were found)"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Items:\n{items}\n\nQuestion: {question}"},
    ]


class OpenAIGenerator:
    """Any OpenAI-compatible ``/chat/completions`` endpoint, streamed over httpx (SSE)."""

    name = "openai"
    max_items = None

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        model: str,
        timeout: float = 30.0,
        transport: Any = None,  # an httpx transport (tests: httpx.MockTransport)
    ):
        self.base_url = (base_url or "").rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.transport = transport

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        if not self.base_url:
            raise GeneratorUnavailable("openai", "set MM_OPENAI_BASE_URL (e.g. http://localhost:8080/v1)")
        body = {
            "model": self.model,
            "messages": chat_messages(question, hits),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        if stop:
            body["stop"] = list(stop)
        return with_stop(self._events(body), stop)

    def _events(self, body: dict[str, Any]) -> Iterator[str]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with (
                httpx.Client(timeout=self.timeout, transport=self.transport) as client,
                client.stream("POST", f"{self.base_url}/chat/completions", json=body, headers=headers) as r,
            ):
                if r.status_code >= 400:
                    r.read()
                    raise GeneratorUnavailable("openai", f"endpoint answered {r.status_code}: {r.text[:200]}")
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    piece = _delta_text(json.loads(data))
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise GeneratorUnavailable("openai", f"{self.base_url}: {exc.__class__.__name__}: {exc}") from exc


def _delta_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


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
        return with_stop((_delta_text(c) for c in chunks), stop)


# ----------------------------------------------------------------------------------------------------
# registry, retrieval and streaming helpers


class Generators:
    """The backends of one app, built on first use and then shared across requests."""

    def __init__(self, settings: Settings, vector_of: Callable[[int], np.ndarray | None]):
        self.settings = settings
        self.vector_of = vector_of
        self._made: dict[str, Generator] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        return getattr(self.settings, "generator", "extractive")

    def get(self, name: str | None = None) -> Generator:
        name = name or self.default
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        with self._lock:
            if name not in self._made:
                self._made[name] = self._build(name)
            return self._made[name]

    def _build(self, name: str) -> Generator:
        s = self.settings
        if name == "extractive":
            return ExtractiveGenerator()
        if name == "local":
            return LocalGenerator(s.lm_path or DEFAULT_LM_PATH, self.vector_of)
        if name == "openai":
            return OpenAIGenerator(
                s.openai_base_url,
                s.openai_api_key,
                s.openai_model,
                s.openai_timeout,
            )
        return GGUFGenerator(s.gguf_path)


def start_stream(
    generator: Generator,
    question: str,
    hits: list[Hit],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    stop: Sequence[str] | None = None,
) -> tuple[Iterator[str], list[Citation]]:
    """Validate, trim the hits to what the backend uses, and return (pieces, citations)."""
    stops = check_params(max_tokens, temperature, stop)
    limit = generator.max_items
    used = hits if limit is None else hits[:limit]
    pieces = generator.stream(question, used, max_tokens=max_tokens, temperature=temperature, stop=stops)
    return iter(pieces), citations(used)


_END = object()
FIRST_PIECE_WAIT_S = 0.1  # longest pause of the generation thread while its first piece is sent


async def iterate_in_thread(pieces: Iterator[str] | Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Drive a blocking iterator in its own thread; stopping early (a client gone) closes the iterator.

    ``pieces`` may be a function that makes the iterator: it then runs in that thread too (one thread
    hand-off less before the first piece) and its exceptions reach the consumer like the iterator's.
    The thread checks a cancel flag between pieces and closes the source itself (a generator cannot
    be closed from another thread while it runs), so a cancelled generation ends after the piece in
    progress. After the first piece the thread waits (at most ``FIRST_PIECE_WAIT_S``) until the
    consumer asks for the next one, i.e. has sent the first: otherwise the next decoding steps keep
    the GIL busy while the event loop tries to send it, and the first token reaches the client late.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()
    first_sent = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens any more
            cancel.set()

    def work() -> None:
        source: Iterator[str] | None = None
        try:
            source = pieces() if callable(pieces) else pieces
            for piece in source:
                if cancel.is_set():
                    break
                put(piece)
                if not first_sent.is_set():
                    first_sent.wait(FIRST_PIECE_WAIT_S)
                    first_sent.set()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            put(_END)

    threading.Thread(target=work, name="mm-generate", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            first_sent.set()  # the consumer is back for more: the piece has gone out
    finally:
        cancel.set()
        first_sent.set()
