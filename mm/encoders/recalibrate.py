"""Regenerate the shipped static-INT8 calibration of the packaged EfficientNet-Lite0/1/2 weights.

``python -m mm.encoders.recalibrate IMAGE... [--variant lite0] [--size N] [--out FILE]`` measures the
activation ranges and depthwise input means (:func:`mm.encoders.efficientnet_int8.calibrate`) on the given
images at the variant's native size (unless ``--size``) and writes them as JSON, by default over the
variant's ``calibration_file`` beside the int8 module. A developer's tool: it
lives apart from the encoder modules (which it imports, and which never import it back); users
recalibrate their own quantized checkpoints with ``mm quantize --calibrate``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mm.atomic import atomic_write_text
from mm.encoders.efficientnet_int8 import calibrate, calibration_file
from mm.encoders.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    LITE_VARIANTS,
    efficientnet_lite,
    fold_batchnorms,
)
from mm.encoders.image import to_pixels

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Recalibrate the packaged weights on a set of images and write the calibration as JSON."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("images", nargs="+", help="image files (a few hundred, like the ones you will index)")
    p.add_argument("--variant", choices=sorted(LITE_VARIANTS), default="lite0")
    p.add_argument("--size", type=int, default=None, help="input size (default: the variant's native one)")
    p.add_argument("--out", type=Path, default=None, help="default: the variant's shipped calibration file")
    args = p.parse_args(argv)
    args.size = args.size or LITE_VARIANTS[args.variant].resolution
    args.out = args.out or calibration_file(args.variant)
    logging.basicConfig(level=logging.INFO)
    net = efficientnet_lite(args.variant).eval()
    fold_batchnorms(net)
    paths = sorted(args.images)
    batches = (to_pixels(paths[s : s + 32], args.size, LITE_MEAN, LITE_STD) for s in range(0, len(paths), 32))
    cal = calibrate(net, batches)
    about = (
        f"EfficientNet-{args.variant.capitalize()} (packaged ImageNet weights, BatchNorms folded): "
        f"activation min/max and depthwise input means on {len(paths)} images at {args.size}px; "
        "see mm/encoders/efficientnet_int8.py"
    )
    atomic_write_text(args.out, json.dumps({"format": 1, "about": about, **cal.to_dict()}) + "\n")
    log.info("wrote the calibration of %d tensors to %s", len(cal.ranges), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
