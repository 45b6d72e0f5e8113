"""Grounded answers: quality on fixed questions over the demo collection, and first-token latency.

Quality (per backend): each question of ``../shared/eval/questions.jsonl`` (the fixed set; its README
says how to score) and of ``benchmarks/questions_dev.jsonl`` (our own, the one the extractive rules are
tuned on) is answered exactly as ``POST /generate`` answers it: ``GenerateParams.retrieval()`` (the
question's content words, hybrid search) through ``service.search.answer`` on the demo collection (``mm
demo --no-serve``), then ``service.generation.start_stream`` with the backends as the service builds them
(the extractive rules read from beside the model's checkpoint). An item's label is its corpus row's
``label`` (``demo/corpus``); an answer *names* a label when the label appears in it as a phrase, and a
cited item *carries* a label when its own label ends with it (a "snare drum" is a drum, a "train sign"
is not a train). Scores:

- ``accuracy``: answerable questions answered (a label named, and a cited item carrying it) plus
  unanswerable ones declined with nothing cited, over all questions;
- ``false_answer_rate``: unanswerable questions that got an answer or a citation;
- ``citation_precision``: cited items carrying an answer label over all cited items (answerable only);
- ``in_collection``: answerable questions whose answer the collection holds at all (the ceiling).

Question rewriting (``extractive+rewrite``, ``--no-rewrite`` skips it): the opt-in stage ``MM_REWRITE=gguf``
(``service.generation.rewrite``: the packaged Gemma 3 270M names the thing asked for, that name is
searched and the extractive backend answers it from the hits that are that thing) scored the same way;
cited items are labelled from the hits the backend was given. ``rewrite_latency``: the rewrite's p50/p95
(ms, the model alone, one llama.cpp thread, after one warm-up), and ``with_search``: the model and the
searches its grounding makes (up to ``Choice.tries`` names and the question's own), before any answer.

Latency: the service runs under uvicorn on 127.0.0.1 (in a thread) over a copy of the demo collection;
for each backend (``extractive``, ``local``) x transport (``ws``, ``sse``) the fixed questions are asked
in turn: ``first_token_p50_ms``/``first_token_p95_ms`` (request sent to first token received, retrieval
included) and ``tokens_per_s``. Target for the default backend: accuracy >= 0.7, citation precision
>= 0.9, false answers <= 0.1, first token p95 < 200 ms.

The server runs with ``--threads`` torch intra-op threads (default 1): the query encoder and the small
decoder work on a few hundred positions at a time, too little to gain from a second thread, and on a
busy machine a team of threads waits on its slowest member. The output records the threads and the
machine's 1-minute load average at the end of the run.

    python benchmarks/bench_generate.py [--collection demo/collection] [--requests 20] [--sweep | --tune]

``--sweep`` also scores a grid of the extractive rules on the dev questions (never the fixed ones);
``--tune`` does that and writes the best (dev accuracy first, then fewer false answers, then citation
precision, then the stricter rule) beside the model's checkpoint as ``answer_rules.json``, with the
fingerprint of the calibration they were tuned with, before the quality runs read it. When the rewrite
stage runs, ``--tune`` also chooses its own floor (``rewritten_min``: the item and support floor for hits
that are the thing the rewrite named) on the dev questions the same way, and adds it to the file.
After retraining or recalibrating the default model::

    python benchmarks/bench_generate.py --tune --no-latency

The last line is one JSON object; its ``default_backend`` holds the default backend's four numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths import DEMO_CORPUS, ROOT  # noqa: E402

FIXED_QUESTIONS = ROOT.parent / "shared" / "eval" / "questions.jsonl"
DEV_QUESTIONS = ROOT / "benchmarks" / "questions_dev.jsonl"
DEMO_COLLECTION = ROOT / "demo" / "collection"
TARGETS = {"accuracy": 0.7, "citation_precision": 0.9, "false_answer_rate": 0.1, "first_token_p95_ms": 200.0}
# An answer that says it found nothing (any backend's wording).
DECLINES = re.compile(
    r"could not find|couldn't find|cannot find|can't find|nothing (relevant|about)|no (relevant|matching)|"
    r"do not know|don't know|not in the collection|cannot answer|can't answer",
    re.IGNORECASE,
)
CITE = re.compile(r"\[(\d+)\]")


# ----------------------------------------------------------------------------------------------------
# scoring (the README of the fixed questions)


def read_questions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _phrase(label: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(label.lower()) + r"(?:s|es)?(?!\w)")


def names(text: str, label: str) -> bool:
    """Whether ``text`` names ``label`` (as a phrase, any case, a plural allowed)."""
    return bool(_phrase(label).search(text.lower()))


def carries(item_label: str | None, label: str) -> bool:
    """Whether an item labelled ``item_label`` carries ``label``: the label itself, or a kind of it (its
    head noun, the label's end: a "snare drum" is a drum, a "train sign" is not a train)."""
    if item_label is None:
        return False
    return bool(re.search(r"(?<!\w)" + re.escape(label.lower()) + r"(?:s|es)?$", item_label.lower().strip()))


def cited_numbers(text: str, n_citations: int) -> list[int]:
    """The [n] an answer cites that point at one of its ``n_citations`` items (1-based, in order, once)."""
    seen: dict[int, None] = {}
    for m in CITE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= n_citations:
            seen.setdefault(n, None)
    return list(seen)


def score_answer(text: str, cited_labels: Sequence[str | None], answers: Sequence[str]) -> dict[str, Any]:
    """One answer scored: ``cited_labels`` are the labels of the items it cites ([n] in its text).

    Returns ``correct``, ``declined``, ``cited`` and ``cited_good`` (cited items carrying an answer label).
    """
    declined = bool(DECLINES.search(text))
    good = [lab for lab in cited_labels if any(carries(lab, a) for a in answers)]
    if answers:
        correct = any(names(text, a) and any(carries(lab, a) for lab in cited_labels) for a in answers)
    else:
        correct = declined and not cited_labels
    return {"correct": correct, "declined": declined, "cited": len(cited_labels), "cited_good": len(good)}


def summarise_quality(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """accuracy, false_answer_rate, citation_precision over scored answers (``answerable`` marks each)."""
    ans = [r for r in rows if r["answerable"]]
    un = [r for r in rows if not r["answerable"]]
    cited = sum(r["cited"] for r in ans)
    return {
        "questions": len(rows),
        "accuracy": round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else None,
        "answerable_accuracy": round(sum(r["correct"] for r in ans) / len(ans), 4) if ans else None,
        "false_answer_rate": round(sum(not r["correct"] for r in un) / len(un), 4) if un else None,
        "citation_precision": round(sum(r["cited_good"] for r in ans) / cited, 4) if cited else None,
        "answered": sum(not r["declined"] for r in ans),
        "in_collection": sum(r["in_collection"] for r in ans),
    }


# ----------------------------------------------------------------------------------------------------
# the demo collection's labels and answers


def item_labels(corpus: Path) -> dict[tuple[str, str], str]:
    """(folder, file name) of a library file -> its corpus label, as ``service.demo.build_library`` places
    them (``library/<source>/<name>``, caption notes ``library/captions/<image stem>.txt``)."""
    out: dict[tuple[str, str], str] = {}
    for line in (corpus / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        for m in ("image", "audio"):
            if r.get(m):
                out.setdefault((r["source"], Path(r[m]).name), r["label"])
        if r.get("source") == "tuxpaint" and r.get("image"):
            out.setdefault(("captions", Path(r["image"]).stem + ".txt"), r["label"])
    return out


def label_of(labels: dict[tuple[str, str], str], uri: str) -> str | None:
    p = Path(uri)
    return labels.get((p.parent.name, p.name))


def retrieve(
    questions: Sequence[dict],
    embedder: Any,
    coll: Any,
    *,
    k: int | None = None,
    mode: str | None = None,
    whole: bool = False,
) -> list[list[Any]]:
    """Each question's grounding hits, as ``POST /generate`` retrieves them (``GenerateParams.retrieval``:
    the question's content words); ``k``/``mode`` override its defaults; ``whole`` searches the question
    as typed instead (how retrieval worked before; for comparison)."""
    from service.schemas import GenerateParams
    from service.search import answer

    out = []
    for q in questions:
        query = GenerateParams(query=q["question"], **({"k": k} if k else {})).retrieval()
        update: dict[str, Any] = {} if mode is None else {"mode": mode}
        if whole:
            update["query"] = q["question"]
        if update:
            query = query.model_copy(update=update)
        out.append(answer(query, embedder, coll).hits)
    return out


def recall(
    questions: Sequence[dict], hits: Sequence[list[Any]], labels: dict[tuple[str, str], str]
) -> float | None:
    """Share of answerable questions with an item carrying an answer label among their hits."""
    found = [
        any(carries(label_of(labels, h.item.uri), a) for h in hs for a in q["answers"])
        for q, hs in zip(questions, hits, strict=True)
        if q["answers"]
    ]
    return round(sum(found) / len(found), 4) if found else None


def ask(gen: Any, question: str, hits: Any, max_tokens: int) -> tuple[str, list[Any]]:
    """The backend's answer to ``question`` over ``hits`` (a list, or a ``Grounding`` whose question it
    answers), as the service starts it."""
    from service.generation import start_stream

    pieces, cites = start_stream(gen, question, hits, max_tokens=max_tokens)
    return "".join(pieces), cites


def score_backend(
    gen: Any,
    questions: Sequence[dict],
    hits: Sequence[Any],
    labels: dict[tuple[str, str], str],
    present: set[str],
    max_tokens: int,
    log_to: list[dict] | None = None,
) -> dict[str, Any]:
    """``hits``: each question's hits, or its ``service.generation.rewrite.Grounding`` (the backend then
    answers the grounding's question from its hits); cited items are labelled from the hits it was given."""
    from service.generation.rewrite import Grounding

    rows = []
    for q, found in zip(questions, hits, strict=True):
        given = found.hits if isinstance(found, Grounding) else found
        text, cites = ask(gen, q["question"], found, max_tokens)
        by_id = {h.id: h for h in given}
        cited = [cites[n - 1] for n in cited_numbers(text, len(cites))]
        cited_labels = [label_of(labels, by_id[c.id].item.uri) if c.id in by_id else None for c in cited]
        row = score_answer(text, cited_labels, q["answers"])
        row["answerable"] = bool(q["answers"])
        row["in_collection"] = any(carries(p, a) for a in q["answers"] for p in present)
        rows.append(row)
        if log_to is not None:
            rewritten = found.rewritten if isinstance(found, Grounding) else None
            log_to.append(
                {
                    "question": q["question"],
                    "rewritten": rewritten,
                    "answer": text,
                    "cited": cited_labels,
                    **row,
                }
            )
    return summarise_quality(rows)


GRID = {  # the extractive rules --sweep and --tune score (all on the calibrated probability scale)
    "item_min": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
    "answer_min": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "margin": (1.0, 1.25, 1.5, 2.0, 3.0),
    "named": (0.0, 0.3, 0.5, 0.8),
}


def sweep(
    questions: Sequence[dict], hits: Sequence[list[Any]], labels: dict, present: set[str]
) -> list[dict[str, Any]]:
    """The extractive rules on :data:`GRID`, best first: accuracy, then fewer false answers, then citation
    precision, then the stricter rule (higher thresholds: fewer answers on a model they were not seen on)."""
    from service.generation import ExtractiveGenerator
    from service.generation.backends.extractive import Rules

    out = []
    for values in itertools.product(*GRID.values()):
        rule = dict(zip(GRID, values, strict=True))
        q = score_backend(ExtractiveGenerator(rules=Rules(**rule)), questions, hits, labels, present, 64)
        out.append({**rule, **q})
    out.sort(
        key=lambda r: (
            r["accuracy"],
            -(r["false_answer_rate"] or 0.0),
            r["citation_precision"] or 0.0,
            r["answer_min"],
            r["item_min"],
            r["margin"],
            -r["named"],
        ),
        reverse=True,
    )
    return out


def tune(
    questions: Sequence[dict],
    hits: Sequence[list[Any]],
    labels: dict,
    present: set[str],
    calibration: Any,
    out: Path,
    source: str,
) -> tuple[Any, list[dict[str, Any]]]:
    """The best rules of :func:`sweep` on ``questions`` (the dev set), written to ``out``; (rules, top 5)."""
    from service.generation.backends.extractive import Rules, fingerprint

    ranked = sweep(questions, hits, labels, present)
    best = ranked[0]
    rules = Rules(
        **{k: best[k] for k in GRID},
        calibration=fingerprint(calibration),
        tuned_on=f"{source}: accuracy {best['accuracy']}, false answers {best['false_answer_rate']}, "
        f"citation precision {best['citation_precision']}",
    )
    rules.save(out)
    return rules, ranked[:5]


REWRITTEN_GRID = (None, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)  # Rules.rewritten_min (None: item_min)


# ----------------------------------------------------------------------------------------------------
# latency over the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_path(arg: str | None, embed_dim: int, tmp: Path) -> Path:
    """The shipped/given LM checkpoint, else ``lm_fast`` with random weights (same cost per token)."""
    import dataclasses

    from mm.lm import CHECKPOINT_DIR, WEIGHTS_FILE, GroundedLM, resolve_lm, save_lm

    path = Path(arg) if arg else CHECKPOINT_DIR
    if (path / WEIGHTS_FILE).exists():
        return path
    logging.warning("no LM checkpoint at %s: timing lm_fast with random weights", path)
    cfg, _ = resolve_lm("lm_fast")
    return save_lm(GroundedLM(dataclasses.replace(cfg, embed_dim=embed_dim)), tmp / "lm")


async def run_ws(
    url: str, backend: str, questions: Sequence[str], n: int, max_tokens: int
) -> list[tuple[float, int, float]]:
    import websockets

    out = []
    async with websockets.connect(url) as ws:
        for i in range(n):
            req = {"type": "generate", "id": i, "query": questions[i % len(questions)]}
            t0 = time.perf_counter()
            await ws.send(json.dumps({**req, "backend": backend, "max_tokens": max_tokens}))
            first, count = None, 0
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "token":
                    count += 1
                    if first is None:
                        first = time.perf_counter()
                elif msg["type"] in ("done", "error"):
                    if msg["type"] == "error":
                        raise RuntimeError(msg)
                    break
            end = time.perf_counter()
            out.append(((first or end) - t0, count, end - (first or end)))
    return out


def run_sse(
    base: str, backend: str, questions: Sequence[str], n: int, max_tokens: int
) -> list[tuple[float, int, float]]:
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(n):
            body = {"query": questions[i % len(questions)], "backend": backend}
            body.update(stream=True, max_tokens=max_tokens)
            t0 = time.perf_counter()
            first, count = None, 0
            with client.stream("POST", "/generate", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line == "event: token":
                        count += 1
                        if first is None:
                            first = time.perf_counter()
            end = time.perf_counter()
            out.append(((first or end) - t0, count, end - (first or end)))
    return out


def summarise(rows: list[tuple[float, int, float]]) -> dict[str, float | None]:
    firsts = np.array([r[0] for r in rows]) * 1000.0
    rest_tokens = sum(max(r[1] - 1, 0) for r in rows)
    rest_time = sum(r[2] for r in rows)
    return {
        "first_token_p50_ms": round(float(np.percentile(firsts, 50)), 2),
        "first_token_p95_ms": round(float(np.percentile(firsts, 95)), 2),
        "tokens_per_s": round(rest_tokens / rest_time, 1) if rest_time > 0 else None,
        "tokens_per_answer": round(sum(r[1] for r in rows) / len(rows), 1),
    }


def latency(
    collection: Path, embedder: Any, backends: Iterable[str], questions: Sequence[str], args: Any, tmp: Path
) -> dict[str, dict[str, float | None]]:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    shutil.copytree(collection, tmp / "coll")  # the server may write (repairs, clean-up): never the demo's
    settings = Settings(collection=tmp / "coll", lm_path=lm_path(args.lm, embedder.dim, tmp))
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, embedder=embedder), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    results: dict[str, dict[str, float | None]] = {}
    base = f"http://127.0.0.1:{port}"
    try:
        for backend in backends:
            run_sse(base, backend, questions, 2, args.max_tokens)  # warm-up: loads the LM, fills caches
            rows = asyncio.run(
                run_ws(f"ws://127.0.0.1:{port}/ws", backend, questions, args.requests, args.max_tokens)
            )
            results[f"{backend}_ws"] = summarise(rows)
            results[f"{backend}_sse"] = summarise(
                run_sse(base, backend, questions, args.requests, args.max_tokens)
            )
            for key in (f"{backend}_ws", f"{backend}_sse"):
                print(key, results[key], file=sys.stderr)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return results


def rewrite_all(questions: Sequence[dict], rewriter: Any) -> tuple[list[list[Any]], list[float]]:
    """Each question's candidate names (``QuestionRewriter.candidates``: the model and the dictionary)
    and the time each took (ms)."""
    found: list[list[Any]] = []
    times: list[float] = []
    for q in questions:
        t0 = time.perf_counter()
        found.append(rewriter.candidates(q["question"]))
        times.append((time.perf_counter() - t0) * 1000.0)
    return found, times


def ground_all(
    questions: Sequence[dict],
    candidates: Sequence[list[Any]],
    choice: Any,
    search: Any,
    k: int | None,
    times: list[float] | None = None,
) -> list[Any]:
    """Each question grounded as ``POST /generate`` does with ``rewrite`` on
    (``service.generation.rewrite.ground``) from its recorded candidates, by ``choice``; ``times``
    collects each grounding's ms (its searches)."""
    from service.generation.rewrite import ground
    from service.schemas import GenerateParams

    class Replay:
        def __init__(self, found: list[Any]):
            self.found = found

        def candidates(self, question: str) -> list[Any]:
            return self.found

    out = []
    for q, found in zip(questions, candidates, strict=True):
        query = GenerateParams(query=q["question"], **({"k": k} if k else {})).retrieval()
        t0 = time.perf_counter()
        out.append(ground(Replay(found), q["question"], query, search, choice))
        if times is not None:
            times.append((time.perf_counter() - t0) * 1000.0)
    return out


def cached_search(embedder: Any, coll: Any) -> Any:
    """``service.search.answer``'s hits, each query searched once (the sweeps ground the same names)."""
    from service.search import answer

    memo: dict[str, list[Any]] = {}

    def search(query: Any) -> list[Any]:
        key = query.model_dump_json()
        if key not in memo:
            memo[key] = answer(query, embedder, coll).hits
        return memo[key]

    return search


CHOICE_GRID = {  # service.generation.rewrite.Choice
    "forward_weight": (0.0, 0.1, 0.2, 0.3),
    "reverse_weight": (0.0, 0.1, 0.2, 0.3, 0.5),
    "min_score": (-1.0, -1.5, -2.0, -2.5, -3.0, -math.inf),
    "tries": (1, 3),
}


def sweep_choice(
    gen: Any,
    questions: Sequence[dict],
    candidates: Sequence[list[Any]],
    search: Any,
    k: int | None,
    labels: dict,
    present: set[str],
) -> list[dict[str, Any]]:
    """Each ``Choice`` of :data:`CHOICE_GRID` x ``Rules.rewritten_min`` of :data:`REWRITTEN_GRID` scored on
    ``questions`` (the dev set), best first: accuracy, then fewer false answers, then citation precision,
    then the stricter setting (a higher score floor, fewer tries, less weight on the dictionary, a higher
    item floor)."""
    import dataclasses

    from service.generation.backends.extractive import ExtractiveGenerator
    from service.generation.rewrite import Choice

    rows = []
    for values in itertools.product(*CHOICE_GRID.values()):
        choice = Choice(**dict(zip(CHOICE_GRID, values, strict=True)))
        grounded = ground_all(questions, candidates, choice, search, k)
        for floor in REWRITTEN_GRID:
            trial = ExtractiveGenerator(gen.relevance, dataclasses.replace(gen.rules, rewritten_min=floor))
            row = score_backend(trial, questions, grounded, labels, present, 48)
            rows.append({**dataclasses.asdict(choice), "rewritten_min": floor, **row})
    strict = {f: i for i, f in enumerate(REWRITTEN_GRID)}
    rows.sort(
        key=lambda r: (
            -r["accuracy"],
            r["false_answer_rate"] or 0.0,
            -(r["citation_precision"] or 0.0),
            -r["min_score"],
            r["tries"],
            r["forward_weight"] + r["reverse_weight"],
            strict[r["rewritten_min"]],
        )
    )
    return rows


def percentiles(ms: Sequence[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p95_ms": None}
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


def available(name: str, gens: Any) -> str | None:
    """Why backend ``name`` cannot be measured here (None when it can)."""
    from service.generation import GeneratorUnavailable

    try:
        gen = gens.get(name)
        if name == "gguf":
            gen._load()
        if name == "openai" and not gen.base_url:
            return "MM_OPENAI_BASE_URL is not set"
    except GeneratorUnavailable as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="embedder (default: the shipped default, else small)")
    p.add_argument("--collection", default=str(DEMO_COLLECTION), help="collection (default: the demo's)")
    p.add_argument("--corpus", default=str(DEMO_CORPUS), help="corpus whose manifest labels the items")
    p.add_argument("--questions", default=str(FIXED_QUESTIONS), help="the fixed questions")
    p.add_argument("--dev-questions", default=str(DEV_QUESTIONS))
    p.add_argument("--lm", default=None, help="LM checkpoint dir (default: mm/checkpoints/lm)")
    p.add_argument("--requests", type=int, default=20, help="requests per backend x transport")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--k", type=int, default=None, help="items retrieved per question (default: the API's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--sweep", action="store_true", help="score a grid of extractive rules on the dev set")
    p.add_argument(
        "--tune",
        action="store_true",
        help="sweep, and write the best extractive rules beside the model's checkpoint (answer_rules.json)",
    )
    p.add_argument("--rules-out", default=None, help="with --tune: write the rules here instead")
    p.add_argument("--no-latency", action="store_true", help="quality only")
    p.add_argument(
        "--no-rewrite",
        action="store_true",
        help="skip the extractive + question rewriting row (MM_REWRITE=gguf; needs the llm extra)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from service.embedding import load_embedder
    from service.generation import Generators, GeneratorUnavailable
    from service.generation.backends.extractive import RULES_FILE, fingerprint
    from service.generation.registry import checkpoint_dir
    from service.settings import Settings
    from service.store import open_collection

    torch.set_num_threads(args.threads)
    coll_dir = Path(args.collection)
    if not (coll_dir / "meta.sqlite").exists():
        print(f"no collection at {coll_dir}: build the demo first (mm demo --no-serve)", file=sys.stderr)
        return 2
    embedder = load_embedder(args.model)
    calibration = getattr(embedder, "calibration", None)
    ckpt = checkpoint_dir(args.model)
    rules_out = Path(args.rules_out) if args.rules_out else (ckpt / RULES_FILE if ckpt else None)
    if args.tune and rules_out is None:
        print(f"--tune: model {args.model!r} has no checkpoint directory; give --rules-out", file=sys.stderr)
        return 2
    labels = item_labels(Path(args.corpus))
    sets = {"fixed": read_questions(Path(args.questions)), "dev": read_questions(Path(args.dev_questions))}
    quality: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    answers_log: dict[str, list[dict]] = {}
    sweep_top: list[dict[str, Any]] = []
    with open_collection(coll_dir, readonly=True) as coll:
        all_items = coll.items(limit=coll.count() + 1)
        present = {lab for it in all_items if (lab := label_of(labels, it.uri)) is not None}
        hits = {name: retrieve(qs, embedder, coll, k=args.k) for name, qs in sets.items()}
        # the ceiling retrieval sets: answerable questions whose answer is among the hits at all
        diagnosis: dict[str, Any] = {}
        for name, qs in sets.items():
            for mode, k, whole in itertools.product(("hybrid", "vector", "keyword"), (5, 12), (False, True)):
                found = retrieve(qs, embedder, coll, k=k, mode=mode, whole=whole)
                key = f"{name}/{mode}/k{k}{'/whole_question' if whole else ''}"
                diagnosis[key] = recall(qs, found, labels)
        whole_q = {name: retrieve(qs, embedder, coll, k=args.k, whole=True) for name, qs in sets.items()}
        tuned: dict[str, Any] = {}
        if args.tune:
            assert rules_out is not None
            source = Path(args.dev_questions).name
            rules, sweep_top = tune(sets["dev"], hits["dev"], labels, present, calibration, rules_out, source)
            tuned = {"written": str(rules_out), **rules.to_dict()}
            print("tuned", tuned, file=sys.stderr)
        model_settings = {"model": str(ckpt)} if ckpt else {}
        settings = Settings(collection=coll_dir, lm_path=args.lm, **model_settings)
        gens = Generators(settings, coll.vector, calibration)
        settings_default = Settings(collection=coll_dir).generator
        for backend in ("extractive", "local", "gguf", "openai"):
            why = available(backend, gens)
            if why is not None:
                skipped[backend] = why
                continue
            gen = gens.get(backend)
            for name, qs in sets.items():
                log_rows: list[dict] = []
                quality.setdefault(backend, {})[name] = score_backend(
                    gen, qs, hits[name], labels, present, args.max_tokens, log_rows
                )
                answers_log[f"{backend}/{name}"] = log_rows
            if backend == "extractive":  # what searching the whole question (as before) would give
                for name, qs in sets.items():
                    quality[backend][f"{name}_whole_question"] = score_backend(
                        gen, qs, whole_q[name], labels, present, args.max_tokens
                    )
            print(backend, quality[backend], file=sys.stderr)
        rewrite_latency: dict[str, Any] = {}
        if not args.no_rewrite:  # the opt-in stage (MM_REWRITE=gguf) in front of the extractive backend
            try:
                gens.rewriter().load()
            except GeneratorUnavailable as exc:
                skipped["extractive+rewrite"] = str(exc)
            else:
                from service.generation.rewrite import CHOICE, GREEDY, Choice
                from service.search import answer

                gens.rewriter().candidates("Which bird can talk?")  # warm-up: the prompt's prefix is cached
                runs = {name: rewrite_all(qs, gens.rewriter()) for name, qs in sets.items()}
                search = cached_search(embedder, coll)

                def plain_search(query: Any) -> list[Any]:
                    return answer(query, embedder, coll).hits

                extractive = gens.get("extractive")
                if args.tune:  # the rewrite stage's choice and floor, chosen on dev; the floor is written
                    import dataclasses

                    ranked = sweep_choice(
                        extractive, sets["dev"], runs["dev"][0], search, args.k, labels, present
                    )
                    best = ranked[0]
                    extractive.rules = dataclasses.replace(
                        extractive.rules, rewritten_min=best["rewritten_min"]
                    )
                    extractive.rules.save(rules_out)
                    keys = tuple(CHOICE_GRID)
                    tuned["rewritten_min"] = best["rewritten_min"]
                    tuned["choice"] = {k: best[k] for k in keys}
                    tuned["choice_is_shipped"] = all(best[k] == getattr(CHOICE, k) for k in keys)
                    tuned["choice_sweep_top"] = [
                        {
                            k: r[k]
                            for k in (
                                *keys,
                                "rewritten_min",
                                "accuracy",
                                "false_answer_rate",
                                "citation_precision",
                            )
                        }
                        for r in ranked[:10]
                    ]
                    print(
                        "tuned choice",
                        tuned["choice"],
                        "rewritten_min",
                        best["rewritten_min"],
                        file=sys.stderr,
                    )
                chosen = Choice(**tuned["choice"]) if args.tune else CHOICE  # --tune: what dev chose
                for label, choice in (("extractive+rewrite", chosen), ("extractive+rewrite_greedy", GREEDY)):
                    for name, qs in sets.items():
                        found, ms = runs[name]
                        grounded = ground_all(qs, found, choice, search, args.k)
                        log_rows = []
                        row = score_backend(
                            extractive, qs, grounded, labels, present, args.max_tokens, log_rows
                        )
                        # the model's greedy name / the chosen one names an answer label (answerable)
                        greedy = [next((c.name for c in f if c.greedy), None) for f in found]
                        row["greedy_names_an_answer"] = sum(
                            g is not None and any(names(g, a) for a in q["answers"])
                            for q, g in zip(qs, greedy, strict=True)
                        )
                        row["chosen_names_an_answer"] = sum(
                            g.rewritten is not None and any(names(g.rewritten, a) for a in q["answers"])
                            for q, g in zip(qs, grounded, strict=True)
                        )
                        row["grounded_in_a_name"] = sum(g.rewritten is not None for g in grounded)
                        quality.setdefault(label, {})[name] = row
                        answers_log[f"{label}/{name}"] = log_rows
                        if label == "extractive+rewrite":
                            # the model, then the searches the grounding makes (uncached, as served)
                            searched: list[float] = []
                            ground_all(qs, found, choice, plain_search, args.k, searched)
                            with_search = [a + b for a, b in zip(ms, searched, strict=True)]
                            rewrite_latency[name] = {
                                **percentiles(ms),
                                "with_search": percentiles(with_search),
                            }
                            diagnosis[f"{name}/rewrite"] = recall(qs, [g.hits for g in grounded], labels)
                    print(label, quality[label], rewrite_latency, file=sys.stderr)
        if args.sweep and not args.tune:
            sweep_top = sweep(sets["dev"], hits["dev"], labels, present)[:5]
            for row in sweep_top:
                print("sweep", row, file=sys.stderr)
    for key, rows in answers_log.items():
        for r in rows:
            logging.info("%s %s -> %s", key, r["question"], r["answer"])
    with tempfile.TemporaryDirectory() as tmp_dir:
        measured = [b for b in ("extractive", "local") if b in quality]
        lat = (
            {}
            if args.no_latency
            else latency(
                coll_dir, embedder, measured, [q["question"] for q in sets["fixed"]], args, Path(tmp_dir)
            )
        )
    for backend in quality:
        p95 = [lat[k]["first_token_p95_ms"] for k in (f"{backend}_ws", f"{backend}_sse") if k in lat]
        quality[backend]["first_token_p95_ms"] = max(p95) if p95 else None  # type: ignore[type-var]
    d = quality.get(settings_default, {})
    fixed = d.get("fixed", {})
    default = {
        "name": settings_default,
        "accuracy": fixed.get("accuracy"),
        "false_answer_rate": fixed.get("false_answer_rate"),
        "citation_precision": fixed.get("citation_precision"),
        "first_token_p95_ms": d.get("first_token_p95_ms"),
    }
    meets = all(
        default[k] is not None
        and (default[k] <= t if k in ("false_answer_rate", "first_token_p95_ms") else default[k] >= t)
        for k, t in TARGETS.items()
    )
    rules = gens.get("extractive").rules
    out = {
        "model": getattr(embedder, "model_id", args.model),
        "collection": str(coll_dir),
        "torch_threads": args.threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "quality": quality,
        "skipped": skipped,
        "latency": lat,
        "rewrite_latency": rewrite_latency,
        "retrieval_recall": diagnosis,
        "sweep_top": sweep_top,
        "extractive_rules": {
            **rules.to_dict(),
            "tuned_for_this_calibration": rules.calibration == fingerprint(calibration),
        },
        "tuned": tuned,
        "answers": {
            k: [{kk: r[kk] for kk in ("question", "rewritten", "answer", "correct")} for r in v]
            for k, v in answers_log.items()
            if k.startswith("extractive")
        },
        "targets": TARGETS,
        "meets_target": meets,
        "default_backend": default,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
