"""Prometheus metrics with a registry per app (two apps in one process never share counters).

- ``mm_http_request_duration_seconds{method,route,status}``: histogram; ``route`` is the route template
  (``/items/{item_id}``), never the raw path, so ids do not explode the label set.
- ``mm_items{modality}``: items in the collection, read at scrape time.
- ``mm_index_size_bytes``: bytes of the collection's index files on disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from index.api import CollectionAPI as Collection

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_INDEX_SUFFIXES = (".faiss", ".index", ".ivf", ".hnsw")
CONTENT_TYPE = CONTENT_TYPE_LATEST
STARTED_KEY = "mm.started"  # scope key: when service.fastpath took a request it then handed over


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "mm_http_request_duration_seconds",
            "HTTP request latency by route template and status",
            ["method", "route", "status"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._latency_children: dict[tuple[str, str, str], Any] = {}
        reg = self.registry
        self.items = Gauge("mm_items", "Items in the collection by modality", ["modality"], registry=reg)
        self.index_bytes = Gauge("mm_index_size_bytes", "Bytes of index files on disk", registry=reg)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """One request into the latency histogram (its labelled child looked up once per label set)."""
        key = (method, route, str(status))
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children.setdefault(key, self.latency.labels(*key))
        child.observe(seconds)

    def render(self, collection: Collection | None) -> bytes:
        if collection is not None:
            for modality in ("text", "image", "audio"):
                self.items.labels(modality=modality).set(collection.count(modality))
            self.index_bytes.set(index_size_bytes(collection))
        return generate_latest(self.registry)


def index_size_bytes(collection: Collection) -> int:
    stats = collection.stats()
    for key in ("bytes", "index_bytes", "index_size_bytes"):
        if isinstance(stats.get(key), int | float):
            return int(stats[key])
    root = Path(collection.path)
    return sum(p.stat().st_size for p in root.glob("*") if p.is_file() and p.suffix in _INDEX_SUFFIXES)


class MetricsMiddleware:
    """Times every HTTP request (pure ASGI, so streaming responses are not buffered)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = scope.get(STARTED_KEY) or time.perf_counter()  # a request service.fastpath handed over

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - t0)
