"""`mm eval`: cross-modal Recall@1/5/10 and mean rank on a manifest split."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="retrieval metrics for every direction a manifest supports")
    p.add_argument("--manifest", required=True)
    p.add_argument(
        "--model", default=None, help="config/checkpoint name or directory (default: the shipped model)"
    )
    p.add_argument("--split", default="test", help="train|val|test, or 'all'")
    p.add_argument("--chance", action="store_true", help="also report the chance level per direction")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mm.evaluate import evaluate_rows
    from mm.model import create_model, default_model_name
    from mm.train import load_rows

    rows = load_rows(args.manifest, None if args.split == "all" else args.split)
    if not rows:
        raise ValueError(f"no rows in split {args.split!r} of {args.manifest}")
    emb = create_model(args.model or default_model_name())
    metrics = evaluate_rows(rows, emb.encode, with_chance=args.chance)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{'direction':<16}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mean rank':>11}{'n':>6}")
    for name, m in metrics.items():
        print(
            f"{name:<16}{m['R@1']:>7.3f}{m['R@5']:>7.3f}{m['R@10']:>7.3f}{m['mean_rank']:>11.1f}{m['n']:>6}"
        )
    return 0
