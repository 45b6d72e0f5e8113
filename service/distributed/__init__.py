"""Ray plumbing shared by distributed ingest (:mod:`service.distributed.ingest`) and sharded search.

Ray is the optional extra ``mm[ray]``: nothing here imports it at import time, so ``import service``
(and the CLI) never loads Ray; :func:`import_ray` does, with an install hint when it is missing, and
:func:`connect` joins a cluster once per process (a second caller with the same address reuses it).
"""

from __future__ import annotations

import logging
import socket
from types import ModuleType

log = logging.getLogger(__name__)

INSTALL_HINT = "Ray is not installed: pip install 'mm[ray]'"
LOCAL = "local"  # ``--ray local``: start a Ray instance on this machine for the run
CONNECT_TIMEOUT_S = 5.0  # to reach the cluster's address at all, before Ray's own (long) retries


class RayUnavailable(RuntimeError):
    """Ray is missing, or the cluster at the given address cannot be reached (a one-line CLI error)."""


def import_ray() -> ModuleType:
    """``ray``, imported on first use; :class:`RayUnavailable` with the install hint if it is missing."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(INSTALL_HINT) from e
    return ray


def connect(address: str, *, num_cpus: int | None = None) -> ModuleType:
    """Join the Ray cluster at ``address`` (``host:port``, ``ray://host:port`` or ``auto``), or start one on
    this machine for ``"local"``; returns the ``ray`` module. Already connected (a test's cluster, a second
    caller in the same process): the connection is reused for the same address, ``local`` or ``auto``.

    ``num_cpus`` sizes the local instance only. A token cluster (``RAY_AUTH_MODE=token``) reads its token
    from ``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token`` as Ray itself does; it is never logged.
    """
    ray = import_ray()
    if not address:
        raise RayUnavailable("give a Ray address (host:port, ray://host:port, auto) or 'local'")
    if address not in (LOCAL, "auto"):
        _check_reachable(address)  # ray.init retries an unreachable address for minutes, silently
    if ray.is_initialized():
        current = str(ray.get_runtime_context().gcs_address)
        if address in (LOCAL, "auto") or address.removeprefix("ray://") == current:
            return ray
        raise RayUnavailable(f"this process is connected to the Ray cluster at {current}, not {address!r}")
    try:
        if address == LOCAL:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            # workers import mm, index and service as installed on their node (`pip install 'mm[ray]'`)
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address!r}: {_first_line(e)}") from e
    log.info("connected to Ray at %s (%s)", address, ray.cluster_resources())
    return ray


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"bad Ray address {address!r}: want host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise RayUnavailable(f"cannot reach a Ray cluster at {address!r}: {why}") from e


def disconnect() -> None:
    """Leave the cluster (a local instance started by :func:`connect` is shut down with it)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
