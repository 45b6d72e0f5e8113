"""The targets of "Default model v2" on a split of a manifest (test by default), one row per target.

Every figure is concept-level (an item is relevant when it carries the query's label) and vector-only
(the embedding the model gives; hybrid search is measured by `mm eval --search` and bench_hybrid.py):

- ``text->image (en)``: English captions against every image of the split (R@1, R@10); ``image->text``
  against every caption; ``text->image (LANG)`` for each caption language, with its gap to English;
- ``spoken word->image``: human recordings of single words (the ``ktuberling`` source, any language);
- text<->audio on ``speech`` (recordings and synthetic speech) and ``non-speech`` sounds (effects,
  instruments, animals: every other clip), each against a gallery of its own kind, with chance;
- image<->audio with chance; the mixed gallery (``mixed_gallery_metrics`` with the model's calibration).

    python benchmarks/bench_targets.py [--manifest demo/corpus/manifest.jsonl] [--model DIR] [--split test]

Prints a Markdown table, then one JSON object as its last line: {"model", "split", "targets": {name:
{"value", "target", "met"}}, "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths import default_manifest  # noqa: E402

LANGS = ("en", "fr", "de", "es", "it", "pt", "nl", "ca")


def is_speech(row: dict[str, Any]) -> bool:
    """A clip of human or synthetic speech: recorded words, spoken descriptions, espeak captions."""
    return row.get("source") in ("ktuberling", "speech") or "#desc" in str(row.get("id", ""))


def recall(
    encode: Callable[[str, list[str]], np.ndarray],
    queries: Sequence[tuple[str, str]],
    qmod: str,
    gallery: Sequence[tuple[str, str]],
    gmod: str,
) -> dict[str, float]:
    """R@1/R@10 and chance R@10 of ``(key, label)`` queries against a ``(key, label)`` gallery."""
    from mm.evaluate import chance_metrics, recall_metrics

    gallery = list(dict.fromkeys(gallery))
    by_label: dict[str, set[int]] = defaultdict(set)
    for j, (_, label) in enumerate(gallery):
        by_label[label].add(j)
    queries = [q for q in dict.fromkeys(queries) if by_label.get(q[1])]
    if not queries or not gallery:
        return {}
    rel = [by_label[label] for _, label in queries]
    q = encode(qmod, [k for k, _ in queries])
    g = encode(gmod, [k for k, _ in gallery])
    out = recall_metrics(q, g, rel)
    chance = chance_metrics(rel, len(gallery))
    return {"R@1": out["R@1"], "R@10": out["R@10"], "n": len(queries), "gallery": len(gallery),
            "chance_R@10": chance["R@10"]}  # fmt: skip


def measure(rows: Sequence[dict[str, Any]], embedder: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from mm.evaluate import evaluate_rows, mixed_gallery_metrics
    from service.search_eval import usable_rows

    rows, encode, _ = usable_rows([r for r in rows if r.get("label") is not None], embedder)
    images = [(str(r["image"]), r["label"]) for r in rows if r.get("image")]
    texts = [(r["text"], r["label"]) for r in rows if r.get("text")]
    speech = [(str(r["audio"]), r["label"]) for r in rows if r.get("audio") and is_speech(r)]
    sounds = [(str(r["audio"]), r["label"]) for r in rows if r.get("audio") and not is_speech(r)]
    spoken_words = [
        (str(r["audio"]), r["label"]) for r in rows if r.get("audio") and r["source"] == "ktuberling"
    ]
    m: dict[str, Any] = {}
    for lang in LANGS:
        m[f"text->image ({lang})"] = recall(encode, [(t, lb) for t, lb, lg in _texts(rows) if lg == lang],
                                            "text", images, "image")  # fmt: skip
    m["image->text"] = recall(encode, images, "image", texts, "text")
    m["spoken word->image"] = recall(encode, spoken_words, "audio", images, "image")
    m["text->audio (speech)"] = recall(encode, texts, "text", speech, "audio")
    m["audio->text (speech)"] = recall(encode, speech, "audio", texts, "text")
    m["text->audio (non-speech)"] = recall(encode, texts, "text", sounds, "audio")
    m["audio->text (non-speech)"] = recall(encode, sounds, "audio", texts, "text")
    directions = evaluate_rows(rows, encode, [("image", "audio"), ("audio", "image")], with_chance=True)
    for d, v in directions.items():
        m[d] = {"R@1": v["R@1"], "R@10": v["R@10"], "n": v["n"], "chance_R@10": v["chance"]["R@10"]}
    cal = embedder.calibration.score if embedder.calibration.fitted else None
    m["mixed"] = mixed_gallery_metrics(rows, encode, cal)
    m["mixed (raw scores)"] = mixed_gallery_metrics(rows, encode, None)

    def r10(name: str) -> float:
        return float(m.get(name, {}).get("R@10", float("nan")))

    en = r10("text->image (en)")
    t: dict[str, Any] = {
        "text->image (en) R@10": (en, ">= 0.75", en >= 0.75),
        "text->image (en) R@1": (
            m["text->image (en)"].get("R@1", 0.0),
            ">= 0.40",
            m["text->image (en)"].get("R@1", 0.0) >= 0.40,
        ),  # fmt: skip
        "image->text R@10": (r10("image->text"), ">= 0.75", r10("image->text") >= 0.75),
    }
    for lang in LANGS[1:]:
        v = r10(f"text->image ({lang})")
        t[f"text->image ({lang}) R@10"] = (v, f"within 5 points of en ({en:.3f})", v >= en - 0.05)
    t["spoken word->image R@10"] = (r10("spoken word->image"), ">= 0.60", r10("spoken word->image") >= 0.60)
    for d in ("text->audio (speech)", "audio->text (speech)"):
        t[f"{d} R@10"] = (r10(d), ">= 0.75", r10(d) >= 0.75)
    ns = m["text->audio (non-speech)"]
    t["text->audio (non-speech) R@10"] = (
        r10("text->audio (non-speech)"), ">= 0.5 and >= 4x chance",
        r10("text->audio (non-speech)") >= max(0.5, 4 * ns.get("chance_R@10", 1.0)),
    )  # fmt: skip
    for d in ("image->audio", "audio->image"):
        if d in m:
            t[f"{d} R@10"] = (r10(d), ">= 4x chance", r10(d) >= 4 * m[d]["chance_R@10"])
    both = float(m["mixed"].get("both_at_10", float("nan")))
    t["mixed both@10"] = (both, ">= 0.80", both >= 0.80)
    t["mixed sound where none @3"] = (float(m["mixed"].get("sound_when_absent_at_3", float("nan"))),
                                      "reported (lower is better)", None)  # fmt: skip
    targets = {k: {"value": round(v, 4), "target": tgt, "met": met} for k, (v, tgt, met) in t.items()}
    return targets, m


def _texts(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["text"], r["label"], r.get("lang") or "en") for r in rows if r.get("text")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(default_manifest()))
    ap.add_argument("--model", default=None, help="checkpoint directory or name (default: the shipped one)")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from mm.model import create_model, default_model_name
    from mm.train import load_rows

    model = args.model or default_model_name()
    rows = load_rows(args.manifest, args.split)
    targets, metrics = measure(rows, create_model(model))
    print("| target | value | goal | met |\n|---|---|---|---|")
    for name, v in targets.items():
        met = "-" if v["met"] is None else ("yes" if v["met"] else "no")
        print(f"| {name} | {v['value']:.3f} | {v['target']} | {met} |")
    print(json.dumps({"model": str(model), "split": args.split, "targets": targets, "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
