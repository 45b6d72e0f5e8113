"""First-token latency and tokens/s of grounded generation over WebSocket and SSE, one connection.

The service runs under uvicorn on 127.0.0.1 (in a thread) over a collection of caption texts; each
request retrieves ``k`` items for a question and streams the answer. For each backend (``extractive``,
``local``) x transport (``ws``, ``sse``): ``first_token_p50_ms``/``first_token_p95_ms`` (request sent to
first token received, retrieval included) and ``tokens_per_s`` (pieces after the first / time after
the first). Target: first token p95 < 200 ms for both backends.

The server runs with ``--threads`` torch intra-op threads (default 1): the query encoder and the small
decoder work on a few hundred positions at a time, too little to gain from a second thread, and on a
busy machine a team of threads waits on its slowest member (on 2 shared cores, 2 threads made the
local first token several times slower). Deploy the service the same way (``OMP_NUM_THREADS=1``).
The output records the threads and the machine's 1-minute load average at the end of the run.

    python benchmarks/bench_generate.py [--model default] [--lm mm/checkpoints/lm] [--requests 20]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths import default_manifest  # noqa: E402

CAPTIONS = [
    "A frog.", "A drum hit.", "A cat.", "A guitar slide.", "A red apple.", "A dog barking.", "A piano chord.",
    "A sailing boat.", "A bell ringing.", "A bird singing.", "A car horn.", "An elephant.", "A violin note.",
    "A bicycle.", "Rain falling.", "A trumpet.", "A cow mooing.", "A tree.", "A house.", "A clock ticking.",
]  # fmt: skip
QUESTIONS = ["what makes a sound like a frog?", "show me an animal", "a musical instrument", "something red"]


def corpus_captions(limit: int) -> list[str]:
    path = default_manifest(build=False)
    if not path.exists():
        return CAPTIONS
    seen: dict[str, None] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("lang", "en") == "en" and row.get("text"):
            seen.setdefault(row["text"], None)
        if len(seen) >= limit:
            break
    return list(seen) or CAPTIONS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_collection(path: Path, embedder, captions: list[str]) -> None:
    from index.types import Item
    from service.store import open_collection

    with open_collection(path, embedder, create=True) as coll:
        vecs = embedder.encode_text(captions)
        items = [
            Item(id=0, modality="text", uri="", sha256=hashlib.sha256(c.encode()).hexdigest(), caption=c)
            for c in captions
        ]
        coll.add(vecs, items)
        coll.save()


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


async def run_ws(url: str, backend: str, n: int, k: int, max_tokens: int) -> list[tuple[float, int, float]]:
    import websockets

    out = []
    async with websockets.connect(url) as ws:
        for i in range(n):
            req = {"type": "generate", "id": i, "query": QUESTIONS[i % len(QUESTIONS)], "k": k}
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


def run_sse(base: str, backend: str, n: int, k: int, max_tokens: int) -> list[tuple[float, int, float]]:
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(n):
            body = {"query": QUESTIONS[i % len(QUESTIONS)], "k": k, "backend": backend}
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


def summarise(rows: list[tuple[float, int, float]]) -> dict[str, float]:
    firsts = np.array([r[0] for r in rows]) * 1000.0
    rest_tokens = sum(max(r[1] - 1, 0) for r in rows)
    rest_time = sum(r[2] for r in rows)
    return {
        "first_token_p50_ms": round(float(np.percentile(firsts, 50)), 2),
        "first_token_p95_ms": round(float(np.percentile(firsts, 95)), 2),
        "tokens_per_s": round(rest_tokens / rest_time, 1) if rest_time > 0 else None,
        "tokens_per_answer": round(sum(r[1] for r in rows) / len(rows), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="embedder (default: the shipped default, else small)")
    p.add_argument("--lm", default=None, help="LM checkpoint dir (default: mm/checkpoints/lm)")
    p.add_argument("--requests", type=int, default=20, help="requests per backend x transport")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--items", type=int, default=300, help="caption texts in the collection")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server process")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    import uvicorn

    from service.app import create_app
    from service.embedding import load_embedder
    from service.settings import Settings

    torch.set_num_threads(args.threads)
    embedder = load_embedder(args.model)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        build_collection(tmp / "coll", embedder, corpus_captions(args.items))
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
        results: dict[str, dict[str, float]] = {}
        try:
            for backend in ("extractive", "local"):
                # warm-up: loads the LM, fills caches
                run_sse(f"http://127.0.0.1:{port}", backend, 2, args.k, args.max_tokens)
                ws_rows = asyncio.run(
                    run_ws(f"ws://127.0.0.1:{port}/ws", backend, args.requests, args.k, args.max_tokens)
                )
                results[f"{backend}_ws"] = summarise(ws_rows)
                sse_rows = run_sse(
                    f"http://127.0.0.1:{port}", backend, args.requests, args.k, args.max_tokens
                )
                results[f"{backend}_sse"] = summarise(sse_rows)
                for key in (f"{backend}_ws", f"{backend}_sse"):
                    print(key, results[key], file=sys.stderr)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    worst = max(r["first_token_p95_ms"] for r in results.values())
    out = {
        "model": getattr(embedder, "model_id", args.model),
        "requests": args.requests,
        "torch_threads": args.threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **results,
        "first_token_p95_ms_max": worst,
        "target_first_token_p95_ms": 200.0,
        "meets_target": worst < 200.0,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
