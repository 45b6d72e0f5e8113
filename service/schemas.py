"""Pydantic request and response models of the REST API (they make the OpenAPI schema complete)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Modality = Literal["text", "image", "audio"]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


class SearchFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[str] | None = Field(None, description="keep items carrying all of these tags")
    path_prefix: str | None = Field(None, description="keep items whose uri starts with this")
    since: datetime | float | None = Field(None, description="created at/after (ISO 8601 or unix seconds)")
    until: datetime | float | None = Field(None, description="created at/before (ISO 8601 or unix seconds)")


class SearchRequest(BaseModel):
    """Exactly one of ``query``, ``item_id`` or ``vector``."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, min_length=1, max_length=2000, description="text query")
    item_id: int | None = Field(None, description="more-like-this: items like this one (itself excluded)")
    vector: list[float] | None = Field(
        None, description="advanced: a precomputed query vector of the collection's dim (normalised here)"
    )
    modalities: list[Modality] | None = Field(None, description="result modalities; all when omitted")
    k: int = Field(10, ge=1, le=100)
    offset: int = Field(0, ge=0, le=10_000)
    filters: SearchFilters | None = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if sum(x is not None for x in (self.query, self.item_id, self.vector)) != 1:
            raise ValueError("give exactly one of query, item_id or vector")
        return self


class SearchResult(BaseModel):
    id: int
    score: float
    modality: Modality
    caption: str
    media_url: str | None
    thumbnail_url: str | None
    uri: str
    mime: str
    duration: float | None
    width: int | None
    height: int | None
    tags: list[str]


class QueryEcho(BaseModel):
    type: Literal["text", "image", "audio", "item", "vector"]
    value: str | int | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float
    query: QueryEcho


class ItemOut(BaseModel):
    id: int
    modality: Modality
    uri: str
    mime: str
    caption: str
    tags: list[str]
    size: int
    width: int | None
    height: int | None
    duration: float | None
    sha256: str
    created_at: float
    updated_at: float
    media_url: str | None
    thumbnail_url: str | None


class ItemList(BaseModel):
    items: list[ItemOut]
    total: int
    limit: int
    offset: int


class TextItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=100_000)
    tags: list[str] = Field(default_factory=list)


class Deleted(BaseModel):
    deleted: int


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="absolute server-side file or folder under one of the allowed roots")
    tags: list[str] = Field(default_factory=list)


class JobError(BaseModel):
    path: str
    error: str


class JobOut(BaseModel):
    id: str
    kind: str
    params: dict[str, Any]
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int
    total: int
    added: int
    updated: int
    skipped: int
    failed: int
    errors: list[JobError]
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    dim: int
    items: int


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")

    count: int = Field(description="items with a vector")
    by_modality: dict[str, int]
    embedder_id: str
    dim: int
    collection: dict[str, Any] = Field(description="the collection's own stats()")
