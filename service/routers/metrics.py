"""``GET /metrics`` (Prometheus text format) and ``GET /stats`` (the collection's statistics as JSON)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.deps import CollectionDep, MetricsDep
from service.metrics import CONTENT_TYPE
from service.schemas import Stats, error_responses

router = APIRouter(tags=["observability"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={**error_responses(401), 200: {"content": {"text/plain": {}}}},
)
def metrics(collection: CollectionDep, m: MetricsDep) -> Response:
    return Response(m.render(collection), media_type=CONTENT_TYPE)


@router.get("/stats", response_model=Stats, responses=error_responses(401))
def stats(collection: CollectionDep) -> Stats:
    return Stats(
        count=collection.count(),
        by_modality={m: collection.count(m) for m in ("text", "image", "audio")},
        embedder_id=collection.embedder_id,
        dim=collection.dim,
        collection=collection.stats(),
    )
