"""`mm finetune`: LoRA/QLoRA adapters on a manifest of your own pairs; `mm finetune merge` folds one in.

``mm finetune --manifest FILE --out DIR [--model BASE] [--lora-r 16 --lora-alpha 32 --targets q_proj,v_proj]
[--experts] [--qlora]`` writes ``DIR/adapter.safetensors`` + ``DIR/adapter.json`` and prints one JSON
object. ``mm finetune merge --adapter DIR --out CKPT [--model BASE]`` writes a normal checkpoint.
"""

from __future__ import annotations

import argparse
import json

from service.cli.common import UsageError, split_csv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="train LoRA/QLoRA adapters on your pairs, or merge one")
    p.add_argument("action", nargs="?", choices=("train", "merge"), default="train", help="default: train")
    p.add_argument("--manifest", help="JSONL manifest of groups (train/val splits; see docs/manifest.md)")
    p.add_argument("--out", required=True, help="adapter directory (train) or checkpoint directory (merge)")
    p.add_argument("--model", default=None, help="base config/checkpoint (default: the shipped model)")
    p.add_argument("--adapter", help="adapter directory to merge (merge)")
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="update scale alpha / r (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--targets", default="q_proj,v_proj", help="attention projections (q_proj,k_proj,v_proj,o_proj)"
    )
    p.add_argument("--experts", action="store_true", help="also adapt the MoE experts' w1/w2/w3")
    p.add_argument("--qlora", action="store_true", help="hold the frozen base in INT4 while adapters train")
    p.add_argument("--group-size", type=int, default=64, help="INT4 group size for --qlora (32, 64, 128)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mm.model import default_model_name

    if args.action == "merge":
        from mm.adapter import merge_adapter

        if not args.adapter:
            raise UsageError("mm finetune merge needs --adapter DIR")
        merged = merge_adapter(args.adapter, args.out, base=args.model)
        print(json.dumps({"out": str(merged), "adapter": args.adapter}))
        return 0
    if not args.manifest:
        raise UsageError("mm finetune needs --manifest FILE (or use `mm finetune merge --adapter DIR`)")
    from mm.finetune import finetune
    from mm.lora import LoraSpec
    from mm.train import TrainConfig

    spec = LoraSpec(
        r=args.lora_r,
        alpha=args.lora_alpha,
        targets=tuple(split_csv(args.targets)),
        experts=args.experts,
        dropout=args.lora_dropout,
        qlora=args.qlora,
        group_size=args.group_size,
    )
    cfg = TrainConfig(
        manifest=args.manifest,
        out_dir=args.out,
        model=args.model or default_model_name(),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        bf16=not args.no_bf16,
        progress=not args.quiet,
    )
    result, summary = finetune(cfg, spec)
    out = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 1),
        "out": result.out_dir,
        "val": result.val,
        **summary,
    }
    print(json.dumps(out))
    return 0
