"""INT8 dynamic and INT4 weight-only quantization against fp32: size, speed, fidelity, retrieval.

For each of fp32 / int8 / int4, in one run: ``size_mb`` (the checkpoint directory on disk),
``throughput`` (items/s per modality: texts, images, audio clips; media decoded beforehand so only the
model is timed; best of ``--repeats``), ``cosine_to_fp32`` (mean cosine between the mode's and fp32's
embeddings of the same items) and ``recall_at_10`` (mean R@10 over every direction of the manifest's
test split, ``mm.evaluate.evaluate_rows``). Targets: int8 >= 1.4x fp32 throughput, cosine >= 0.99 and
R@10 within 1 point; int4 size <= 1/6 of fp32 and R@10 within 3 points.

Run: ``python benchmarks/bench_quant.py [--model NAME|PATH] [--manifest FILE] [--limit N]``.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm.config import MODALITIES  # noqa: E402
from mm.evaluate import evaluate_rows, galleries  # noqa: E402
from mm.model import create_model, default_model_name, save_model  # noqa: E402
from mm.quantize import QuantSpec, checkpoint_size_mb, quantize_model, save_quantized  # noqa: E402
from mm.train import load_rows  # noqa: E402


def decode(modality: str, keys: list[str], sample_rate: int) -> list:
    from mm.media import load_audio, load_image

    if modality == "image":
        return [load_image(k) for k in keys]
    if modality == "audio":
        return [(load_audio(k, target_rate=sample_rate), sample_rate) for k in keys]
    return list(keys)


def encode_all(emb, inputs: dict[str, list], repeats: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Embeddings per modality and the best items/s over ``repeats`` passes (after one warm-up batch)."""
    vecs, speed = {}, {}
    for m, xs in inputs.items():
        emb.encode(m, xs[: emb.batch_size])  # warm-up (and INT8 weight packing)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            vecs[m] = emb.encode(m, xs)
            best = min(best, time.perf_counter() - t0)
        speed[m] = round(len(xs) / best, 2)
    return vecs, speed


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="config/checkpoint (default: the shipped model)")
    p.add_argument("--manifest", default="/tmp/corpus/manifest.jsonl")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=300, help="test rows used (0: all)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = args.model or default_model_name()

    rows = load_rows(args.manifest, args.split)
    if args.limit:
        rng = np.random.default_rng(0)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), min(args.limit, len(rows)), replace=False))]
    fp32 = create_model(model)
    items, _ = galleries(rows)
    keys = {m: items[m] for m in MODALITIES if items[m] and m in fp32.modalities}
    sr = fp32.config.audio.sample_rate
    inputs = {m: decode(m, ks, sr) for m, ks in keys.items()}

    out: dict = {"model": model, "rows": len(rows), "items": {m: len(k) for m, k in keys.items()}}
    ref: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fp32", "int8", "int4"):
            emb = create_model(model)
            ckpt = Path(tmp) / mode
            if mode == "fp32":
                save_model(emb.model, ckpt)
            else:
                spec = quantize_model(emb.model, QuantSpec(mode=mode, group_size=args.group_size))
                save_quantized(emb.model, spec, ckpt)
                emb = create_model(ckpt)  # measure what a user loads
            vecs, speed = encode_all(emb, inputs, args.repeats)
            if mode == "fp32":
                ref = vecs
            lookup = {m: dict(zip(keys[m], vecs[m], strict=True)) for m in keys}
            metrics = evaluate_rows(rows, lambda m, ks, lk=lookup: np.stack([lk[m][k] for k in ks]))
            cos = float(np.mean([(vecs[m] * ref[m]).sum(1).mean() for m in keys]))
            out[mode] = {
                "size_mb": round(checkpoint_size_mb(ckpt), 3),
                "throughput": speed,
                "cosine_to_fp32": round(cos, 5),
                "recall_at_10": round(float(np.mean([d["R@10"] for d in metrics.values()])), 4),
                "recall_at_10_by_direction": {k: round(d["R@10"], 4) for k, d in metrics.items()},
            }
    f, i8, i4 = out["fp32"], out["int8"], out["int4"]
    out["int8_speedup"] = {m: round(i8["throughput"][m] / f["throughput"][m], 3) for m in keys}
    out["int4_size_ratio"] = round(i4["size_mb"] / f["size_mb"], 4)
    out["targets"] = {
        "int8_speedup_ge_1.4": all(v >= 1.4 for v in out["int8_speedup"].values()),
        "int8_cosine_ge_0.99": i8["cosine_to_fp32"] >= 0.99,
        "int8_recall_within_1pt": abs(i8["recall_at_10"] - f["recall_at_10"]) <= 0.01,
        "int4_size_le_1/6": out["int4_size_ratio"] <= 1 / 6,
        "int4_recall_within_3pt": abs(i4["recall_at_10"] - f["recall_at_10"]) <= 0.03,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
