"""Dependencies: routes receive the app's shared objects as ``Annotated`` parameters.

They are ``async`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, and each such
hop costs a thread wake-up per request (milliseconds on a busy machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.jobs import JobManager
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from index.api import CollectionAPI as CollectionT
    from index.protocol import Embedder as EmbedderT
else:  # FastAPI inspects these annotations at runtime; the real classes load lazily with the app
    CollectionT = object
    EmbedderT = object


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_collection(request: Request) -> CollectionT:
    return request.app.state.collection


async def get_embedder(request: Request) -> EmbedderT:
    return request.app.state.embedder


async def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
CollectionDep = Annotated[CollectionT, Depends(get_collection)]
EmbedderDep = Annotated[EmbedderT, Depends(get_embedder)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
