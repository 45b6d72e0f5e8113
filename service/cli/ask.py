"""``mm ask "question" --collection DIR [--backend B] [-k 5] [--modality M]``: a grounded, streamed answer.

The answer is printed as it is generated, then the cited items (``--json``: one object
``{"answer", "citations", "backend", "rewritten"}`` as ``POST /generate`` gives it). ``--rewrite``
(or ``MM_REWRITE=gguf``) searches the name of the thing asked for (``service.generation.rewrite``).
Backends and their settings are those of the service (``MM_GENERATOR``, ``MM_OPENAI_*``, ``MM_LM_PATH``,
``MM_GGUF_PATH``, ``MM_REWRITE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli.common import UsageError, add_collection, add_model, clip, load_embedder, split_csv, table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ask", help="answer a question from the closest items, citing them")
    p.add_argument("question", help="the question (also the retrieval query)")
    # names and bounds are checked by the API's own model (service.schemas.GenerateParams), whose error
    # message lists the backends: importing that here would slow every `mm` command's start
    p.add_argument("--backend", "-b", help="generator backend (default: $MM_GENERATOR)")
    p.add_argument("-k", type=int, default=5, help="items retrieved to ground the answer (1..20, default 5)")
    p.add_argument("--modality", default="", help="modalities of the retrieved items, comma-separated")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument(
        "--rewrite",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search the name of the thing asked for, as the packaged small LM rewrites the question "
        "(the llm extra; default: $MM_REWRITE)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    add_collection(p)
    add_model(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.generation import Generators, start_stream
    from service.generation.rewrite import Grounding, ground
    from service.schemas import GenerateParams, error_message
    from service.search import answer
    from service.settings import Settings
    from service.store import open_collection, same_model

    try:  # the same rules as POST /generate; the question is also the retrieval query
        params = GenerateParams(
            query=args.question,
            k=args.k,
            modalities=split_csv(args.modality) or None,
            backend=args.backend,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            stop=args.stop or None,
            rewrite=args.rewrite,
        )
    except ValidationError as exc:
        raise UsageError(error_message(exc)) from exc

    # the collection first: a wrong path is said at once, not after the model's seconds of loading
    with open_collection(args.collection, readonly=True) as coll:
        embedder = load_embedder(args.model)
        same_model(coll, embedder, Path(args.collection))
        settings = Settings(model=args.model) if args.model else Settings()
        gens = Generators(settings, coll.vector, getattr(embedder, "calibration", None))
        gen = gens.get(params.backend)
        search = lambda q: answer(q, embedder, coll).hits  # noqa: E731
        if gens.rewrites(params.rewrite):  # the name of the thing asked for is searched and answered
            grounding = ground(gens.rewriter(), params.query, params.retrieval(), search)
        else:
            grounding = Grounding(params.query, search(params.retrieval()))
        try:
            pieces, cites = start_stream(gen, params.query, grounding, **params.sampling())
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        parts: list[str] = []
        for piece in pieces:
            parts.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    if args.json:
        body: dict[str, Any] = {
            "answer": "".join(parts),
            "citations": [c.model_dump() for c in cites],
            "backend": gen.name,
            "rewritten": grounding.rewritten,
        }
        print(json.dumps(body))
        return 0
    print()
    if cites:
        rows = [
            [f"[{i}]", f"{c.score:.3f}", c.modality, str(c.id), clip(c.caption or "", 60)]
            for i, c in enumerate(cites, 1)
        ]
        print()
        print(table(rows, ["#", "score", "modality", "id", "caption"]))
    return 0
