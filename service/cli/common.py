"""Helpers shared by the ``mm`` subcommands: parser class, common options, filters, output."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


class UsageError(ValueError):
    """Bad arguments found after parsing (exit code 2)."""


class CLIParser(argparse.ArgumentParser):
    """Prints usage errors as one line, ``mm: error: ...``, and exits 2."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("mm").strip()
        sys.stderr.write(f"mm: error: {where + ': ' if where else ''}{message}\n")
        raise SystemExit(2)


def add_collection(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("MM_COLLECTION")
    p.add_argument(
        "--collection",
        "-c",
        type=Path,
        default=Path(default) if default else None,
        required=default is None,
        metavar="DIR",
        help="collection directory (default: $MM_COLLECTION)",
    )


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=os.environ.get("MM_MODEL", "default"),
        metavar="NAME|PATH",
        help="model config name or checkpoint directory (default: $MM_MODEL or 'default')",
    )


def split_csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def parse_filters(specs: list[str]) -> dict[str, object]:
    """``["tag=x", "path=/a", "since=2024-01-01", "until=..."]`` -> keyword arguments of build_filter."""
    out: dict[str, object] = {}
    tags: list[str] = []
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().lower()
        if not sep or not value:
            raise UsageError(f"--filter takes KEY=VALUE (tag, path, since, until), got {spec!r}")
        if key in ("tag", "tags"):
            tags.extend(split_csv(value))
        elif key in ("path", "path_prefix"):
            out["path_prefix"] = os.path.abspath(os.path.expanduser(value))
        elif key in ("since", "until"):
            out[key] = value
        else:
            raise UsageError(f"unknown filter {key!r}: use tag=, path=, since= or until=")
    if tags:
        out["tags"] = tags
    return out


def load_embedder(name: str):
    from service import embedding

    return embedding.load_embedder(name)


def clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A compact left-aligned text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
