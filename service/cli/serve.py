"""``mm serve --collection DIR``: run the REST service with uvicorn (other settings from ``MM_*``).

Once it answers, the server announces itself in ``DIR/serve.json`` (pid, address, model; no key), which
``mm search`` reads to send its query here instead of loading the model (:mod:`service.cli.remote`); the
file goes when the server exits. ``--port 0`` picks a free port (the file says which).

A sharded collection (``mm index --shards S``) is served as one: each search waits up to
``MM_SHARD_DEADLINE_S`` for every shard (503 naming a missing one, unless the request sets
``allow_partial``); with ``--ray ADDRESS`` each shard is held by a Ray actor on that cluster
(docs/scale.md).
"""

from __future__ import annotations

import argparse
import logging

from service.cli.common import UsageError, add_collection, add_model

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the REST API (and /docs) with uvicorn")
    add_collection(p)
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="serve a sharded collection's shards as Ray actors on this cluster (host:port, auto, or "
        "'local'; needs mm[ray])",
    )
    p.set_defaults(func=run)


def with_instance_header(app, instance: str):
    """``app`` with ``X-MM-Instance: <instance>`` added to ``GET /health`` answers: the proof, for
    ``mm search``, that what answers on the port named in ``serve.json`` is the server that wrote it."""
    header = (b"x-mm-instance", instance.encode())

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/health":
            return await app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        return await app(scope, receive, send_with_header)

    return wrapped


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from index.sharded import is_sharded
    from service.app import create_app
    from service.cli import remote
    from service.settings import Settings

    if args.ray is not None and not is_sharded(args.collection):  # before the model loads
        raise UsageError(
            f"--ray serves the shards of a sharded collection; {args.collection} is not one "
            f"(make one with `mm index PATH --shards S --collection {args.collection}`)"
        )
    if args.ray is not None:
        from service.distributed import import_ray

        import_ray()  # the install hint now, not from the app's start
    extra = {"ray_address": args.ray} if args.ray is not None else {}
    settings = Settings(collection=args.collection, model=args.model, **extra)
    instance = remote.new_instance()
    app = with_instance_header(create_app(settings), instance)
    collection = settings.collection

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.started or not self.servers:
                return
            port = self.servers[0].sockets[0].getsockname()[1]  # the real one when --port 0
            info = remote.server_info(collection, args.host, port, args.model, settings.adapter, instance)
            try:
                remote.write_serve_file(collection, info)
            except OSError as exc:  # a read-only folder: the CLI then loads the model itself
                log.warning("cannot write %s: %s", collection / remote.SERVE_FILE, exc)

        async def shutdown(self, sockets=None) -> None:
            # here, not only after run(): uvicorn re-raises a caught SIGTERM/SIGINT once it has shut down
            remote.remove_serve_file(collection, instance)
            await super().shutdown(sockets)

    server = AnnouncingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    try:
        server.run()
    finally:  # a start that failed, or an exit shutdown() did not see
        remote.remove_serve_file(collection, instance)
    return 0
