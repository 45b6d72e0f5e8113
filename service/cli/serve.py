"""``mm serve --collection DIR``: run the REST service with uvicorn (other settings from ``MM_*``)."""

from __future__ import annotations

import argparse

from service.cli.common import add_collection, add_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the REST API (and /docs) with uvicorn")
    add_collection(p)
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(collection=args.collection, model=args.model))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
