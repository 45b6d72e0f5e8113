"""The ``mm`` command line: ``main(argv=None) -> int`` (console script ``mm = service.cli:main``).

Each subcommand lives in ``service/cli/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (``run(args) -> int``). To add a command, add its module name to ``COMMANDS``.

Errors never show a traceback: bad usage prints ``mm: error: ...`` and exits 2; a runtime problem
(missing collection, unreadable file, ...) prints ``mm: error: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from service.cli.common import CLIParser, UsageError

COMMANDS = (
    "index",
    "search",
    "info",
    "remove",
    "export",
    "serve",
    "eval",
    "calibrate",
    "train",
    "samples",
    "demo",
    "ask",
    "finetune",
    "quantize",
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog="mm", description="Multimodal retrieval: index, search and serve collections.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"{__name__}.{name}"
        if importlib.util.find_spec(module_name) is None:  # a command another part has not shipped yet
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from mm.runtime import tune_allocator

    tune_allocator()
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"mm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mm search ... | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        log.debug("command failed", exc_info=True)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, ValueError | OSError | LookupError | RuntimeError):
            message = f"{type(exc).__name__}: {message}"
        print(f"mm: error: {message}", file=sys.stderr)
        if os.environ.get("MM_DEBUG"):
            raise
        return 1
