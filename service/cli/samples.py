"""``mm samples build DIR``: build the sample training corpus from the packaged media."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Kept in sync with service.samples.SOURCES / DEFAULT_LANGUAGES; not imported so `mm --help` stays light.
_SOURCES = "tuxpaint,sonicpi,twemoji,speech"
_EXTRA = "ktuberling,art4apps,cldr,gameicons,scratch"  # opt-in (issue 16); `--sources all` takes all nine
_ROOTS = ("tuxpaint", "sonicpi", "twemoji", "ktuberling", "art4apps", "cldr", "gameicons", "scratch")
_LANGUAGES = "en,fr,de,es,it,pt,nl,ca"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("samples", help="build the sample corpus from packaged media")
    sub = parser.add_subparsers(dest="samples_command", metavar="{build}", required=True)
    build = sub.add_parser(
        "build",
        help="copy Tux Paint / Sonic Pi / twemoji media and espeak-ng speech into DIR with a manifest",
        description="Writes DIR/manifest.jsonl, DIR/media/ and DIR/corpus.json. Re-running reuses "
        "files already built, so an interrupted build resumes.",
    )
    build.add_argument("dir", type=Path, help="output folder (created if missing)")
    build.add_argument(
        "--sources",
        default=_SOURCES,
        help=f"comma-separated sources (default {_SOURCES}); also {_EXTRA}; or all (the training corpus)",
    )
    build.add_argument(
        "--languages", default=_LANGUAGES, help="caption languages for Tux Paint (English always included)"
    )
    build.add_argument(
        "--speech-languages", default="en", help="languages of the captions espeak-ng speaks (default en)"
    )
    build.add_argument("--limit", type=int, default=None, help="at most N items per source (a seeded sample)")
    build.add_argument("--seed", type=int, default=0, help="seed for --limit and speech voices (default 0)")
    build.add_argument("--workers", type=int, default=2, help="parallel espeak-ng processes (default 2)")
    for name in _ROOTS:
        build.add_argument(
            f"--{name}-root", type=Path, default=None, help=f"{name} media folder (default: installed)"
        )
    build.add_argument("--noto-font", type=Path, default=None, help="Noto Color Emoji font (cldr)")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.cli.common import UsageError
    from service.samples import build_corpus

    roots = {f"{k}_root": getattr(args, f"{k}_root") for k in _ROOTS}
    roots = {k: v for k, v in roots.items() if v is not None}
    if args.noto_font is not None:
        roots["noto_font"] = args.noto_font
    try:
        counts = build_corpus(
            args.dir,
            sources=args.sources,
            languages=args.languages,
            limit=args.limit,
            seed=args.seed,
            progress=not args.no_progress,
            speech_languages=args.speech_languages,
            workers=args.workers,
            **roots,
        )
    except FileNotFoundError:
        raise  # no media at all: `mm` prints it and exits 1
    except ValueError as e:  # a bad --sources / --languages / --limit value
        raise UsageError(f"samples build: {e}") from None
    summary = {
        "manifest": str(args.dir / "manifest.jsonl"),
        "rows": counts["rows"],
        "by_source": counts["by_source"],
        "by_split": counts["by_split"],
        "by_modality": counts["by_modality"],
        "skipped": counts["skipped"],
        "licences": {k: v.get("licence") for k, v in counts.get("licences", {}).items()},
        "megabytes": round(counts["bytes"] / 1e6, 1),
        "seconds": counts["seconds"],
        "seconds_by_source": counts.get("seconds_by_source", {}),
    }
    print(json.dumps(summary, indent=2))
    return 0
