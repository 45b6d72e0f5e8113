"""The Ray fixtures (``tests/conftest.py`` imports them; the tests using them live in ``tests/ray/`` and are
marked ``ray`` there). Not ``tests/ray/conftest.py``: a second ``conftest`` module would shadow the root
one for the tests that import helpers from it.

One local Ray cluster for the whole session: a head (no CPUs, so every task and actor runs on a worker)
and two 1-CPU worker nodes on the loopback address, with token authentication (``RAY_AUTH_MODE=token``).
``ray_cluster`` yields the cluster's address (``host:port``) with this process connected to it as the
driver, so code under test calls :func:`service.distributed.connect` and reuses the connection.
``ray_cluster_handle`` is the ``ray.cluster_utils.Cluster`` itself; ``ray_add_worker`` adds a node a test
may kill. Without the ``mm[ray]`` extra these fixtures skip with the install hint.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"
WORKER_CPUS = 1
OBJECT_STORE_BYTES = 96 * 1024 * 1024  # per node: the tests move kilobytes; Ray's default is 30% of RAM
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take 127.0.0.1 as every node's address (its choice for a
# desktop): otherwise a worker node advertises the host's own IP, which a sandbox may not route.
_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


_STOPS: list[Callable[[], None]] = []  # how to stop the running cluster (at most one)


def stop_cluster() -> None:
    """Stop the session's cluster now (idempotent): ``tests/conftest.py`` calls it after the last test
    that uses it, so its nodes (~2 GB, a few daemons) do not idle through the rest of the run."""
    while _STOPS:
        _STOPS.pop()()


def add_worker(cluster: Any) -> Any:
    """A 1-CPU worker node on loopback; returns its node handle (``cluster.remove_node(node)`` kills it)."""
    return cluster.add_node(
        num_cpus=WORKER_CPUS, object_store_memory=OBJECT_STORE_BYTES, node_ip_address=LOOPBACK
    )


@pytest.fixture(scope="session")
def ray_cluster_handle() -> Iterator[Any]:
    saved = {k: os.environ.get(k) for k in [*_ENV, "RAY_AUTH_TOKEN"]}
    # before Ray reads its config (at import): the nodes this process starts inherit the environment
    os.environ.update(_ENV)
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)  # this session's only; never ~/.ray/auth_token
    try:
        import ray
        from ray._raylet import AuthenticationTokenLoader, Config
        from ray.cluster_utils import Cluster
    except ImportError:
        pytest.skip("Ray is not installed: pip install 'mm[ray]'")
    Config.initialize("")  # in case Ray was imported earlier in the session: re-read the auth mode
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # ditto for the loopback choice above
    AuthenticationTokenLoader.instance().reset_cache()
    t0 = time.perf_counter()

    def stop() -> None:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "node_ip_address": LOOPBACK,
        },
    )
    _STOPS.append(stop)
    try:
        for _ in range(2):
            add_worker(cluster)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.start_s = time.perf_counter() - t0  # type: ignore[attr-defined]
        yield cluster
    finally:
        stop_cluster()


@pytest.fixture(scope="session")
def ray_cluster(ray_cluster_handle: Any) -> str:
    """The address (``host:port``) of the session's cluster; this process is connected to it."""
    return str(ray_cluster_handle.address)


@pytest.fixture
def ray_add_worker(ray_cluster_handle: Any) -> Any:
    """``ray_add_worker()`` starts one more 1-CPU worker node and returns its handle (to kill it with
    ``ray_cluster_handle.remove_node(node, allow_graceful=False)``); one still alive is removed after."""
    added: list[Any] = []

    def add() -> Any:
        node = add_worker(ray_cluster_handle)
        ray_cluster_handle.wait_for_nodes()
        added.append(node)
        return node

    yield add
    for node in added:
        if node in ray_cluster_handle.worker_nodes:
            ray_cluster_handle.remove_node(node)
