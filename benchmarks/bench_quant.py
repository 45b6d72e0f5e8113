"""INT8 dynamic and INT4 weight-only quantization against fp32: size, speed, fidelity, retrieval.

For each of fp32 / int8 / int4, in one run (every mode is saved and reloaded, so it is measured as a
user loads it):

- ``size_mb``: the checkpoint directory on disk.
- ``throughput`` (items/s per modality: texts, images, audio clips): what ingest pays per item. Ingest
  decodes files in worker threads and calls ``embedder.encode_<modality>(decoded)`` on batches, so the
  timed call is ``emb.encode(m, decoded)`` on ``--speed-items`` already-decoded inputs (PIL images,
  (waveform, rate) pairs, strings) at the embedder's batch size (32). It includes ``prepare`` (text
  tokenising; image resize, crop and normalise; audio log-mel), which no mode changes, and the model.
  No decoding, model loading, quantization or INT8 weight packing is timed (one warm-up batch first).
- ``model_throughput``: the model alone, ``model.encode_batch`` on batches prepared beforehand: the part
  quantization can speed up.
- ``*_cpu`` variants: items per CPU-second (``time.process_time``) of the same calls. On a shared,
  loaded machine wall time mostly measures the other jobs; with ``--threads 1`` CPU time is the
  steadier number (it still moves with cache and memory-bandwidth contention).

Timing: ``--repeats`` rounds; in each round every modality is timed for every mode back to back, the
mode order rotating between rounds, so load drift hits all modes alike. Reported: the median over
rounds (``*_min_s``: the fastest round, in seconds). Speedups are ratios of medians against fp32.

- fp32 already has the frozen EfficientNet's BatchNorms folded into its convolutions (the encoder does
  it when it loads: :func:`mm.encoders.efficientnet_lite.fold_batchnorms`), so int8's speedup is
  quantization's alone.
- ``cosine_to_fp32``: mean over modalities of the mean cosine between the mode's and fp32's embeddings
  of the same items (``cosine_by_modality`` per modality).
- ``recall_at_10``: mean R@10 over every direction of the manifest's test split
  (``mm.evaluate.evaluate_rows``; ``--limit`` rows drawn with a fixed seed).

``--ceiling`` adds ``linear_free``: fp32 with every Linear layer that int8 quantizes replaced by one that
computes nothing (a reused zero tensor), timed in the same rotation. Its speedup over fp32 is the most
any quantization of the Linear layers could give; for audio it is below 1.4 (see docs/results.md).

Targets: int8 >= 1.4x fp32 throughput, cosine >= 0.99 and R@10 within 1 point; int4 size <= 1/6 of
fp32 and R@10 within 3 points.

Run: ``python benchmarks/bench_quant.py [--model NAME|PATH] [--manifest FILE] [--limit N] [--threads 1]
[--ceiling]``.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paths import default_manifest  # noqa: E402
from mm.checkpoint import checkpoint_size_mb  # noqa: E402
from mm.config import MODALITIES  # noqa: E402
from mm.evaluate import evaluate_rows, galleries  # noqa: E402
from mm.model import MultimodalEmbedder, create_model, default_model_name, save_model  # noqa: E402
from mm.quantize import Int8Linear, QuantSpec, quantize_model  # noqa: E402
from mm.quantize_checkpoint import save_quantized  # noqa: E402
from mm.runtime import tune_allocator  # noqa: E402
from mm.train import load_rows  # noqa: E402

log = logging.getLogger("bench_quant")
MODES = ("fp32", "int8", "int4")
QUANT_MODES = ("int8", "int4")


def decode(modality: str, keys: list[str], sample_rate: int) -> list:
    from mm.media import load_audio, load_image

    if modality == "image":
        return [load_image(k) for k in keys]
    if modality == "audio":
        return [(load_audio(k, target_rate=sample_rate), sample_rate) for k in keys]
    return list(keys)


def build(model: str, mode: str, tmp: Path, group_size: int) -> tuple[MultimodalEmbedder, Path | None]:
    """The embedder for ``mode`` as a user loads it, and its checkpoint directory (None: not saved)."""
    emb = create_model(model)
    ckpt = tmp / mode
    if mode == "fp32":
        save_model(emb.model, ckpt)
    else:
        spec = quantize_model(emb.model, QuantSpec(mode=mode, group_size=group_size))  # type: ignore[arg-type]
        save_quantized(emb.model, spec, ckpt)
    return create_model(ckpt), ckpt


class FreeLinear(torch.nn.Module):
    """A Linear that computes nothing (``--ceiling``): it answers a zero tensor of the right shape, made
    once per shape and reused, so the timing keeps everything but the Linear layers' own work."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.outputs: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if shape not in self.outputs:
            self.outputs[shape] = x.new_zeros(shape)
        return self.outputs[shape]


def linear_free(model: str, int8: MultimodalEmbedder) -> MultimodalEmbedder:
    """fp32 ``model`` with every Linear that int8 quantizes replaced by a :class:`FreeLinear`: the speed
    int8 would reach if its Linear layers cost nothing (its static INT8 convolutions aside)."""
    emb = create_model(model)
    for name, module in int8.model.named_modules():
        if isinstance(module, Int8Linear):
            parent, _, child = name.rpartition(".")
            owner = emb.model.get_submodule(parent) if parent else emb.model
            setattr(owner, child, FreeLinear(module.out_features))
    return emb


def _timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


@torch.inference_mode()
def _run_model(emb: MultimodalEmbedder, modality: str, batches: list[dict]) -> None:
    for b in batches:
        emb.model.encode_batch(modality, b)


def time_modes(
    embs: dict[str, MultimodalEmbedder], inputs: dict[str, list], repeats: int
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Seconds per round: ``{mode: {kind: {modality: [s, ...]}}}``, kind in wall/cpu/model_wall/model_cpu."""
    ref = next(iter(embs.values()))
    prepared = {
        m: [
            ref.model.encoders[m].prepare(xs[i : i + ref.batch_size])
            for i in range(0, len(xs), ref.batch_size)
        ]
        for m, xs in inputs.items()
    }
    kinds = ("wall", "cpu", "model_wall", "model_cpu")
    secs = {mode: {k: {m: [] for m in inputs} for k in kinds} for mode in embs}
    for emb in embs.values():  # warm-up: oneDNN primitives, INT8 weight packing
        for m, xs in inputs.items():
            emb.encode(m, xs[: emb.batch_size])
    order = list(embs)
    for r in range(repeats):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for m, xs in inputs.items():
            for mode in rot:
                emb = embs[mode]
                w, c = _timed(lambda e=emb, m=m, xs=xs: e.encode(m, xs))
                mw, mc = _timed(lambda e=emb, m=m: _run_model(e, m, prepared[m]))
                for k, v in zip(kinds, (w, c, mw, mc), strict=True):
                    secs[mode][k][m].append(v)
        log.info("round %d/%d done", r + 1, repeats)
    return secs


def speed_report(secs: dict[str, dict[str, list[float]]], n: dict[str, int]) -> dict[str, Any]:
    """Median items/s per kind and modality, plus the fastest round's seconds for the end-to-end call."""
    out: dict[str, Any] = {}
    names = {"wall": "throughput", "cpu": "throughput_cpu", "model_wall": "model_throughput"}
    names["model_cpu"] = "model_throughput_cpu"
    for kind, key in names.items():
        out[key] = {m: round(n[m] / float(np.median(s)), 2) for m, s in secs[kind].items()}
    out["throughput_min_s"] = {m: round(min(s), 3) for m, s in secs["wall"].items()}
    return out


def quality(
    emb: MultimodalEmbedder, rows: list[dict], keys: dict[str, list[str]], inputs: dict[str, list]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    vecs = {m: emb.encode(m, xs) for m, xs in inputs.items()}
    lookup = {m: dict(zip(keys[m], vecs[m], strict=True)) for m in keys}
    metrics = evaluate_rows(rows, lambda m, ks: np.stack([lookup[m][k] for k in ks]))
    return vecs, {
        "recall_at_10": round(float(np.mean([d["R@10"] for d in metrics.values()])), 4),
        "recall_at_10_by_direction": {k: round(d["R@10"], 4) for k, d in metrics.items()},
    }


def _ratios(out: dict, mode: str, key: str, mods: list[str]) -> dict[str, float]:
    return {m: round(out[mode][key][m] / out["fp32"][key][m], 3) for m in mods}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="config/checkpoint (default: the shipped model)")
    p.add_argument("--manifest", default=None, help="evaluation manifest (default: the demo corpus)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=300, help="test rows used for cosine and recall (0: all)")
    p.add_argument("--speed-items", type=int, default=64, help="items per modality in each timed call")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also time fp32 with int8's Linear layers costing nothing (linear_free: int8's speed ceiling)",
    )
    p.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="keep glibc's allocator defaults (what mm does: see mm.runtime)",
    )
    args = p.parse_args(argv)
    args.manifest = args.manifest or default_manifest()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    allocator_tuned = False if args.glibc_malloc else tune_allocator()
    model = args.model or default_model_name()

    rows = load_rows(args.manifest, args.split)
    if args.limit:
        rng = np.random.default_rng(0)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), min(args.limit, len(rows)), replace=False))]
    items, _ = galleries(rows)
    out: dict[str, Any] = {
        "model": model,
        "rows": len(rows),
        "threads": args.threads,
        "allocator_tuned": allocator_tuned,
    }
    with tempfile.TemporaryDirectory() as tmp:
        embs, ckpts = {}, {}
        for mode in MODES:
            embs[mode], ckpts[mode] = build(model, mode, Path(tmp), args.group_size)
        fp32 = embs["fp32"]
        if args.ceiling:
            embs["linear_free"] = linear_free(model, embs["int8"])
        keys = {m: items[m] for m in MODALITIES if items[m] and m in fp32.modalities}
        sr = fp32.config.audio.sample_rate
        inputs = {m: decode(m, ks, sr) for m, ks in keys.items()}
        mods = list(keys)
        out["items"] = {m: len(k) for m, k in keys.items()}
        speed_inputs = {m: xs[: args.speed_items] for m, xs in inputs.items()}
        out["speed_items"] = {m: len(xs) for m, xs in speed_inputs.items()}
        out["load_before"] = [round(x, 2) for x in os.getloadavg()]
        secs = time_modes(embs, speed_inputs, args.repeats)
        out["load_after"] = [round(x, 2) for x in os.getloadavg()]
        ref: dict[str, np.ndarray] = {}
        for mode in MODES:
            speed = speed_report(secs[mode], out["speed_items"])
            vecs, q = quality(embs[mode], rows, keys, inputs)
            ref = ref or vecs
            cos = {m: round(float((vecs[m] * ref[m]).sum(1).mean()), 5) for m in mods}
            out[mode] = {
                "size_mb": round(checkpoint_size_mb(ckpts[mode]), 3),  # type: ignore[arg-type]
                **speed,
                "cosine_to_fp32": round(float(np.mean(list(cos.values()))), 5),
                "cosine_by_modality": cos,
                **q,
            }
        if args.ceiling:
            out["linear_free"] = speed_report(secs["linear_free"], out["speed_items"])
    for mode in QUANT_MODES + (("linear_free",) if args.ceiling else ()):
        out[f"{mode}_speedup"] = _ratios(out, mode, "throughput", mods)
        out[f"{mode}_speedup_cpu"] = _ratios(out, mode, "throughput_cpu", mods)
        out[f"{mode}_model_speedup_cpu"] = _ratios(out, mode, "model_throughput_cpu", mods)
    f, i8, i4 = out["fp32"], out["int8"], out["int4"]
    out["int4_size_ratio"] = round(i4["size_mb"] / f["size_mb"], 4)
    out["targets"] = {
        "int8_speedup_ge_1.4": {m: v >= 1.4 for m, v in out["int8_speedup"].items()},
        "int8_speedup_cpu_ge_1.4": {m: v >= 1.4 for m, v in out["int8_speedup_cpu"].items()},
        "int8_cosine_ge_0.99": i8["cosine_to_fp32"] >= 0.99,
        "int8_recall_within_1pt": abs(i8["recall_at_10"] - f["recall_at_10"]) <= 0.01,
        "int4_size_le_1/6": out["int4_size_ratio"] <= 1 / 6,
        "int4_recall_within_3pt": abs(i4["recall_at_10"] - f["recall_at_10"]) <= 0.03,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
