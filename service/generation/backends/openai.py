"""The ``openai`` backend: any OpenAI-compatible ``/chat/completions`` endpoint, streamed over httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from service.generation.base import GeneratorUnavailable, with_stop
from service.generation.prompts import chat_messages

if TYPE_CHECKING:
    from index.types import Hit


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
                    piece = delta_text(json.loads(data))
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise GeneratorUnavailable("openai", f"{self.base_url}: {exc.__class__.__name__}: {exc}") from exc


def delta_text(chunk: dict[str, Any]) -> str:
    """The text of one streamed chat-completion chunk (OpenAI's format; llama-cpp-python's too)."""
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""
