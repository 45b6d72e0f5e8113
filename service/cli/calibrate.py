"""`mm calibrate`: fit the per-modality-pair score calibration of a checkpoint on a manifest split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit raw score -> P(relevant) per modality pair (stored with the checkpoint)"
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", required=True, help="checkpoint directory (calibration.json is written there)")
    p.add_argument("--split", default="val", help="the split to fit on (never the test split you report)")
    p.add_argument("--out", default=None, help="write here instead of MODEL/calibration.json")
    p.add_argument(
        "--own-priors",
        action="store_true",
        help="keep each modality pair's own base rate of relevant pairs (default: one shared rate, so that "
        "mixed results rank by how well each pair's score separates relevant from irrelevant)",
    )
    p.add_argument("--json", action="store_true", help="print the fit report as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from mm.calibration import FILE_NAME, fit_calibration
    from mm.model import create_model
    from mm.train import load_rows
    from service.word_calibration import fit_word_calibration

    model_dir = Path(args.model)
    if args.out is None and not model_dir.is_dir():
        raise ValueError(f"--model {args.model!r} is not a checkpoint directory: pass one, or --out FILE")
    rows = load_rows(args.manifest, args.split)
    if not rows:
        raise ValueError(f"no rows in split {args.split!r} of {args.manifest}")
    emb = create_model(args.model)
    from service.search_eval import usable_rows

    rows, encode, refused = usable_rows(rows, emb)  # a file the decoder refuses is left out, as in training
    cal, report = fit_calibration(rows, encode, split=args.split, common_prior=not args.own_priors)
    report["refused_files"] = len(refused)
    if not cal.fitted:
        raise ValueError(f"split {args.split!r} has no relevant pairs to fit on")
    words, report["lexical"] = fit_word_calibration(rows)
    cal = dataclasses.replace(cal, lexical=words)
    out = Path(args.out) if args.out else model_dir / FILE_NAME
    cal.save(out)
    if args.json:
        print(json.dumps({"out": str(out), **report}))
    else:
        print(f"calibration of {len(cal.pairs)} modality pairs written to {out}")
        print(f"no-match threshold {cal.threshold:.4f} (rates on {args.split}: {report['threshold_rates']})")
    return 0
