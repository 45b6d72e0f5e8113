"""Pydantic request and response models of the REST API (they make the OpenAPI schema complete)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypedDict  # pydantic needs typing_extensions' on Python < 3.12

from index.types import Filter, check_span
from service.limits import (
    INT64_MAX,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_NAME_BYTES,
    MAX_PATH_CHARS,
    MAX_QUERY_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_TEXT_CHARS,
)
from service.settings import Backend

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


# -- search: one query type for every entry point ------------------------------------------------------
#
# ``SearchQuery`` is the body of ``POST /search`` and what the upload form, the WebSocket, the CLI and
# generation's retrieval build: every rule of a search query lives here, once, and the OpenAPI schema
# states it. Answering one is ``service.search.answer``.

MAX_K = 100  # results per search, at every entry point; deeper results are paged with ``offset``
MAX_OFFSET = 10_000  # paging stops here: an exact top-(offset + k) is searched for each page
QueryKind = Literal["text", "image", "audio", "item", "vector"]
# How results are ranked. Only "vector" (nearest neighbours in the shared space) exists today; lexical
# ("keyword") and fused ("hybrid") ranking join this list and ``service.search.rank``, nowhere else.
SearchMode = Literal["hybrid", "vector", "keyword"]


def parse_time(value: datetime | float | str | None) -> float | None:
    """Unix seconds from unix seconds, a ``datetime`` or an ISO 8601 string (naive means UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"cannot read time {text!r}: use unix seconds or ISO 8601 such as 2024-05-01T12:00:00"
                ) from None
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.timestamp()
    seconds = float(value)
    if not math.isfinite(seconds):  # nan, inf and 1e400 parse as floats but order nothing
        raise ValueError(f"time must be finite, got {value!r}")
    return seconds


class SearchFilters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tags: list[Tag] | None = Field(
        None, max_length=MAX_TAGS, description="keep items carrying all of these tags"
    )
    path_prefix: str | None = Field(
        None, max_length=MAX_PATH_CHARS, description="keep items whose uri starts with this"
    )
    since: datetime | float | None = Field(None, description="created at/after (ISO 8601 or unix seconds)")
    until: datetime | float | None = Field(None, description="created at/before (ISO 8601 or unix seconds)")
    _span: tuple[float | None, float | None] = PrivateAttr((None, None))

    @field_validator("since", "until", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # lax float reads JSON true as second 1
            raise ValueError("a time is unix seconds or ISO 8601, not true/false")
        return value

    @model_validator(mode="after")
    def _times(self) -> SearchFilters:
        since, until = parse_time(self.since), parse_time(self.until)
        check_span(since, until)  # the index's rule, refused here as a 422
        self._span = (since, until)
        return self

    @property
    def span(self) -> tuple[float | None, float | None]:
        """``(since, until)`` in unix seconds (None: open)."""
        return self._span


class QueryMedia:
    """An image or audio file to search with (an upload, a CLI argument), made by the server's own code
    only. Deliberately a plain class, not a dataclass or a model: pydantic accepts nothing but an instance
    for it, so no JSON or form field can name a server-side file (nor is the field in any schema)."""

    __slots__ = ("modality", "path", "name")

    def __init__(self, modality: str, path: str | Path, name: str | None = None):
        if modality not in ("image", "audio"):
            raise ValueError(f"a query file is an image or audio, not {modality!r}")
        self.modality: Literal["image", "audio"] = "image" if modality == "image" else "audio"
        self.path = Path(path)
        self.name = name or self.path.name  # what messages and the query echo call it

    def __repr__(self) -> str:
        return f"QueryMedia({self.modality!r}, {str(self.path)!r}, {self.name!r})"


class SearchQuery(BaseModel):
    """Exactly one of ``query`` (text), ``item_id`` (more-like-this, the item itself excluded) or ``vector``
    (advanced: a precomputed query in the collection's space, normalised here); the server's own callers
    may give an image or audio file instead (``media``).

    Extension points: a spoken query's transcript joins ``media`` (an audio query) and is fused where the
    query is embedded; a calibrated score joins :class:`SearchResult` where results are made
    (``service.search.hit_to_dict``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    query: QueryText | None = Field(None, description="text query")
    item_id: ItemId | None = Field(None, description="more-like-this: items like this one (itself excluded)")
    vector: list[float] | None = Field(
        None, description="advanced: a precomputed query vector of the collection's dim (normalised here)"
    )
    media: SkipJsonSchema[QueryMedia | None] = Field(None, exclude=True)
    modalities: list[Modality] | None = Field(None, description="result modalities; all when omitted")
    k: int = Field(10, ge=1, le=MAX_K, description=f"results (1..{MAX_K}; page further with offset)")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="results skipped (paging)")
    filters: SearchFilters | None = None
    mode: SearchMode = Field(
        "hybrid",
        description="ranking: 'vector' (nearest neighbours), 'keyword' (words of captions, file names, tags "
        "and transcripts; text queries only) or 'hybrid' (both, fused by calibrated scores; the default)",
    )
    allow_partial: bool = Field(
        False,
        description="a sharded collection: answer from the shards that answered in time, marked "
        "'partial': true, instead of 503 when one failed or was late (ignored by an unsharded one)",
    )
    # Derived once, when the query is made: read on every search, so straight from pydantic's private dict
    # (a private attribute read through the model costs ~1 us, a share of a sub-millisecond search).
    _unit: np.ndarray | None = PrivateAttr(None)
    _filter: Filter | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _rules(self) -> SearchQuery:
        if sum(x is not None for x in (self.query, self.item_id, self.vector, self.media)) != 1:
            raise ValueError("give exactly one query: text, an item id, a vector, or an image or audio file")
        if self.mode == "keyword" and self.query is None:
            raise ValueError("mode 'keyword' searches words: give a text query")
        private = self.__pydantic_private__
        assert private is not None  # pydantic sets it before "after" validators run
        if self.vector is not None:
            private["_unit"] = unit_vector(self.vector)
        if self.modalities or self.filters or self.item_id is not None:
            private["_filter"] = self._make_filter()
        return self

    def _make_filter(self) -> Filter | None:
        f = self.filters
        since, until = f.span if f else (None, None)
        flt = Filter(
            modalities=list(dict.fromkeys(self.modalities)) if self.modalities else None,
            tags=[t for t in f.tags if t] or None if f and f.tags else None,
            path_prefix=f.path_prefix or None if f else None,
            since=since,
            until=until,
            exclude_ids=[self.item_id] if self.item_id is not None else None,  # more-like-this: not itself
        )
        return None if flt.is_empty() else flt

    @property
    def kind(self) -> QueryKind:
        if self.query is not None:
            return "text"
        if self.media is not None:
            return self.media.modality
        return "item" if self.item_id is not None else "vector"

    @property
    def filter(self) -> Filter | None:
        """The collection filter: modalities, tags, path, time span and the excluded item (None: none)."""
        return self.__pydantic_private__["_filter"]  # type: ignore[index]

    @property
    def unit(self) -> np.ndarray | None:
        """The ``(D,)`` float32 unit vector of a vector query (its length is checked against the collection
        where it is searched)."""
        return self.__pydantic_private__["_unit"]  # type: ignore[index]

    def echo(self) -> QueryEcho:
        """What was searched for, as answers echo it."""
        value = {"text": self.query, "item": self.item_id, "vector": None}.get(self.kind)
        return {"type": self.kind, "value": self.media.name if self.media is not None else value}


class SearchRequest(SearchQuery):
    """The body of ``POST /search``: a :class:`SearchQuery`, under the name the API's schema has always
    given it."""


def unit_vector(values: Sequence[float]) -> np.ndarray:
    """``values`` as a float32 unit vector; ValueError when one is not finite (float32) or all are zero."""
    vec = np.asarray(values, dtype=np.float32).reshape(-1)
    # One float64 dot checks and measures at once: it is finite exactly when every value is (a float32
    # squared cannot overflow float64), and it does not overflow as a float32 norm would.
    wide = vec.astype(np.float64)
    squares = float(wide @ wide)
    if not math.isfinite(squares):
        raise ValueError("vector must hold finite numbers")
    if squares == 0.0:
        raise ValueError("vector must not be all zeros")
    return (wide / math.sqrt(squares)).astype(np.float32)


def error_message(exc: ValidationError) -> str:
    """The first error of ``exc`` as one line, ``field: message`` (as the REST API words it)."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


# One result shape: a TypedDict, so that the dicts ``service.search.hit_to_dict`` builds (no validation
# pass per result on the hot path) are checked against it by mypy, and the OpenAPI schema comes from it.
class Transcript(TypedDict):
    """What Whisper heard in an audio clip (issue 15)."""

    text: str
    language: str  # ISO 639-1 code ("en", "fr"); "" when unknown


class SearchResult(TypedDict):
    id: int
    score: float  # calibrated P(relevant) when the model has a calibration (else the raw score), fused
    score_raw: float | None  # the query vector's cosine with the item (None: a keyword-only hit)
    lexical_score: float | None  # BM25 of the item's word match (None: its words did not match)
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
    transcript: Transcript | None  # an audio item's speech, when it has any


class QueryEcho(TypedDict):
    type: QueryKind
    value: str | int | None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float
    query: QueryEcho
    heard: Transcript | None = Field(None, description="a spoken query: the speech it was heard to say")
    no_good_match: bool = Field(
        False, description="true when even the best result scores under the model's no-match threshold"
    )
    partial: bool | None = Field(
        None,
        description="with allow_partial: true when some shards are missing from the results "
        "(missing_shards says which and why), false when every shard answered",
    )
    missing_shards: dict[str, str] | None = Field(
        None, description="a partial answer: shard number -> why it is missing"
    )


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
    transcript: Transcript | None = None  # an audio item's speech, when it has any


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


# -- generation: POST /generate, the WebSocket and the OpenAI-compatible API -------------------------------

MAX_GROUNDING_K = 20  # items one answer is grounded in (each is a line of the prompt)
MAX_NEW_TOKENS = 4096
MAX_STOPS = 4
DEFAULT_CHAT_MODEL = "mm"  # the OpenAI API's name for the server's default backend
MAX_PARTS = 64  # content parts of one chat message
MAX_STOP_CHARS = 200

MessageText = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
RequestId = Annotated[str, Field(max_length=256)] | Annotated[int, Strict()]  # strict: true is no id


class Citation(BaseModel):
    id: int
    modality: str
    score: float
    caption: str


class Sampling(TypedDict):
    """How an answer is sampled: the keyword arguments every generation entry point passes on."""

    max_tokens: int
    temperature: float
    stop: list[str] | None


class GenerateParams(BaseModel):
    """A grounded question, as ``POST /generate`` and the WebSocket's ``generate`` message take it."""

    model_config = ConfigDict(extra="forbid")

    query: QueryText = Field(description="the question; also the retrieval query")
    k: int = Field(5, ge=1, le=MAX_GROUNDING_K, description="items retrieved to ground the answer")
    modalities: list[Modality] | None = Field(None, description="modalities of the retrieved items")
    backend: Backend | None = Field(None, description="generator backend; MM_GENERATOR when omitted")
    max_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    stop: list[StopText] | None = Field(None, max_length=MAX_STOPS, description="stop strings (not emitted)")
    rewrite: bool | None = Field(
        None,
        description="search the name of the thing the question asks for, as the packaged small LM rewrites "
        "it; omitted: the server's MM_REWRITE (true on a server without it: 503)",
    )

    def sampling(self) -> Sampling:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "stop": self.stop}

    def retrieval(self) -> SearchQuery:
        """The search that grounds the answer: the question's content words as a text query (hybrid, the
        default mode), so that its framing ("Which animal ...", "what makes ...") does not match captions
        that merely contain those words (``service.generation.prompts.retrieval_text``)."""
        from service.generation.prompts import retrieval_text  # lazy: generation imports this module

        return SearchQuery(query=retrieval_text(self.query), k=self.k, modalities=self.modalities)


class GenerateRequest(GenerateParams):
    stream: bool = Field(False, description="answer as Server-Sent Events")


class GenerateResponse(BaseModel):
    answer: str
    citations: list[Citation]
    backend: str
    rewritten: str | None = Field(None, description="the name searched for the question, when rewritten")


class WSSearch(SearchQuery):
    """A WebSocket search: the body of ``POST /search`` plus the message's ``type`` and ``id``."""

    type: Literal["search"]
    id: RequestId


class WSGenerate(GenerateParams):
    """A WebSocket generation: :class:`GenerateParams` plus the message's ``type`` and ``id``."""

    type: Literal["generate"]
    id: RequestId


class WSCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]
    id: RequestId


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are read (images and others are ignored)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64)
    text: MessageText | None = Field(None, description="required, a string, when type is 'text'")

    @model_validator(mode="after")
    def _text_part(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' part needs a string 'text'")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(max_length=64)
    # the part count bounds the list only (a Field(max_length=...) here would bound the string too)
    content: MessageText | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(DEFAULT_CHAT_MODEL, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    # the count bounds the list only (a Field(max_length=...) on the union would bound the string too)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    mm_k: int = Field(5, ge=1, le=MAX_GROUNDING_K)
    mm_modalities: list[Modality] | None = None
