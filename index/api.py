"""The collection API the service reads and writes through, whatever holds the items.

Three things have it: a :class:`~index.collection.Collection`, a
:class:`~index.sharded.ShardedCollection` of collections opened in this process, and a sharded
collection whose shards are Ray actors (``service.distributed.shards``). The service (``service.search``,
``service.ranking``, the routers) is written against :class:`CollectionAPI` only; the two ways a sharded
one differs are asked here, in one place, not at every call:

- :func:`fans_out`: a search waits on other threads or processes (up to a deadline), so an async caller
  runs it off the event loop;
- :func:`reader`: the view one query reads through; for a query that allows a partial answer, a sharded
  collection's view answers from the shards that can and records the others.

A shard that fails or is late raises :class:`~index.sharded.ShardUnavailable` naming it (REST: 503).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from index.types import Filter, Hit, Item


@runtime_checkable
class CollectionAPI(Protocol):
    """What the service uses of a collection. Ids are the collection's own (global ids when sharded)."""

    path: Path
    dim: int
    embedder_id: str

    # reads
    def search(
        self, queries: np.ndarray, k: int = 10, filter: Filter | None = None, offset: int = 0
    ) -> list[list[Hit]]: ...

    def lexical_search(self, text: str, k: int = 10, filter: Filter | None = None) -> list[Hit]: ...

    def get(self, id: int) -> Item | None: ...

    def vector(self, id: int) -> np.ndarray | None: ...

    def vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]: ...

    def find_by_uri(self, uri: str) -> Item | None: ...

    def find_by_sha256(self, sha256: str) -> list[Item]: ...

    def uris_under(self, prefix: str) -> set[str]: ...

    def items(
        self, *, modality: str | None = None, limit: int = 100, offset: int = 0, include_errors: bool = False
    ) -> list[Item]: ...

    def count(self, modality: str | None = None) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    # writes (a sharded collection routes each to the owning shard; never partial)
    def add(self, vectors: np.ndarray, items: list[Item]) -> list[int]: ...

    def upsert(self, vectors: np.ndarray, items: list[Item]) -> list[int]: ...

    def delete(self, ids: Iterable[int]) -> int: ...

    def update_metadata(self, id: int, **fields: Any) -> None: ...

    def save(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


def fans_out(collection: CollectionAPI) -> bool:
    """Whether a search of ``collection`` waits on other threads or processes (a sharded one)."""
    from index.sharded import ShardedCollection

    return isinstance(collection, ShardedCollection)


def reader(collection: CollectionAPI, *, allow_partial: bool) -> tuple[CollectionAPI, dict[int, str]]:
    """The view one query reads ``collection`` through, and the shards it could not read (filled in as the
    view searches: shard -> why). Without ``allow_partial``, or for one collection, that is the collection
    itself, which raises ShardUnavailable rather than answer without a shard."""
    from index.sharded import ShardedCollection

    if allow_partial and isinstance(collection, ShardedCollection):
        view = collection.tolerant()
        return view, view.failed
    return collection, {}


def ingest_into(collection: CollectionAPI, embedder: Any, paths: Any, **kw: Any) -> Any:
    """:func:`index.ingest.ingest` into ``collection``; a sharded one ingests each shard's own files
    (:func:`index.sharded.ingest_sharded`). Shards held by Ray actors are indexed with ``mm index --ray``."""
    from index.collection import Collection
    from index.ingest import ingest
    from index.sharded import ShardedCollection, ingest_sharded

    if isinstance(collection, ShardedCollection):
        if not all(isinstance(s, Collection) for s in collection.shards):
            raise ValueError(
                f"the shards of {collection.path} are served by Ray actors: index files into them with "
                f"`mm index PATH --ray ADDRESS --collection {collection.path}`"
            )
        return ingest_sharded(collection, embedder, paths, **kw)
    if not isinstance(collection, Collection):
        raise TypeError(f"cannot ingest into {collection!r}")
    return ingest(collection, embedder, paths, **kw)
