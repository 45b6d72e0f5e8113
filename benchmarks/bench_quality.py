"""Retrieval quality of the default recipe against its ablations, side by side on one split and budget.

Variants (all trained with the same recipe, steps and seed, on the same cached frozen features):
  default  the `small` config: frozen encoders -> shared AAM + D-MoE backbone (+ pooled residual)
  linear   frozen encoders + linear projections only (no backbone): the strong linear-probe baseline
  dense    the backbone with a dense SwiGLU FFN instead of D-MoE
  full     the backbone with full attention instead of AAM
  chance   a random ranking (computed exactly)

    python benchmarks/bench_quality.py --manifest corpus/manifest.jsonl [--max-steps 600]

Prints a Markdown table and, as its last line, one JSON object:
{"budget": {...}, "variants": {name: {"val": {direction: metrics}, "test": {...}, "train_seconds": s}},
 "chance": {direction: metrics}, "unseen_word_queries": {...}, "checks": {...}}
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "default": {},
    "linear": {"head": "linear"},
    "dense": {"backbone.ffn": "dense"},
    "full": {"backbone.attention": "full"},
}
DIRECTIONS = ("text->image", "image->text", "text->audio", "audio->text", "image->audio", "audio->image")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default="corpus/manifest.jsonl")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--max-steps", type=int, default=None, help="steps per variant (default: recipe's)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default="runs/bench_quality", help="where runs and the feature cache live")
    ap.add_argument("--cache-dir", default=None, help="shared frozen-feature cache (default: <work>/cache)")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="model config override for every variant, e.g. text.kind='\"use_multilingual\"' (repeatable)",
    )
    args = ap.parse_args(argv)
    common = {}
    for item in args.override:
        key, _, value = item.partition("=")
        common[key] = json.loads(value)
    logging.basicConfig(level=logging.WARNING)

    from mm.evaluate import evaluate_rows
    from mm.recipes import recipe_config
    from mm.train import TrainConfig, Trainer, load_rows

    work = Path(args.work)
    cache_dir = args.cache_dir or str(work / "cache")
    test_rows = load_rows(args.manifest, "test")
    train_rows = load_rows(args.manifest, "train")
    train_vocab = set().union(*(words(r["text"]) for r in train_rows if r.get("text")))
    results: dict[str, dict] = {}
    unseen: dict[str, dict] = {}
    budget = {}
    for name in args.variants.split(","):
        kw = recipe_config(args.recipe)
        kw["overrides"] = {**kw.get("overrides", {}), **common, **VARIANTS[name]}
        if args.max_steps:
            kw["max_steps"] = args.max_steps
        kw["eval_every"] = kw["max_steps"]
        budget = {k: kw[k] for k in ("max_steps", "batch_size", "lr", "seed")}
        out = work / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cfg = TrainConfig(manifest=args.manifest, out_dir=str(out), cache_dir=cache_dir, progress=False, **kw)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        res = trainer.train()
        seconds = time.perf_counter() - t0
        trainer.cache_rows(test_rows)  # the test split's frozen features, once for every run
        test = trainer.evaluate(test_rows)
        results[name] = {"val": res.val, "test": test, "train_seconds": round(seconds, 1)}
        # Queries whose caption has a word that never occurs in any training caption.
        novel = [r for r in test_rows if r.get("text") and r.get("image") and words(r["text"]) - train_vocab]
        if novel:
            unseen[name] = trainer.evaluate(novel).get("text->image", {})
        print(f"{name}: trained {res.steps} steps in {seconds:.0f}s", file=sys.stderr)
    # Chance needs no model: any encoder gives the same relevance sets; zeros keep it cheap.
    zeros = evaluate_rows(test_rows, lambda m, keys: np.zeros((len(keys), 2), np.float32), with_chance=True)
    chance = {d: v["chance"] for d, v in zeros.items()}

    print("\n| variant | " + " | ".join(f"{d} R@10" for d in DIRECTIONS) + " |")
    print("|---|" + "---|" * len(DIRECTIONS))
    for name, r in [*results.items(), ("chance", {"test": {d: c for d, c in chance.items()}})]:
        cells = [f"{r['test'][d]['R@10']:.3f}" if d in r["test"] else "-" for d in DIRECTIONS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    checks = {}
    if "default" in results:
        t = results["default"]["test"]
        checks["text->image R@10 >= 0.5"] = t.get("text->image", {}).get("R@10", 0) >= 0.5
        checks["image->text R@10 >= 0.5"] = t.get("image->text", {}).get("R@10", 0) >= 0.5
        for d in DIRECTIONS:
            if "audio" in d and d in t:
                checks[f"{d} >= 3x chance"] = t[d]["R@10"] >= 3 * chance[d]["R@10"]
        if "linear" in results:
            lt = results["linear"]["test"]
            for d in ("text->image", "image->text"):
                if d in t and d in lt:
                    checks[f"{d} beats linear by 5 points"] = t[d]["R@10"] - lt[d]["R@10"] >= 0.05
    print(
        json.dumps(
            {
                "budget": budget,
                "variants": results,
                "chance": chance,
                "unseen_word_queries": unseen,
                "checks": checks,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
