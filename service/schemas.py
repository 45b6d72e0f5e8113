"""Pydantic request and response models of the REST API (they make the OpenAPI schema complete)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from service.limits import (
    INT64_MAX,
    MAX_NAME_BYTES,
    MAX_PATH_CHARS,
    MAX_QUERY_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_TEXT_CHARS,
)

Modality = Literal["text", "image", "audio"]
NON_BLANK = r"\S"  # JSON Schema patterns search: the text holds at least one non-space character


def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the text is blank")
    return text


def non_blank(max_chars: int) -> Any:
    """A text of 1 to ``max_chars`` characters, not all spaces (a validator for a clear message, and a
    pattern so that the schema says it)."""
    return Annotated[
        str,
        StringConstraints(min_length=1, max_length=max_chars),
        AfterValidator(_non_blank),
        Field(json_schema_extra={"pattern": NON_BLANK}),
    ]


if TYPE_CHECKING:  # mypy cannot evaluate a call that builds a type; to it these are plain str
    QueryText = str
    LongText = str
else:
    QueryText = non_blank(MAX_QUERY_CHARS)  # a search query or a question
    LongText = non_blank(MAX_TEXT_CHARS)  # a text item
Tag = Annotated[str, Field(max_length=MAX_TAG_CHARS)]
ItemId = Annotated[int, Field(ge=1, le=INT64_MAX, description="an item id (ids start at 1)")]


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

    tags: list[Tag] | None = Field(
        None, max_length=MAX_TAGS, description="keep items carrying all of these tags"
    )
    path_prefix: str | None = Field(
        None, max_length=MAX_PATH_CHARS, description="keep items whose uri starts with this"
    )
    since: datetime | float | None = Field(None, description="created at/after (ISO 8601 or unix seconds)")
    until: datetime | float | None = Field(None, description="created at/before (ISO 8601 or unix seconds)")


class SearchRequest(BaseModel):
    """Exactly one of ``query``, ``item_id`` or ``vector``."""

    model_config = ConfigDict(extra="forbid")

    query: QueryText | None = Field(None, description="text query")
    item_id: ItemId | None = Field(None, description="more-like-this: items like this one (itself excluded)")
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

    text: LongText
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class Deleted(BaseModel):
    deleted: int


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        pattern=r"^/",
        description="absolute server-side file or folder under one of the allowed roots "
        f"(each name in it at most {MAX_NAME_BYTES} bytes)",
    )
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)

    @field_validator("path")
    @classmethod
    def _names_fit(cls, path: str) -> str:
        if "\0" in path:
            raise ValueError("the path holds a NUL character")
        if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in path.split("/")):
            raise ValueError(f"a name in the path is longer than {MAX_NAME_BYTES} bytes")
        return path


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
