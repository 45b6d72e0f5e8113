"""Shards served by Ray actors: ``mm serve --ray ADDRESS --collection DIR`` on a sharded collection.

One actor per shard (:class:`ShardServer`) opens its shard's collection from disk and answers the
collection calls the service makes (:data:`FORWARDED`); the server holds a :class:`RayShard` proxy per
actor and an :class:`~index.sharded.ShardedCollection` over the proxies, so fan-out, deadline, merge,
global ids and routed writes are the in-process ones. An actor that dies is restarted by Ray
(``max_restarts``) and reopens its shard from disk (a collection's open catches up what a kill left);
calls in flight when it died are not retried (``max_task_retries=0``: a write must not run twice) and
fail as :class:`~index.sharded.ShardUnavailable` for that shard, which the service answers 503 (or a
marked partial answer).

Where an actor runs: the shard's folder must be on its node. On one machine (or with the shards on
shared storage) any node will do; on a cluster whose nodes hold their own shards, start each node with
a custom resource per shard it holds (``ray start --resources='{"mm_shard_003": 1}'``) and the actor of
shard 3 is placed there.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from index.sharded import THREADS_PER_SHARD, ShardedCollection, ShardUnavailable, shard_dir

log = logging.getLogger(__name__)

# The collection calls a shard actor answers: the read API, routed writes, and what ingest_one reads.
FORWARDED = frozenset(
    {
        "search",
        "lexical_search",
        "get",
        "vector",
        "vectors",
        "find_by_uri",
        "find_by_sha256",
        "uris_under",
        "items",
        "errors",
        "count",
        "stats",
        "all_vectors",
        "add",
        "upsert",
        "delete",
        "update_metadata",
        "save",
    }
)
ACTOR_CPUS = 0.25  # scheduling share of one shard actor (a search is short; Ray does not cap its threads)
CALL_TIMEOUT_S = 60.0  # the longest one call may take (a write of a batch); searches have the deadline
START_TIMEOUT_S = 300.0  # every shard actor placed and its collection open (a large shard opens in ~2 s)
MAX_RESTARTS = -1  # Ray restarts a dead shard actor for ever (each start reopens the shard from disk)
SHARD_RESOURCE = "mm_shard_{:03d}"  # a node's custom resource naming a shard it holds (placement)


class ShardServer:
    """The actor of one shard (made a Ray actor class by :func:`open_ray_sharded`): its collection,
    opened on the actor's node."""

    def __init__(self, path: str, shard: int, readonly: bool) -> None:
        from index.collection import Collection

        t0 = time.perf_counter()
        self.shard = shard
        self.coll = Collection.open(path, readonly=readonly)
        self.open_s = time.perf_counter() - t0
        log.info("shard %d open from %s in %.2fs (pid %d)", shard, path, self.open_s, os.getpid())

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        if method not in FORWARDED:  # a proxy asks only these; anything else is a bug, said by name
            raise AttributeError(f"a shard actor does not answer {method!r}")
        return getattr(self.coll, method)(*args, **kwargs)

    def info(self) -> dict[str, Any]:
        """Where and since when this incarnation runs (a restart changes ``pid``)."""
        import ray

        return {
            "shard": self.shard,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "open_s": self.open_s,
            "items": self.coll.count(),
            "rss_mb": _rss_mb(),
        }

    def close(self) -> None:
        self.coll.close()


def _rss_mb() -> float | None:
    """This process's resident memory (Linux), for the benchmark's memory per shard."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RayShard:
    """A shard actor as the sharded collection sees a shard: :class:`~index.collection.Collection`'s
    methods (those in :data:`FORWARDED`), each one call to the actor. An actor that cannot answer (dead,
    restarting, gone with its node, or over ``timeout_s``) raises :class:`ShardUnavailable` naming the
    shard; what the collection itself raises (a ValueError for a bad query) comes through as it is."""

    readonly = False

    def __init__(self, ray: Any, actor: Any, shard: int, path: Path, timeout_s: float = CALL_TIMEOUT_S):
        self.ray = ray
        self.actor = actor
        self.shard = shard
        self.path = path
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"RayShard({self.shard}, {str(self.path)!r})"

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        exc = self.ray.exceptions
        try:
            return self.ray.get(self.actor.call.remote(method, args, kwargs), timeout=self.timeout_s)
        except exc.GetTimeoutError:
            why = f"its actor gave no answer within {self.timeout_s:.0f}s"
            raise ShardUnavailable({self.shard: why}) from None
        except (exc.RayActorError, exc.ActorUnavailableError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            why = f"its actor is unavailable ({type(e).__name__}: {first})"
            raise ShardUnavailable({self.shard: why}) from e

    def info(self) -> dict[str, Any]:
        return self.ray.get(self.actor.info.remote(), timeout=self.timeout_s)

    def close(self) -> None:
        """Close the shard's collection (its FAISS file saved) and end the actor for good."""
        try:
            self.ray.get(self.actor.close.remote(), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a dead actor has nothing left to save
            log.warning("shard %d did not close cleanly: %s", self.shard, e)
        self.ray.kill(self.actor, no_restart=True)


def _forward(name: str) -> Any:
    def method(self: RayShard, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``Collection.{name}`` of the shard, answered by its actor."
    return method


for _name in sorted(FORWARDED):
    setattr(RayShard, _name, _forward(_name))


def open_ray_sharded(
    path: str | Path,
    address: str,
    *,
    readonly: bool = False,
    deadline_s: float | None = None,
    actor_cpus: float = ACTOR_CPUS,
    max_restarts: int = MAX_RESTARTS,
) -> ShardedCollection:
    """The sharded collection at ``path`` with each shard held by a Ray actor on the cluster at
    ``address`` (joined with :func:`service.distributed.connect`). Returns when every shard answers.

    Raises RayUnavailable (Ray missing: the install hint; the cluster unreachable) and ValueError (no
    sharded collection at ``path``)."""
    from service.distributed import RayUnavailable, connect

    path = Path(path).expanduser().resolve()
    local = ShardedCollection.open(path, readonly=True)  # checks shards.json and every shard's model
    config, n = local.config, len(local.shards)
    local.close()
    ray = connect(address)
    resources = ray.cluster_resources()
    server = ray.remote(ShardServer)
    proxies = []
    t0 = time.perf_counter()
    for s in range(n):
        placed = SHARD_RESOURCE.format(s)
        options: dict[str, Any] = {
            "num_cpus": actor_cpus,
            "max_restarts": max_restarts,
            "max_task_retries": 0,
            "max_concurrency": THREADS_PER_SHARD,  # searches of one shard side by side (many readers)
        }
        if placed in resources:
            options["resources"] = {placed: 0.001}
        actor = server.options(**options).remote(str(shard_dir(path, s)), s, readonly)
        proxies.append(RayShard(ray, actor, s, shard_dir(path, s)))
    try:
        ray.get([p.actor.info.remote() for p in proxies], timeout=START_TIMEOUT_S)  # every shard open
    except Exception as e:
        for p in proxies:
            ray.kill(p.actor, no_restart=True)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            why = (
                f"not all {n} shard actors started within {START_TIMEOUT_S:.0f}s: the cluster needs "
                f"{actor_cpus} CPU per shard (and each shard's {SHARD_RESOURCE.format(0)}-style resource "
                "where nodes declare them)"
            )
        else:
            why = f"a shard actor could not open its shard: {str(e).strip().splitlines()[-1][:300]}"
        raise RayUnavailable(why) from e
    log.info("%d shard actors up in %.1fs on %s", n, time.perf_counter() - t0, address)
    return ShardedCollection(path, proxies, config, deadline_s=deadline_s)
