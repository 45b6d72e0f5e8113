"""``GET /health``: liveness without authentication (load balancers and probes call it)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import CollectionDep, EmbedderDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health(collection: CollectionDep, embedder: EmbedderDep) -> Health:
    return Health(status="ok", model=embedder.model_id, dim=embedder.dim, items=collection.count())
