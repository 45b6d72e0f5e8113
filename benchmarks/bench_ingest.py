"""Ingest throughput: items/s of the ingest pipeline (what ``mm index`` runs) vs raw ``encode_image``.

A folder of ``--n`` generated JPEG images is indexed into a fresh collection with ``index.ingest.ingest``
(decode in worker threads overlapping the encoder, hash, SQLite + FAISS writes). The raw figure encodes
the same images, already decoded in memory, with the same model and batch size. Raw and ingest alternate
over ``--rounds`` rounds and the reported ratio is the median of the per-round ratios, so a drift in the
machine's speed (these cores are shared) falls on both sides. Target: ingest >= 0.9 x raw (the pipeline
should hide decoding and storage behind the model).

Usage: ``python benchmarks/bench_ingest.py [--n 256] [--model default] [--rounds 3] [--quick]``; the last
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("bench_ingest")


def make_images(folder: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    """``n`` distinct JPEGs: a random colour field with a few random rectangles and ellipses."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((side, side))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, side - 8, 2)
            x1, y1 = x0 + rng.integers(4, side // 2), y0 + rng.integers(4, side // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
        path = folder / f"img_{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def decode_all(paths: list[Path]) -> list:
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def raw_throughput(embedder, images: list, batch_size: int) -> float:
    """images/s of ``encode_image`` over already-decoded images, batch by batch."""
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        embedder.encode_image(images[s : s + batch_size])
    return len(images) / (time.perf_counter() - t0)


def ingest_throughput(embedder, folder: Path, n: int, batch_size: int, workers: int) -> float:
    """images/s of one full ingest of ``folder`` into a fresh collection (saved at the end)."""
    from index.ingest import ingest
    from service.store import open_collection

    with tempfile.TemporaryDirectory(prefix="mm-bench-coll-") as tmp:
        coll = open_collection(Path(tmp) / "c", embedder, create=True)
        t0 = time.perf_counter()
        report = ingest(coll, embedder, [folder], batch_size=batch_size, workers=workers, progress=False)
        coll.save()
        seconds = time.perf_counter() - t0
        coll.close()
    assert report.added == n and not report.errors, report
    return n / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--side", type=int, default=256, help="image side in pixels")
    p.add_argument(
        "--model", default="default", help="model name or checkpoint (default: the shipped default)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating raw / ingest rounds (median ratio)")
    p.add_argument("--quick", action="store_true", help="n=96, one round")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.n, args.rounds = min(args.n, 96), 1

    import torch

    from mm.runtime import tune_allocator
    from service.embedding import load_embedder

    tune_allocator()  # as `mm index` does
    torch.manual_seed(0)
    embedder = load_embedder(args.model)
    with tempfile.TemporaryDirectory(prefix="mm-bench-img-") as tmp:
        folder = Path(tmp) / "images"
        paths = make_images(folder, args.n, args.side)
        images = decode_all(paths)
        embedder.encode_image(images[: args.batch_size])  # warm up
        raws, ings = [], []
        for r in range(args.rounds):
            # each round times raw and ingest back to back, so drift in machine speed cancels in the ratio
            raws.append(raw_throughput(embedder, images, args.batch_size))
            ings.append(ingest_throughput(embedder, folder, args.n, args.batch_size, args.workers))
            log.info(
                "round %d: raw encode_image %.1f images/s, ingest %.1f images/s (%.3f of raw)",
                r + 1,
                raws[-1],
                ings[-1],
                ings[-1] / raws[-1],
            )
    ratios = [i / r for i, r in zip(ings, raws, strict=True)]
    raw, ing, ratio = float(np.median(raws)), float(np.median(ings)), float(np.median(ratios))
    out = {
        "model": args.model,
        "n": args.n,
        "side": args.side,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "raw_items_per_s": round(raw, 2),
        "ingest_items_per_s": round(ing, 2),
        "rounds": args.rounds,
        "round_ratios": [round(x, 3) for x in ratios],
        "ratio": round(ratio, 3),
        "ratio_ok": ratio >= 0.9,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
