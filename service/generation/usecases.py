"""Answering a question from retrieved items: the use cases ``POST /generate``, the WebSocket, the
OpenAI-compatible API and ``mm ask`` share.

:func:`start_stream` (blocking) validates the parameters, trims the items to what the backend uses and
starts it; :func:`start_answer` does that in the generation thread and waits for the first piece, so
that a backend that cannot answer fails before any byte of the response is sent.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from index.types import Hit
from mm.errors import MediaError
from mm.media import text_snippet
from service.errors import APIError
from service.generation.base import Generator, GeneratorUnavailable, check_params
from service.generation.bridge import iterate_in_thread
from service.generation.registry import Generators
from service.generation.rewrite import Grounding, answerer, ground
from service.generation.usage import Usage, usage_of
from service.schemas import Citation, GenerateParams, SearchQuery


def citations(hits: Sequence[Hit]) -> list[Citation]:
    """What an answer cites, each caption a snippet as in a search hit (a stored text may be 1 MB; the
    whole of it is GET /items/{id}'s)."""
    return [
        Citation(
            id=int(h.id),
            modality=h.item.modality,
            score=round(float(h.score), 6),
            caption=text_snippet(h.item.caption),
        )
        for h in hits
    ]


def start_stream(
    generator: Generator,
    question: str,
    hits: list[Hit] | Grounding,
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    stop: Sequence[str] | None = None,
) -> tuple[Iterator[str], list[Citation]]:
    """Validate, trim the hits to what the backend uses, and return (pieces, citations).

    A backend that picks its evidence (``select(question, hits)``, e.g. ``extractive``) is given only
    the items it picked, so the citations are exactly the items its answer cites ([n] is the n-th).
    ``hits`` may be a :class:`Grounding`: its question is answered from its hits, by
    :func:`~service.generation.rewrite.answerer` (a rewrite's name has a floor of its own).
    """
    if isinstance(hits, Grounding):
        generator = answerer(generator, hits)
        question, hits = hits.question, hits.hits
    stops = check_params(max_tokens, temperature, stop)
    limit = generator.max_items
    used = hits if limit is None else hits[:limit]
    select = getattr(generator, "select", None)
    if select is not None:
        used = select(question, used)
    pieces = generator.stream(question, used, max_tokens=max_tokens, temperature=temperature, stop=stops)
    return iter(pieces), citations(used)


def generators_of(app: Any) -> Generators:
    """The app's backend registry, made on first use (item vectors come from its collection)."""
    gens = getattr(app.state, "generators", None)
    if gens is None:
        calibration = getattr(app.state.embedder, "calibration", None)
        gens = app.state.generators = Generators(app.state.settings, app.state.collection.vector, calibration)
    return gens


@dataclass
class Answer:
    """A started generation: its first piece (already made, so failures surface before any byte is sent)."""

    pieces: AsyncGenerator[str, None]
    first: str | None  # None: the answer is empty
    citations: list[Citation]
    backend: str
    source: list[Iterator[str]] = field(default_factory=list)  # the backend's own pieces, once started
    rewritten: str | None = None  # the name searched for the question (service.generation.rewrite)

    def done_fields(self) -> dict[str, str]:
        """What the last message of a streamed answer (SSE ``done``, WebSocket ``done``) says: the backend,
        and the name searched when the question was rewritten."""
        return {"backend": self.backend} | ({} if self.rewritten is None else {"rewritten": self.rewritten})

    def usage(self) -> Usage | None:
        """Token counts so far (final once :meth:`rest` is done); None when the backend does not count."""
        return usage_of(self.source[0]) if self.source else None

    async def rest(self) -> AsyncGenerator[str, None]:
        try:
            if self.first is None:
                return
            yield self.first
            async for piece in self.pieces:
                yield piece
        finally:
            await self.pieces.aclose()


def rewritten_hits(
    app: Any, question: str, query: SearchQuery, wanted: bool | None
) -> Callable[[], Grounding] | None:
    """When the question is to be rewritten (``wanted``, a request's ``rewrite``; None: ``MM_REWRITE``):
    the blocking retrieval that rewrites it and searches the name (:func:`service.generation.rewrite.ground`,
    ``query`` the question's own search for its fallback), for :func:`start_answer`. None otherwise.

    A server loads the rewriter's model only when ``MM_REWRITE`` asks for it (at start): a request asking
    for a rewrite on a server without it is a 503, as for a backend that is not set up."""
    gens = generators_of(app)
    if not gens.rewrites(wanted):
        return None
    if gens.settings.rewrite == "off":
        raise APIError(
            503,
            "question rewriting is off on this server: start it with MM_REWRITE=gguf (the llm extra)",
            "generator_unavailable",
        )
    from service.search import answer

    emb, coll = app.state.embedder, app.state.collection
    return functools.partial(ground, gens.rewriter(), question, query, lambda q: answer(q, emb, coll).hits)


def unavailable(exc: GeneratorUnavailable) -> APIError:
    return APIError(503, str(exc), "generator_unavailable")


async def start_answer(
    app: Any,
    question: str,
    hits: list[Hit] | Callable[[], list[Hit] | Grounding],
    *,
    backend: str | None,
    max_tokens: int,
    temperature: float,
    stop: list[str] | None,
) -> Answer:
    """Pick the backend, start it in a thread and wait for its first piece. Raises APIError 422/503.

    The backend starts (model loading, parameter checks) in the thread that then makes the pieces:
    one thread hand-off from here to the first piece. ``hits`` may be a function that retrieves them
    (e.g. :func:`service.search.answer`'s hits): it then runs in that thread too. A function may give a
    :class:`Grounding` (:func:`rewritten_hits`): the backend then answers its question from its hits.
    """
    try:
        gen = generators_of(app).get(backend)
    except ValueError as exc:
        raise APIError(422, str(exc), "validation_error") from exc
    cites: list[Citation] = []
    source: list[Iterator[str]] = []
    rewritten: list[str] = []

    def begin() -> Iterator[str]:
        found = hits() if callable(hits) else hits
        if isinstance(found, Grounding) and found.rewritten is not None:
            rewritten.append(found.rewritten)
        pieces, used = start_stream(
            gen, question, found, max_tokens=max_tokens, temperature=temperature, stop=stop
        )
        cites.extend(used)
        source.append(pieces)
        return pieces

    agen = iterate_in_thread(begin)
    try:
        first: str | None = await agen.__anext__()
    except StopAsyncIteration:
        first = None
    except GeneratorUnavailable as exc:
        await agen.aclose()
        raise unavailable(exc) from exc
    except MediaError:  # from retrieval; the app's handler maps it to 415/422/413
        await agen.aclose()
        raise
    except ValueError as exc:
        await agen.aclose()
        raise APIError(422, str(exc), "validation_error") from exc
    return Answer(agen, first, cites, gen.name, source, rewritten[0] if rewritten else None)


async def answer_request(
    app: Any, req: GenerateParams, hits: list[Hit] | Callable[[], list[Hit] | Grounding]
) -> Answer:
    """:func:`start_answer` for a ``POST /generate`` body or a WebSocket ``generate`` message: its
    question, backend and sampling parameters."""
    return await start_answer(app, req.query, hits, backend=req.backend, **req.sampling())
