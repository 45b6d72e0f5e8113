"""Hybrid search against vector-only and keyword-only, through the search path users get.

On the sample corpus's test split (concepts never seen in training), the split's images and sounds become
a collection (`service.search_eval`), and three query sets run through `service.search.answer` in each
mode:

- `split`: every text row of the split, in every caption language, against a gallery whose files carry
  only their names (no sidecar captions): words can help only where a file name says the concept;
- `captioned`: the same queries against the same files with their English captions beside them, as a
  user's captioned folder would be;
- `caption_exact`: each captioned item's own caption quoted as the query, and `file_name`: the words of
  a file's name (``guitar_classical.png`` -> "guitar classical") against the uncaptioned gallery.

Recall is concept-level (a hit carrying the query's label). The last line is one JSON object:
{"split": {mode: {direction: {"R@1", "R@10", "n"}}}, "captioned": ..., "caption_exact": ...,
"file_name": ..., "hybrid_never_loses": bool}.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paths import default_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default=None, help="corpus manifest (default: the demo corpus)")
    p.add_argument("--model", default=None, help="model (default: the shipped default)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-queries", type=int, default=600, help="text queries per set (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from mm.model import create_model, default_model_name
    from mm.train import load_rows
    from service.search_eval import cached_encoder, evaluate_search

    rows = load_rows(args.manifest or default_manifest(), args.split)
    embedder = create_model(args.model or default_model_name())
    rng = random.Random(args.seed)
    texts = [(r["text"], r["label"]) for r in rows if r.get("text") and r.get("label") is not None]
    queries = rng.sample(texts, min(args.max_queries, len(texts)))
    english = [(r["text"], r["label"]) for r in rows if r.get("lang") in (None, "en") and r.get("text")]
    exact = rng.sample(english, min(args.max_queries, len(english)))
    names = sorted({(Path(r[m]).stem, r["label"]) for r in rows for m in ("image", "audio") if r.get(m)})
    names = [(" ".join(re.split(r"[_\-.\d]+", stem)).strip(), label) for stem, label in names]
    names = rng.sample([n for n in names if n[0]], min(args.max_queries, len(names)))
    enc = cached_encoder(embedder)  # one gallery, encoded once for the four query sets
    out: dict = {
        "split": evaluate_search(rows, embedder, queries=queries, encode=enc),
        "captioned": evaluate_search(rows, embedder, captions=True, queries=queries, encode=enc),
        "caption_exact": evaluate_search(rows, embedder, captions=True, queries=exact, encode=enc),
        "file_name": evaluate_search(rows, embedder, queries=names, encode=enc),
    }
    out["hybrid_never_loses"] = all(
        res["hybrid"][d]["R@10"] >= res["vector"][d]["R@10"] for res in out.values() for d in res["vector"]
    )
    out["model"] = embedder.name
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
