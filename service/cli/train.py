"""`mm train`: contrastive training of the shared space from a JSONL manifest."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the shared embedding space from a manifest")
    p.add_argument("--manifest", required=True, help="JSONL manifest of groups (see docs/manifest.md)")
    p.add_argument("--out", required=True, help="checkpoint directory (resumes when it holds a run)")
    p.add_argument("--model", default="small", help="config name or checkpoint to start from")
    p.add_argument("--recipe", default=None, help="a named recipe (e.g. 'default'); other flags override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="model config override, e.g. backbone.depth=2 (repeatable)",
    )
    p.add_argument(
        "--source-weight",
        action="append",
        default=[],
        metavar="SOURCE=W",
        help="rows of SOURCE seen W times an epoch (0.4: 40%% of them), e.g. cldr=0.4; repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mm.recipes import recipe_config
    from mm.train import TrainConfig, train

    kw: dict = recipe_config(args.recipe) if args.recipe else {"model": args.model}
    overrides = dict(kw.pop("overrides", {}))
    for item in args.override:
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--override needs KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "seed"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    weights = dict(kw.pop("source_weights", {}))
    for item in args.source_weight:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--source-weight needs SOURCE=NUMBER, got {item!r}") from None
    if weights:
        kw["source_weights"] = weights
    if args.no_bf16:
        kw["bf16"] = False
    if args.recipe is None:
        kw["model"] = args.model
    cfg = TrainConfig(manifest=args.manifest, out_dir=args.out, overrides=overrides, **kw)
    result = train(cfg)
    print(
        json.dumps(
            {
                "steps": result.steps,
                "final_loss": result.final_loss,
                "seconds": round(result.seconds, 1),
                "out": result.out_dir,
                "val": result.val,
            }
        ),
        file=sys.stdout,
    )
    return 0
