"""`mm demo`: sample corpus -> indexed collection -> example queries -> the service on 127.0.0.1:8000."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="sample corpus -> index -> example queries -> serve")
    p.add_argument("--work", type=Path, default=Path("demo"), help="work directory (reused on later runs)")
    p.add_argument("--model", default=None, help="model name or checkpoint (default: the shipped default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="stop after the example queries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.demo import demo

    demo(args.work, model=args.model, host=args.host, port=args.port, serve=not args.no_serve)
    return 0
