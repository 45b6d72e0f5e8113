"""The no-match threshold: how often real queries and unrelated ones are flagged "no good match".

Search flags an answer ``no_good_match`` when its best result's calibrated score (``service.search.rank``,
hybrid by default: vector and word evidence fused) is under the model's ``calibration.json`` threshold.
This measures that flag through the one search path on the demo collection, for

- real queries: the validation split's captions (``split == "val"`` rows of the corpus manifest, every
  language) whose concept the collection holds, searched as typed;
- unrelated queries: ``benchmarks/queries_unrelated.txt`` (ours), in two halves (even and odd lines):
  neither chooses the threshold; the first is shown beside the choice, the second checks it;
- held out, never used to choose: the fixed questions of ``../shared/eval/questions.jsonl`` as ``POST
  /generate`` searches them (``GenerateParams.retrieval()``): the answerable ones and the 10 the
  collection cannot answer.

The chosen threshold is the highest that still keeps ``mm.calibration.KEEP_MATCHES`` (90%) of the real
validation queries unflagged (missing a real match costs a user more than a weak list), the rule
``mm calibrate`` applies to vector scores alone. ``--write`` stores it in the checkpoint's
``calibration.json`` (the page, the API and the search path read it from there).

    python benchmarks/bench_nomatch.py [--model default] [--limit 300] [--write]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_generate import (  # noqa: E402
    DEMO_COLLECTION,
    FIXED_QUESTIONS,
    carries,
    item_labels,
    label_of,
    read_questions,
)
from benchmarks.paths import DEMO_CORPUS, ROOT  # noqa: E402

UNRELATED = ROOT / "benchmarks" / "queries_unrelated.txt"


def unrelated_queries(path: Path) -> tuple[list[str], list[str]]:
    """(choose, check): the file's queries, even lines and odd lines (comments and blanks skipped)."""
    lines = [s.strip() for s in path.read_text().splitlines()]
    queries = [s for s in lines if s and not s.startswith("#")]
    return queries[0::2], queries[1::2]


def val_queries(manifest: Path, present: set[str], limit: int) -> list[str]:
    """Validation-split captions whose concept the collection holds, evenly spread, at most ``limit``."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    texts = list(
        dict.fromkeys(
            r["text"]
            for r in rows
            if r.get("split") == "val" and r.get("text") and any(carries(p, r["label"]) for p in present)
        )
    )
    if limit and len(texts) > limit:
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, limit).astype(int)]
    return texts


def top_scores(queries: Sequence[str], embedder: Any, coll: Any, grounding: bool = False) -> np.ndarray:
    """The best hit's score of each query through ``service.search.answer`` (0 when nothing is found);
    ``grounding``: searched as ``POST /generate`` searches a question."""
    from service.schemas import GenerateParams, SearchQuery
    from service.search import answer

    out = []
    for q in queries:
        query = GenerateParams(query=q).retrieval() if grounding else SearchQuery(query=q, k=5)
        hits = answer(query, embedder, coll).hits
        out.append(float(hits[0].score) if hits else 0.0)
    return np.asarray(out)


def flagged(scores: np.ndarray, threshold: float | None) -> float | None:
    """Share of ``scores`` under ``threshold`` (what search flags "no good match")."""
    if len(scores) == 0:
        return None
    if threshold is None:
        return 0.0
    return round(float(np.mean(scores < threshold)), 4)


def choose(real: np.ndarray, keep: float) -> float:
    """The highest threshold that leaves at least ``keep`` of the real queries unflagged."""
    s = np.sort(real)
    # flagging the i lowest real queries is allowed while i / n <= 1 - keep
    allowed = int(np.floor((1.0 - keep) * len(s) + 1e-9))
    return float(s[allowed]) if allowed < len(s) else float(s[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--collection", default=str(DEMO_COLLECTION))
    p.add_argument("--corpus", default=str(DEMO_CORPUS))
    p.add_argument("--unrelated", default=str(UNRELATED))
    p.add_argument("--questions", default=str(FIXED_QUESTIONS), help="held out: reported, never chosen on")
    p.add_argument("--limit", type=int, default=300, help="validation queries (0: all)")
    p.add_argument("--write", action="store_true", help="store the chosen threshold in calibration.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from mm.calibration import FILE_NAME, KEEP_MATCHES
    from service.embedding import load_embedder
    from service.generation.registry import checkpoint_dir
    from service.store import open_collection

    embedder = load_embedder(args.model)
    cal = getattr(embedder, "calibration", None)
    if cal is None or not cal.fitted:
        print(f"model {args.model!r} has no fitted calibration: nothing to threshold", file=sys.stderr)
        return 2
    labels = item_labels(Path(args.corpus))
    choose_un, check_un = unrelated_queries(Path(args.unrelated))
    fixed = read_questions(Path(args.questions))
    with open_collection(args.collection, readonly=True) as coll:
        items = coll.items(limit=coll.count() + 1)
        present = {lab for it in items if (lab := label_of(labels, it.uri)) is not None}
        real = val_queries(Path(args.corpus) / "manifest.jsonl", present, args.limit)
        s_real = top_scores(real, embedder, coll)
        s_choose, s_check = top_scores(choose_un, embedder, coll), top_scores(check_un, embedder, coll)
        answerable = [q["question"] for q in fixed if q["answers"]]
        unanswerable = [q["question"] for q in fixed if not q["answers"]]
        s_ans = top_scores(answerable, embedder, coll, grounding=True)
        s_unans = top_scores(unanswerable, embedder, coll, grounding=True)

    def rates(threshold: float | None) -> dict[str, Any]:
        return {
            "threshold": None if threshold is None else round(threshold, 4),
            "val_real_flagged": flagged(s_real, threshold),
            "unrelated_choose_flagged": flagged(s_choose, threshold),
            "unrelated_check_flagged": flagged(s_check, threshold),
            "fixed_answerable_flagged": flagged(s_ans, threshold),
            "fixed_unanswerable_flagged": flagged(s_unans, threshold),
        }

    chosen = choose(s_real, KEEP_MATCHES)
    grid = sorted({round(float(t), 2) for t in np.linspace(0.05, 0.6, 12)})
    out = {
        "model": getattr(embedder, "model_id", args.model),
        "collection": args.collection,
        "queries": {
            "val_real": len(real),
            "unrelated_choose": len(choose_un),
            "unrelated_check": len(check_un),
            "fixed_answerable": len(answerable),
            "fixed_unanswerable": len(unanswerable),
        },
        "top_score_median": {
            "val_real": round(float(np.median(s_real)), 4),
            "unrelated": round(float(np.median(np.concatenate([s_choose, s_check]))), 4),
            "fixed_answerable": round(float(np.median(s_ans)), 4),
            "fixed_unanswerable": round(float(np.median(s_unans)), 4),
        },
        "current": rates(cal.threshold),
        "chosen": rates(chosen),
        "grid": [rates(t) for t in grid],
        "keep_matches": KEEP_MATCHES,
        "written": None,
    }
    for row in (out["current"], out["chosen"], *out["grid"]):
        print(row, file=sys.stderr)
    if args.write:
        ckpt = checkpoint_dir(args.model)
        if ckpt is None:
            print(f"model {args.model!r} has no checkpoint directory to write to", file=sys.stderr)
            return 2
        dataclasses.replace(cal, threshold=chosen).save(ckpt / FILE_NAME)
        out["written"] = str(ckpt / FILE_NAME)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
