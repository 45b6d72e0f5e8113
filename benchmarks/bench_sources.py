"""What each corpus source adds: leave-one-out training runs, side by side on one test split.

For every source of the manifest (``--sources`` to pick), the training rows of that source are left out
(validation and test stay whole, so every run is scored on the same queries and galleries) and the model
is trained again with the same recipe, steps and seed; ``all`` keeps every row. The difference to ``all``
on each direction is what the source adds (negative: it hurts).

By default the runs train the linear-probe head (``head=linear``: frozen encoders + linear maps), which
costs seconds per run on cached features where the backbone costs most of an hour on this machine; so
the figures say what each source adds to the shared space of the frozen towers, the part of the model
that a source can move cheaply. ``--head backbone`` runs the full recipe (budget an hour per source).

    python benchmarks/bench_sources.py --manifest corpus/manifest.jsonl [--max-steps 1000] [--cache-dir D]

Prints a Markdown table of test R@10 and, as its last line, one JSON object:
{"budget": {...}, "head": ..., "runs": {"all" | "-SOURCE": {"train_rows", "test": {direction: metrics}}},
 "delta_r10": {"-SOURCE": {direction: all minus this}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths import CACHE, default_manifest  # noqa: E402

DIRECTIONS = ("text->image", "image->text", "text->audio", "audio->text", "image->audio", "audio->image")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(default_manifest()))
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--max-steps", type=int, default=None, help="steps per run (default: the recipe's)")
    ap.add_argument("--sources", default=None, help="comma-separated sources to leave out (default: all)")
    ap.add_argument("--head", choices=("linear", "backbone"), default="linear")
    ap.add_argument("--work", default=str(CACHE / "bench_sources"), help="where the runs live")
    ap.add_argument("--cache-dir", default=None, help="shared frozen-feature cache (default: <work>/cache)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from mm.recipes import recipe_config
    from mm.train import TrainConfig, Trainer, load_rows

    rows = load_rows(args.manifest, None)
    sources = sorted({r.get("source") or "?" for r in rows if r.get("split") == "train"})
    if args.sources:
        unknown = set(args.sources.split(",")) - set(sources)
        if unknown:
            raise SystemExit(f"no training rows from {sorted(unknown)}; the manifest has {sources}")
        sources = args.sources.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or str(work / "cache")
    test_rows = [r for r in rows if r.get("split") == "test"]
    runs: dict[str, dict] = {}
    budget: dict = {}
    for name in ["all", *(f"-{s}" for s in sources)]:
        left_out = name[1:] if name != "all" else None
        kept = [r for r in rows if not (r.get("split") == "train" and (r.get("source") or "?") == left_out)]
        manifest = work / f"{name}.jsonl"  # media paths are absolute once read, so any folder will do
        manifest.write_text("".join(json.dumps(r) + "\n" for r in kept))
        kw = recipe_config(args.recipe)
        if args.head == "linear":
            kw["overrides"] = {**kw.get("overrides", {}), "head": "linear"}
        if args.max_steps:
            kw["max_steps"] = args.max_steps
        kw["eval_every"] = kw["max_steps"]
        budget = {k: kw[k] for k in ("max_steps", "batch_size", "lr", "seed")}
        cfg = TrainConfig(
            manifest=str(manifest), out_dir=str(work / name), cache_dir=cache_dir, progress=False, **kw
        )
        if (work / name).exists():
            import shutil

            shutil.rmtree(work / name)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.train()
        trainer.cache_rows(test_rows)  # the test split's frozen features, once for every run
        test = trainer.evaluate(test_rows)
        n_train = sum(r.get("split") == "train" for r in kept)
        seconds = round(time.perf_counter() - t0, 1)
        runs[name] = {"train_rows": n_train, "test": test, "train_seconds": seconds}
        print(f"{name}: {n_train} training rows, {runs[name]['train_seconds']:.0f} s", file=sys.stderr)
    base = runs["all"]["test"]
    delta = {
        name: {d: round(base[d]["R@10"] - r["test"][d]["R@10"], 4) for d in DIRECTIONS if d in r["test"]}
        for name, r in runs.items()
        if name != "all"
    }
    print("\n| run | train rows | " + " | ".join(f"{d} R@10" for d in DIRECTIONS) + " |")
    print("|---|---|" + "---|" * len(DIRECTIONS))
    for name, r in runs.items():
        cells = [f"{r['test'][d]['R@10']:.3f}" if d in r["test"] else "-" for d in DIRECTIONS]
        print(f"| {name} | {r['train_rows']} | " + " | ".join(cells) + " |")
    print(json.dumps({"budget": budget, "head": args.head, "runs": runs, "delta_r10": delta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
