"""`mm quantize`: INT8 dynamic or INT4 weight-only quantization of a model into a checkpoint directory.

The output loads with ``create_model(OUT)`` (and ``--model OUT`` everywhere) like any checkpoint. Prints
one JSON object: ``{"out", "mode", "group_size", "modules", "size_mb"}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli.common import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="INT8/INT4-quantize a model into a checkpoint directory")
    p.add_argument(
        "--model", default=None, help="config/checkpoint name or directory (default: shipped model)"
    )
    p.add_argument("--mode", required=True, choices=("int8", "int4"))
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--group-size", type=int, default=64, help="INT4 group size: 32, 64 or 128 (default 64)")
    enc = p.add_mutually_exclusive_group()
    enc.add_argument(
        "--encoders",
        dest="encoders",
        action="store_true",
        default=None,
        help="also quantize packaged encoders",
    )
    enc.add_argument(
        "--no-encoders", dest="encoders", action="store_false", help="keep packaged encoders fp32"
    )
    p.add_argument(
        "--calibrate",
        nargs="+",
        metavar="PATH",
        help="int8: recalibrate the image encoder's static INT8 convolutions on these images or folders "
        "(a few hundred like the ones you index; default: the shipped calibration)",
    )
    p.set_defaults(func=run)


def _images(paths: list[str]) -> list[Path]:
    """Image files among ``paths``, folders searched recursively; a one-line error when there are none."""
    from mm.media import IMAGE_EXTS

    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"--calibrate: no such file or folder: {raw}")
    if not found:
        raise UsageError("--calibrate: no image files found")
    return found


def run(args: argparse.Namespace) -> int:
    from mm.checkpoint import checkpoint_size_mb
    from mm.model import default_model_name
    from mm.quantize_checkpoint import quantize_checkpoint

    images = _images(args.calibrate) if args.calibrate else None
    out, spec = quantize_checkpoint(
        args.model or default_model_name(), args.mode, args.out, args.group_size, args.encoders, images
    )
    print(
        json.dumps(
            {
                "out": str(out),
                "mode": spec.mode,
                "group_size": spec.group_size if spec.mode == "int4" else None,
                "modules": len(spec.modules),
                "size_mb": round(checkpoint_size_mb(out), 3),
            }
        )
    )
    return 0
