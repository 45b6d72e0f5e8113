"""Frozen text towers, zero-shot: cross-lingual caption retrieval, speed and size (MiniLM, USE, e5).

For each text encoder kind (``minilm``: all-MiniLM-L6-v2, the current tower; ``use_multilingual``: USE
multilingual v3; ``e5_small``: multilingual-e5-small), through our own modules and their packaged
weights, with no training:

- ``r1`` / ``r10`` per language: a Tux Paint stamp caption in fr/de/es/it/pt/nl/ca is the query, the
  English captions of all stamps are the gallery, ranked by cosine of the encoder's pooled sentence
  vectors. Relevance is concept-level: a gallery caption is relevant when its stamp names the same
  concept (``Stamp.label``, e.g. two "A frog." stamps are both right). ``mean_r1``/``mean_r10`` average
  the seven languages.
- ``captions_per_s`` / ``captions_per_cpu_s``: ``encoder(encoder.prepare(batch))`` on ``--speed-items``
  captions mixed across the eight languages, batches of 32, ``--threads`` torch threads (2 by default),
  after one warm-up batch; tokenising included, loading not. Median of ``--repeats`` rounds, the
  encoders taking turns in every round (order rotating); the allocator tuned as the ``mm`` CLI does.
- ``size_mb``: the weight and tokenizer files on disk; ``load_s``: building the encoder.
- ``A+B`` rows: two towers side by side (their pooled vectors concatenated with equal weight, i.e. the
  mean of the two cosines), retrieval only: what a combined tower could gain at the sum of the costs.

Run: ``python benchmarks/bench_text_encoders.py [--encoders minilm,use_multilingual,e5_small]
[--limit N] [--threads 2] [--speed-items 256] [--repeats 3]``. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LANGS = ("fr", "de", "es", "it", "pt", "nl", "ca")
TUXPAINT = Path("/usr/share/tuxpaint/stamps")

log = logging.getLogger("bench_text_encoders")


def weight_files(kind: str) -> list[Path]:
    """The files a kind reads from its package (what it costs on disk)."""
    if kind == "minilm":
        from mm.encoders.text import minilm_path

        folder = minilm_path()
        return [folder / n for n in ("model.safetensors", "tokenizer.json", "config.json")]
    if kind == "use_multilingual":
        from mm.encoders.use_multilingual import WEIGHTS
    else:
        from mm.encoders.e5 import WEIGHTS
    return [WEIGHTS.path(name, verify=False) for name in WEIGHTS.sha256]


@torch.inference_mode()
def embed(enc, texts: list[str], batch: int = 64) -> np.ndarray:
    out = [enc(enc.prepare(texts[i : i + batch])).pooled.float() for i in range(0, len(texts), batch)]
    z = torch.cat(out)
    return torch.nn.functional.normalize(z, dim=-1).numpy()


def recall(q: np.ndarray, g: np.ndarray, q_labels: list[str], g_labels: list[str]) -> tuple[float, float]:
    """R@1 and R@10 of queries ``q`` against gallery ``g`` (both L2-normalised), concept-level."""
    order = np.argsort(-(q @ g.T), axis=1)[:, :10]  # (Q, 10)
    gl = np.asarray(g_labels)
    hits = gl[order] == np.asarray(q_labels)[:, None]
    return float(hits[:, 0].mean()), float(hits.any(1).mean())


@torch.inference_mode()
def speed(encoders: dict, texts: list[str], repeats: int, batch: int = 32) -> dict[str, tuple[float, float]]:
    """Median captions/s and captions/CPU-s per encoder; the encoders take turns within every round (the
    order rotating), so a drift in the shared machine's load falls on all of them alike."""
    for enc in encoders.values():
        enc(enc.prepare(texts[:batch]))  # warm-up
    kinds = list(encoders)
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            enc = encoders[kind]
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, len(texts), batch):
                enc(enc.prepare(texts[i : i + batch]))
            wall[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
    n = len(texts)
    return {k: (n / statistics.median(wall[k]), n / statistics.median(cpu[k])) for k in kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="minilm,use_multilingual,e5_small")
    ap.add_argument("--limit", type=int, default=None, help="first N stamps only (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-items", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from mm.runtime import tune_allocator

    tune_allocator()  # as the `mm` CLI and the service run

    from mm.config import TextEncoderConfig
    from mm.encoders import build_text_encoder
    from service.samples import scan_tuxpaint

    if not TUXPAINT.is_dir():
        raise SystemExit(f"{TUXPAINT} is missing: apt-get install tuxpaint-stamps-default")
    stamps, _ = scan_tuxpaint(TUXPAINT)
    stamps = stamps[: args.limit] if args.limit else stamps
    gallery = [s.caption for s in stamps]
    g_labels = [s.label for s in stamps]
    queries = {lang: [s for s in stamps if lang in s.translations] for lang in LANGS}
    rng = np.random.default_rng(0)
    mixed = [
        s.caption if lang == "en" else s.translations.get(lang, s.caption)
        for s in stamps
        for lang in ("en", *LANGS)
    ]
    speed_texts = [mixed[i] for i in rng.permutation(len(mixed))[: args.speed_items]]

    results: dict[str, dict] = {}
    vectors: dict[str, dict[str, np.ndarray]] = {}  # kind -> lang ("en": the gallery) -> (N, D)
    encoders = {}
    for kind in [k.strip() for k in args.encoders.split(",") if k.strip()]:
        t0 = time.perf_counter()
        enc = encoders[kind] = build_text_encoder(TextEncoderConfig(kind=kind, max_len=64, trainable=False))
        load_s = time.perf_counter() - t0
        g = embed(enc, gallery)
        vectors[kind] = {"en": g}
        r1, r10 = {}, {}
        for lang, qs in queries.items():
            q = vectors[kind][lang] = embed(enc, [s.translations[lang] for s in qs])
            r1[lang], r10[lang] = recall(q, g, [s.label for s in qs], g_labels)
        files = weight_files(kind)
        results[kind] = {
            "dim": enc.out_dim,
            "r1": {k: round(v, 3) for k, v in r1.items()},
            "r10": {k: round(v, 3) for k, v in r10.items()},
            "mean_r1": round(float(np.mean(list(r1.values()))), 3),
            "mean_r10": round(float(np.mean(list(r10.values()))), 3),
            "size_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "files": [f.name for f in files],
            "load_s": round(load_s, 2),
        }
        log.info("%s: %s", kind, json.dumps(results[kind]))
    for kind, (per_s, per_cpu_s) in speed(encoders, speed_texts, args.repeats).items():
        results[kind]["captions_per_s"] = round(per_s, 1)
        results[kind]["captions_per_cpu_s"] = round(per_cpu_s, 1)
    log.info("speed: %s", {k: (v["captions_per_s"], v["captions_per_cpu_s"]) for k, v in results.items()})
    if len(vectors) >= 2:
        # Two towers side by side (pooled vectors concatenated, equal weight): the mean of their cosines.
        kinds = list(vectors)
        for a, b in [(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1 :]]:
            r1, r10 = {}, {}
            g = np.concatenate([vectors[a]["en"], vectors[b]["en"]], axis=1) / np.sqrt(2)
            for lang, qs in queries.items():
                q = np.concatenate([vectors[a][lang], vectors[b][lang]], axis=1) / np.sqrt(2)
                r1[lang], r10[lang] = recall(q, g, [s.label for s in qs], g_labels)
            results[f"{a}+{b}"] = {
                "r1": {k: round(v, 3) for k, v in r1.items()},
                "r10": {k: round(v, 3) for k, v in r10.items()},
                "mean_r1": round(float(np.mean(list(r1.values()))), 3),
                "mean_r10": round(float(np.mean(list(r10.values()))), 3),
                "size_mb": round(results[a]["size_mb"] + results[b]["size_mb"], 1),
            }
    best = max(results, key=lambda k: results[k]["mean_r10"]) if results else None
    print(
        json.dumps(
            {
                "benchmark": "text_encoders",
                "stamps": len(stamps),
                "queries_per_lang": {k: len(v) for k, v in queries.items()},
                "threads": args.threads,
                "encoders": results,
                "best_mean_r10": best,
            }
        )
    )


if __name__ == "__main__":
    main()
