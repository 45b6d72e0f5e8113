"""Adapting to a held-out domain: base vs LoRA vs QLoRA vs full fine-tune.

Fine-tunes ``--model`` on one source's train rows (default: sonicpi, audio<->text, which the shared
training mix barely covers) and evaluates on that source's test rows. Per mode: ``recall_at_10`` (mean
R@10 over both directions) and per-direction metrics, trainable parameters (and % of what a full
fine-tune trains), wall time (``seconds``) and process CPU time (``cpu_seconds``, the steadier number on
a shared machine) of the training loop, and peak memory. ``domain`` says how much of the manifest's
train split the held-out source is (the share the default model saw of it while it was trained).

Memory method: each mode runs in its own subprocess; ``peak_rss_mb`` is that process's RSS high-water
mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at the end, ``train_rss_mb`` the growth of that
mark during training (peak minus the mark after imports, model load and feature caching). The LoRA
modes import peft (and through it transformers), which raises their baseline but not the growth.

Run: ``python benchmarks/bench_finetune.py [--model NAME|PATH] [--source sonicpi] [--max-steps N]``.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paths import default_manifest  # noqa: E402

MODES = ("base", "lora", "qlora", "full")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(mode: str, args: argparse.Namespace, manifest: Path, out_dir: Path) -> dict:
    import torch

    from mm.finetune import LoraTrainer
    from mm.lora import LoraSpec
    from mm.train import TrainConfig, Trainer, load_rows

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        manifest=str(manifest),
        out_dir=str(out_dir),
        model=args.model,
        max_steps=max(1, args.max_steps),
        batch_size=args.batch_size,
        lr=args.full_lr if mode == "full" else args.lr,
        warmup_steps=max(1, args.max_steps // 10),
        val_split="",
        progress=False,
        ckpt_every=10**9,
        bf16=not args.no_bf16,
    )
    if mode in ("lora", "qlora"):
        spec = LoraSpec(r=args.lora_r, alpha=2.0 * args.lora_r, experts=args.experts, qlora=mode == "qlora")
        trainer: Trainer = LoraTrainer(cfg, spec)
    else:
        trainer = Trainer(cfg)
    test = load_rows(manifest, "test")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.fill_caches()
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if mode != "base":
        trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    metrics = trainer.evaluate(test)
    return {
        "recall_at_10": round(float(np.mean([d["R@10"] for d in metrics.values()])), 4),
        "metrics": {k: {m: round(v, 4) for m, v in d.items()} for k, d in metrics.items()},
        "trainable_params": 0 if mode == "base" else trainable,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "train_rss_mb": round(_rss_mb() - before, 1),
    }


def domain_manifest(src: str, source: str, out: Path) -> Path:
    from mm.train import load_rows

    rows = [
        r for r in load_rows(src, None) if r.get("source") == source and r.get("split") in ("train", "test")
    ]
    if not any(r["split"] == "train" for r in rows) or not any(r["split"] == "test" for r in rows):
        raise SystemExit(f"{src} has no train and test rows of source {source!r}")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))  # paths are already absolute
    return out


def domain_share(src: str, source: str) -> dict:
    """Rows of ``source`` per split, and its share of the whole manifest's train split."""
    from mm.train import load_rows

    rows = load_rows(src, None)
    mine = [r for r in rows if r.get("source") == source]
    n_train = sum(r.get("split") == "train" for r in rows)
    splits = {s: sum(r.get("split") == s for r in mine) for s in ("train", "val", "test")}
    return {**splits, "share_of_train_pct": round(100 * splits["train"] / max(1, n_train), 2)}


def main(argv: list[str] | None = None) -> dict:
    from mm.model import default_model_name

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--manifest", default=None, help="training manifest (default: the demo corpus)")
    p.add_argument("--source", default="sonicpi", help="the held-out domain (a manifest 'source')")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA/QLoRA learning rate")
    p.add_argument("--full-lr", type=float, default=2e-4, help="full fine-tune learning rate")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--experts", action="store_true", help="adapt the experts too")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or default_model_name()
    args.manifest = args.manifest or str(default_manifest())
    if args.worker:
        work = Path(args.work_dir)
        res = worker(args.worker, args, work / "domain.jsonl", work / args.worker)
        print(json.dumps(res))
        return res
    out: dict = {"model": args.model, "source": args.source, "max_steps": args.max_steps}
    out["threads"], out["domain"] = args.threads, domain_share(args.manifest, args.source)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        domain_manifest(args.manifest, args.source, Path(tmp) / "domain.jsonl")
        opts = [
            "--model",
            args.model,
            "--max-steps",
            str(args.max_steps),
            "--batch-size",
            str(args.batch_size),
        ]
        opts += ["--lr", str(args.lr), "--full-lr", str(args.full_lr), "--lora-r", str(args.lora_r)]
        opts += ["--threads", str(args.threads), "--work-dir", tmp]
        opts += (["--experts"] if args.experts else []) + (["--no-bf16"] if args.no_bf16 else [])
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, *opts, "--worker", mode]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                out[mode] = {"error": proc.stderr.strip().splitlines()[-1:]}
                continue
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = out.get("full", {}).get("trainable_params")
    for mode in ("lora", "qlora"):
        if full and "trainable_params" in out.get(mode, {}):
            out[mode]["trainable_pct_of_full"] = round(100 * out[mode]["trainable_params"] / full, 3)
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
