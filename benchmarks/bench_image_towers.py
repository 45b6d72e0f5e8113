"""Which image tower pays: EfficientNet-Lite0 / Lite1 / Lite2, text<->image gain against ingest cost.

Cost: images per CPU-second of ingest (decode + resize + encode, one batch of ``--batch`` demo images at the
tower's native size, ``--threads`` torch threads, median of ``--runs`` warm runs), fp32 (BatchNorms folded,
as the encoder always runs) and static int8 (oneDNN; calibrated on ``--calibrate`` training images that are
not in the timed batch). CPU-seconds are the process' user + system time, so the number holds on a busy
machine; wall-clock images/s is reported beside it.

Quality: a linear probe, the cheapest fair comparison. The tower's frozen pooled features (1280-d) and the
frozen USE-multilingual text tower's pooled features (512-d, the shipped text encoder) each get a linear
projection to ``--dim``, trained with the symmetric InfoNCE loss on (image, caption) training pairs, every
caption language; same steps, batch and seeds for every tower (the probe ``head="linear"`` of mm.train trains,
on pooled features only). Metrics: text->image and image->text R@10 and R@1 with concept-level relevance
(mm.evaluate) on the val and test splits (concepts unseen in training), mean over ``--seeds`` probe seeds.
The training images are capped at ``--train-images`` (a seeded sample of the unique training images, all
their captions kept) to keep the feature cache affordable; val and test are used whole.

    python benchmarks/bench_image_towers.py [--manifest M] [--towers lite0,lite1,lite2] [--train-images N]

Pooled features are cached per tower under ``--cache`` (resumable). Last line: one JSON object
{"budget": {...}, "towers": {name: {"images_per_cpu_second", "int8_images_per_cpu_second", "val": {...},
"test": {...}, ...}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paths import CACHE, default_manifest  # noqa: E402
from mm.atomic import atomic_write  # noqa: E402

log = logging.getLogger("bench_image_towers")
DIRECTIONS = (("text", "image"), ("image", "text"))


def _cpu() -> float:
    import os

    t = os.times()
    return t.user + t.system


def build_tower(name: str):
    from mm.config import ImageEncoderConfig
    from mm.encoders.efficientnet_lite import lite_variant
    from mm.encoders.image import build_image_encoder

    size = lite_variant(name).resolution
    return build_image_encoder(ImageEncoderConfig(kind=f"efficientnet_{name}", image_size=size)).eval()


def save_features(path: Path, feats: dict[str, np.ndarray]) -> None:
    """The cache as one .npz, written atomically (a kill mid-save leaves the previous cache whole)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, keys=np.array(list(feats)), values=np.stack(list(feats.values())))

    atomic_write(path, write)


def pooled_features(enc, keys: list[str], path: Path, batch: int = 32) -> dict[str, np.ndarray]:
    """Pooled features by image key, cached in ``path`` (resumable between runs)."""
    import torch

    feats: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            feats = dict(zip(z["keys"].tolist(), z["values"], strict=True))
    todo = [k for k in dict.fromkeys(keys) if k not in feats]
    t0 = time.perf_counter()
    for s in range(0, len(todo), batch):
        chunk = todo[s : s + batch]
        with torch.inference_mode():
            out = enc(enc.prepare(chunk)).pooled.float().numpy()
        feats.update(zip(chunk, out, strict=True))
        if (s // batch) % 10 == 9 or s + batch >= len(todo):
            save_features(path, feats)
            log.info(
                "%s: %d/%d images (%.0fs)", path.name, s + len(chunk), len(todo), time.perf_counter() - t0
            )
    return feats


def ingest_speed(enc, images: list[str], runs: int) -> dict[str, float]:
    """Median wall and CPU seconds of prepare (decode, resize) + encode for one batch of ``images``."""
    import torch

    walls, cpus, enc_cpus = [], [], []
    with torch.inference_mode():
        enc(enc.prepare(images))  # warm-up at the timed shape (oneDNN creates its primitives per shape)
        for _ in range(runs):
            w0, c0 = time.perf_counter(), _cpu()
            batch = enc.prepare(images)
            c1 = _cpu()
            enc(batch)
            walls.append(time.perf_counter() - w0)
            cpus.append(_cpu() - c0)
            enc_cpus.append(_cpu() - c1)
    n = len(images)
    return {
        "images_per_second": n / statistics.median(walls),
        "images_per_cpu_second": n / statistics.median(cpus),
        "encode_images_per_cpu_second": n / statistics.median(enc_cpus),
    }


def train_probe(
    img: np.ndarray, txt: np.ndarray, pairs: np.ndarray, dim: int, steps: int, batch: int, seed: int
):
    """Linear maps image (N_i, Ci) and text (N_t, Ct) features -> (., dim), symmetric InfoNCE on
    ``pairs`` (P, 2) of (image index, text index). Returns the two projection functions."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    xi, xt = torch.from_numpy(img), torch.from_numpy(txt)
    # standardise each feature (statistics of the training features) so one learning rate fits both towers
    mi, si = xi.mean(0), xi.std(0) + 1e-6
    mt, st = xt.mean(0), xt.std(0) + 1e-6
    wi, wt = torch.nn.Linear(xi.shape[1], dim), torch.nn.Linear(xt.shape[1], dim)
    logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    opt = torch.optim.AdamW([*wi.parameters(), *wt.parameters(), logit_scale], lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        sel = pairs[gen.choice(len(pairs), size=min(batch, len(pairs)), replace=False)]
        # one caption per image in a batch, so the only positives are on the diagonal
        _, first = np.unique(sel[:, 0], return_index=True)
        sel = sel[first]
        zi = F.normalize(wi((xi[sel[:, 0]] - mi) / si), dim=-1)
        zt = F.normalize(wt((xt[sel[:, 1]] - mt) / st), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * zt @ zi.T  # (B, B)
        target = torch.arange(len(sel))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()

    def project(w, m, s):
        def f(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return F.normalize(w((torch.from_numpy(x) - m) / s), dim=-1).numpy()

        return f

    return project(wi, mi, si), project(wt, mt, st)


def probe_quality(feats: dict, tfeat: dict, splits: dict[str, list[dict]], args) -> dict:
    """Val/test R@1 and R@10 of linear probes on these image and text features, mean over seeds."""
    all_images = sorted({str(r["image"]) for rows in splits.values() for r in rows})
    all_texts = sorted({r["text"] for rows in splits.values() for r in rows})
    img_keys = {k: i for i, k in enumerate(all_images)}
    txt_keys = {t: i for i, t in enumerate(all_texts)}
    img = np.stack([feats[k] for k in all_images]).astype(np.float32)
    txt = np.stack([tfeat[t] for t in all_texts]).astype(np.float32)
    pairs = np.array([(img_keys[str(r["image"])], txt_keys[r["text"]]) for r in splits["train"]])
    from mm.evaluate import evaluate_rows

    runs: dict[str, list[dict]] = {"val": [], "test": []}
    for seed in range(args.seeds):
        proj_i, proj_t = train_probe(img, txt, pairs, args.dim, args.steps, args.probe_batch, seed)

        def encode(m: str, keys: list[str], pi=proj_i, pt=proj_t) -> np.ndarray:
            if m == "image":
                return pi(img[[img_keys[k] for k in keys]])
            return pt(txt[[txt_keys[k] for k in keys]])

        for split in runs:
            runs[split].append(evaluate_rows(splits[split], encode, directions=DIRECTIONS))
    res = {}
    for split, per_seed in runs.items():
        res[split] = {
            f"{a}->{b}": {
                k: round(float(np.mean([r[f"{a}->{b}"][k] for r in per_seed])), 4) for k in ("R@1", "R@10")
            }
            | {"R@10_seed_spread": round(float(np.ptp([r[f"{a}->{b}"]["R@10"] for r in per_seed])), 4)}
            for a, b in DIRECTIONS
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=None, help="default: the demo corpus (built when absent)")
    ap.add_argument("--towers", default="lite0,lite1,lite2")
    ap.add_argument("--train-images", type=int, default=None, help="cap on unique training images")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--probe-batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="images in the timed ingest batch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calibrate", type=int, default=64, help="training images that calibrate int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true", help="skip the timing (quality only)")
    ap.add_argument("--cache", default=str(CACHE / "image_towers"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from mm.config import TextEncoderConfig
    from mm.encoders import build_text_encoder
    from mm.encoders.efficientnet_lite import LITE_VARIANTS
    from mm.train import load_rows

    torch.set_num_threads(args.threads)
    manifest = Path(args.manifest) if args.manifest else default_manifest()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    def image_text(split: str) -> list[dict]:
        return [
            {k: r[k] for k in ("image", "text", "label") if k in r}
            for r in load_rows(manifest, split)
            if r.get("image") and r.get("text")
        ]

    splits = {s: image_text(s) for s in ("train", "val", "test")}
    train_images = sorted({str(r["image"]) for r in splits["train"]})
    random.Random(0).shuffle(train_images)
    calib, timed = train_images[: args.calibrate], train_images[args.calibrate : args.calibrate + args.batch]
    kept = set(train_images[: args.train_images or len(train_images)])
    splits["train"] = [r for r in splits["train"] if str(r["image"]) in kept]
    # eval images first, then training images in the seeded order: a capped rerun reuses what is cached
    eval_images = sorted({str(r["image"]) for s in ("val", "test") for r in splits[s]})
    all_images = eval_images + [k for k in train_images if k in kept]
    all_texts = sorted({r["text"] for rows in splits.values() for r in rows})
    log.info("%d images (%d train), %d captions", len(all_images), len(kept), len(all_texts))

    text_path = cache / "text-use_multilingual.npz"
    text_enc = build_text_encoder(TextEncoderConfig(kind="use_multilingual", dim=512)).eval()
    tfeat = pooled_features(text_enc, all_texts, text_path, batch=256)
    del text_enc

    budget = {
        "train_images": len(kept),
        "train_pairs": len(splits["train"]),
        "steps": args.steps,
        "probe_batch": args.probe_batch,
        "dim": args.dim,
        "seeds": args.seeds,
        "timed_batch": args.batch,
        "threads": args.threads,
        "text": "use_multilingual",
    }
    towers: dict[str, dict] = {}
    for name in args.towers.split(","):
        enc = build_tower(name)
        res: dict = {"image_size": LITE_VARIANTS[name].resolution}
        if not args.no_speed:
            fp32 = ingest_speed(enc, timed, args.runs)
            res |= {k: round(v, 2) for k, v in fp32.items()}
        feats = pooled_features(enc, all_images, cache / f"image-{name}-{res['image_size']}.npz")
        if not args.no_speed:
            with torch.inference_mode():
                ref = enc(enc.prepare(timed)).pooled
            if enc.quantize_convs(enc.calibrate_convs(calib).to_dict()):
                q = ingest_speed(enc, timed, args.runs)
                res |= {f"int8_{k}": round(v, 2) for k, v in q.items()}
                with torch.inference_mode():
                    got = enc(enc.prepare(timed)).pooled
                res["int8_pooled_cosine"] = round(
                    float(torch.nn.functional.cosine_similarity(got, ref).mean()), 4
                )
        del enc

        res |= probe_quality(feats, tfeat, splits, args)
        towers[name] = res
        log.info("%s: %s", name, json.dumps(res))

    print("\n| tower | px | img/CPU-s fp32 | img/CPU-s int8 | val t->i | val i->t | test t->i | test i->t |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in towers.items():
        cells = [f"{r[s][d]['R@10']:.3f}" for s in ("val", "test") for d in ("text->image", "image->text")]
        print(
            f"| {name} | {r['image_size']} | {r.get('images_per_cpu_second', '-')} | "
            f"{r.get('int8_images_per_cpu_second', '-')} | " + " | ".join(cells) + " |"
        )
    print(json.dumps({"budget": budget, "towers": towers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
