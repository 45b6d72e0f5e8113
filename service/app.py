"""The FastAPI application: ``create_app(settings)``; run it with ``mm serve`` (uvicorn).

The lifespan loads the embedder and opens (or creates) the collection into ``app.state``; routes get
them through ``service.deps``. Every route but ``/health`` needs an API key when ``MM_API_KEYS`` is set.
Request bodies larger than ``MM_MAX_UPLOAD_MB`` are refused with 413 while they are read
(``service.limits``). API keys never reach a log line (``service.redact``). ``POST /search`` is
answered in front of the framework where it can be (``service.fastpath``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from starlette.types import Receive, Scope, Send

from service import openapi
from service.auth import require_api_key
from service.body import register_models
from service.errors import InternalErrorMiddleware, install_error_handlers
from service.fastpath import SearchFastPath
from service.jobs import JobManager
from service.limits import BODY_IDLE_S, BodyLimitMiddleware, BodyTimeout, has_body, idle_limited, reply
from service.metrics import Metrics, MetricsMiddleware
from service.schemas import SearchRequest
from service.settings import Settings

if TYPE_CHECKING:
    from index.protocol import Embedder

log = logging.getLogger(__name__)


class ServiceApp(FastAPI):
    """FastAPI with :class:`service.fastpath.SearchFastPath` in front of it (``create_app`` sets it)."""

    fast_search: SearchFastPath | None = None
    body_timeout: float = BODY_IDLE_S  # seconds a request body may pause before 408 (MM_BODY_TIMEOUT_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and has_body(scope):
            receive = idle_limited(receive, self.body_timeout)
        fast = self.fast_search
        if fast is not None and fast.handles(scope):
            try:
                await fast(scope, receive, send, super().__call__)
            except BodyTimeout as err:  # the fast path reads the body itself, before any answer
                await reply(send, err)
        else:
            await super().__call__(scope, receive, send)


def load_rewriter(app: FastAPI) -> None:
    """Load the question rewriter ``MM_REWRITE`` asks for, so that a missing model or llama-cpp-python
    stops the server at start (with the install hint) instead of failing every question."""
    from service.generation import GeneratorUnavailable, generators_of

    try:
        generators_of(app).rewriter().load()
    except GeneratorUnavailable as exc:
        raise RuntimeError(f"MM_REWRITE={app.state.settings.rewrite}: {exc}") from exc


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None) -> FastAPI:
    """Build the app. ``embedder`` overrides ``settings.model`` (tests, or an embedder already loaded)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from index.vectors import set_search_threads
        from mm.runtime import tune_allocator
        from service import redact
        from service.embedding import load_embedder
        from service.store import open_served, remove_orphan_uploads

        # after the server configured its logging (uvicorn does so before the app starts): its handlers
        # exist now and get the filter too
        redaction = redact.install([*settings.api_keys, settings.openai_api_key or ""])
        tune_allocator()
        set_search_threads(settings.search_threads)
        emb = embedder if embedder is not None else load_embedder(settings.model, settings.adapter)
        collection = open_served(
            settings.collection,
            emb,
            create=True,
            memory_budget_mb=settings.memory_budget_mb,
            deadline_s=settings.shard_deadline_s,  # a sharded collection's (else unused)
            ray_address=settings.ray_address,
        )
        settings.media_path.mkdir(parents=True, exist_ok=True)
        remove_orphan_uploads(collection, settings.media_path)  # what a kill mid-upload left
        app.state.embedder, app.state.collection, app.state.jobs = emb, collection, JobManager()
        log.info("serving collection %s (%d items)", settings.collection, collection.count())
        try:
            if settings.rewrite != "off":
                load_rewriter(app)
            yield
        finally:
            app.state.jobs.shutdown()
            collection.save()
            collection.close()
            redact.uninstall(redaction)

    from service.routers import generate, health, ingest, items, metrics, openai_compat, search, web, ws

    app = ServiceApp(
        title="mm",
        summary="Multimodal retrieval: any-to-any search over text, images and audio",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs is served by service.routers.web, with Swagger UI's files from here (no CDN)
        redoc_url=None,  # ReDoc would come from a CDN: /docs is the one documentation page
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)  # innermost: a 500 answered without dropping the connection

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    # Keys are read once, here: without keys the routes carry no auth dependency at all (FastAPI
    # resolves dependencies per request, a measurable share of a sub-millisecond search).
    auth = [Depends(require_api_key)] if settings.api_keys else []
    app.include_router(health.router)
    for module in (search, items, ingest, metrics, generate, openai_compat):
        app.include_router(module.router, dependencies=auth)
    app.include_router(web.router)  # the page and its assets hold no data: no key
    app.include_router(ws.router)  # checks its key itself: ?api_key= (browsers cannot set WS headers)

    register_models(app, SearchRequest, generate.GenerateRequest)  # bodies parsed by service.body
    openapi.install(app)  # what the server enforces beyond FastAPI's own schema (body errors, one-of)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Range"],
        )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: times every answer
    app.body_timeout = settings.body_timeout_s
    app.fast_search = SearchFastPath(app)  # POST /search in front of all of the above (it falls back to it)
    return app
