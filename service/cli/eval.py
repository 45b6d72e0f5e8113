"""`mm eval`: cross-modal Recall@1/5/10 and mean rank on a manifest split."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="retrieval metrics for every direction a manifest supports")
    p.add_argument("--manifest", required=True)
    p.add_argument(
        "--model", default=None, help="config/checkpoint name or directory (default: the shipped model)"
    )
    p.add_argument("--split", default="test", help="train|val|test, or 'all'")
    p.add_argument("--chance", action="store_true", help="also report the chance level per direction")
    p.add_argument(
        "--search",
        action="store_true",
        help="also measure text queries through the search path (a collection of the split, each mode), "
        "and spoken queries as /search/upload answers them, with and without their transcript",
    )
    p.add_argument(
        "--spoken",
        type=int,
        default=100,
        metavar="N",
        help="with --search: at most N spoken queries (clips of speech in the split; 0: none)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mm.evaluate import evaluate_rows, mixed_gallery_metrics
    from mm.model import create_model, default_model_name
    from mm.train import load_rows

    rows = load_rows(args.manifest, None if args.split == "all" else args.split)
    if not rows:
        raise ValueError(f"no rows in split {args.split!r} of {args.manifest}")
    emb = create_model(args.model or default_model_name())
    from service.search_eval import usable_rows

    # each item is encoded once for every metric below; a file the decoder refuses is left out (logged)
    rows, encode, _ = usable_rows(rows, emb)
    metrics: dict[str, Any] = evaluate_rows(rows, encode, with_chance=args.chance)
    # one ranking over images and sounds, merged by calibrated score as search merges them
    mixed = mixed_gallery_metrics(rows, encode, emb.calibration.score if emb.calibration.fitted else None)
    if mixed:
        metrics["mixed"] = mixed
    if args.search:
        from service.search_eval import evaluate_search

        metrics["search"] = evaluate_search(rows, emb, encode=encode)
        if args.spoken > 0:
            from service.search_eval import evaluate_spoken, spoken_queries
            from service.transcription import LazyTranscriber, transcription_enabled

            if spoken_queries(rows):  # the recogniser that mm serve attaches (service.embedding)
                hear = LazyTranscriber() if transcription_enabled() else None
                metrics["search_spoken"] = evaluate_spoken(rows, emb, hear, limit=args.spoken, encode=encode)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{'direction':<16}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mean rank':>11}{'n':>6}")
    for name, m in metrics.items():
        if name in ("mixed", "search", "search_spoken"):
            continue
        print(
            f"{name:<16}{m['R@1']:>7.3f}{m['R@5']:>7.3f}{m['R@10']:>7.3f}{m['mean_rank']:>11.1f}{m['n']:>6}"
        )
    if mixed:
        print(
            f"mixed gallery (text -> images + sounds): both in top 10 {mixed['both_at_10']:.3f} "
            f"(n={mixed['n_both']}); a sound in the top 3 where the concept has none "
            f"{mixed['sound_when_absent_at_3']:.3f} (n={mixed['n_absent']}, lower is better)"
        )
    for mode, dirs in metrics.get("search", {}).items():
        for name, m in dirs.items():
            print(f"search [{mode:>7}] {name:<14} R@1 {m['R@1']:.3f}  R@10 {m['R@10']:.3f}  n={m['n']}")
    spoken = metrics.get("search_spoken")
    if spoken:
        print(f"spoken queries (n={spoken['n']}, {spoken['transcribed']:.0%} given a transcript): R@10")
        for mode, dirs in spoken["fused"].items():
            for name, m in dirs.items():
                clip_only = spoken["clip"][mode][name]
                print(
                    f"search [{mode:>7}] {name:<14} clip alone {clip_only['R@10']:.3f}  "
                    f"with transcript {m['R@10']:.3f}  n={m['n']}"
                )
    return 0
