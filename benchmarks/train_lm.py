"""Train the grounded decoder (mm/lm.py) on the sample corpus and report held-out answer quality.

Task: "describe an item or a set of items from their vectors". Input = the shared-space vectors of 1-3
items as prefix (from the embedder ``--model``), their captions in the text context half of the time,
and a question; target = the items named in one sentence ("A frog and a drum hit."). Items are split
by the corpus' own split (by concept), so test items are never seen in training.

Evaluation on test items (greedy), against the extractive backend's answer for the same items:
ROUGE-L F1 against the reference sentence and exact match, with and without captions in context.

Speed: item vectors are encoded once (and cached); batches are cut from a pool of examples sorted by
length, so they carry little padding, and the MoE skips what padding is left (``pad_mask``).

    python benchmarks/train_lm.py --model default --config lm_fast --minutes 30 --threads 1 \
        [--init previous/checkpoint] --out mm/checkpoints/lm

Writes config.json, model.safetensors (bf16) and train_log.jsonl to ``--out``; the last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths import cache_dir, default_manifest  # noqa: E402

log = logging.getLogger("train_lm")

QUESTIONS = [
    "What are these?",
    "Describe the items.",
    "What is this?",
    "What do you see and hear?",
    "Name them.",
]
SOURCE_CAP = {"twemoji": 1200, "speech": 300}  # per-source item caps keep encoding within budget


def load_items(manifest: Path, seed: int) -> list[dict]:
    """One item per media file with its English caption: {modality, path, caption, split}."""
    from mm.data import read_manifest

    rows = read_manifest(manifest, check_files=False)
    seen: dict[str, dict] = {}
    for r in rows:
        if (r.get("lang") or "en") != "en" or not r.get("text"):
            continue
        for modality in ("image", "audio"):
            path = r.get(modality)
            if path and path not in seen:
                seen[path] = {
                    "modality": modality,
                    "path": str(path),
                    "caption": " ".join(str(r["text"]).split()),
                    "split": r.get("split") or "train",
                    "source": r.get("source") or "",
                }
    items = list(seen.values())
    rng = random.Random(seed)
    rng.shuffle(items)
    counts: dict[str, int] = {}
    kept = []
    for it in items:
        cap = SOURCE_CAP.get(it["source"])
        counts[it["source"]] = counts.get(it["source"], 0) + 1
        if cap is None or counts[it["source"]] <= cap:
            kept.append(it)
    return kept


def encode_items(items: list[dict], model: str, cache_dir: Path) -> np.ndarray:
    """(N, M) shared-space vectors, cached per model id and item list."""
    from mm.model import create_model

    emb = create_model(model)
    key = hashlib.sha1((emb.model_id + "|" + "|".join(i["path"] for i in items)).encode()).hexdigest()[:16]
    cache = cache_dir / f"lm_vectors_{key}.npy"
    if cache.exists():
        return np.load(cache)
    t0 = time.perf_counter()
    out = np.zeros((len(items), emb.dim), np.float32)
    for modality in ("image", "audio"):
        idx = [i for i, it in enumerate(items) if it["modality"] == modality]
        for s in range(0, len(idx), 64):
            chunk = idx[s : s + 64]
            out[chunk] = emb.encode(modality, [items[i]["path"] for i in chunk])
        log.info("encoded %d %s items (%.0f s)", len(idx), modality, time.perf_counter() - t0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    return out


def name_of(caption: str, first: bool) -> str:
    text = caption.strip().rstrip(".")
    if not first and text[:1].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    return text


def target_for(captions: list[str]) -> str:
    names = [name_of(c, i == 0) for i, c in enumerate(captions)]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return body[:1].upper() + body[1:] + "."


def make_example(lm, items, vecs, idx: list[int], with_captions: bool, question: str):
    captions = [items[i]["caption"] for i in idx]
    prompt = lm.build_prompt(question, captions if with_captions else [])
    answer = lm.tokenizer.encode(target_for(captions)) + [lm.tokenizer.eos_id]
    return prompt, answer, vecs[idx]


def batch_tensors(examples, max_len: int, pad: int):
    """Right-padded (x, y, prefix, prefix_mask, pad_mask); y is -100 outside the answers."""
    import torch

    seqs, starts = [], []
    for prompt, answer, _ in examples:
        seq = (prompt + answer)[: max_len + 1]
        seqs.append(seq)
        starts.append(len(prompt))
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    pos = torch.arange(t - 1)[None, :]
    lengths = torch.tensor([len(s) - 1 for s in seqs])[:, None]
    pad_mask = pos < lengths  # (B, T) real input tokens
    # loss on the answer only: target positions >= len(prompt) - 1, and not padding
    y[(pos < torch.tensor(starts)[:, None] - 1) | ~pad_mask] = -100
    p = max(1, max(len(e[2]) for e in examples))
    prefix = torch.zeros(len(examples), p, examples[0][2].shape[1])
    mask = torch.zeros(len(examples), p, dtype=torch.bool)
    for i, (_, _, v) in enumerate(examples):
        prefix[i, : len(v)] = torch.from_numpy(v)
        mask[i, : len(v)] = True
    return x, y, prefix, mask, pad_mask


def sample_example(lm, items, vecs, train_idx: list[int], rng: random.Random, max_len: int):
    """One training example (1-3 items; captions in context half the time, 20% captions without vectors)."""
    while True:
        idx = rng.sample(train_idx, rng.choice([1, 1, 2, 3]))
        ex = make_example(lm, items, vecs, idx, rng.random() < 0.5, rng.choice(QUESTIONS))
        if rng.random() < 0.2:  # captions only, as when the serving embedder's vectors do not fit
            ex = (
                lm.build_prompt(rng.choice(QUESTIONS), [items[i]["caption"] for i in idx]),
                ex[1],
                ex[2][:0],
            )
        if len(ex[0]) + len(ex[1]) <= max_len + 1:  # the few longer ones would lose their answer
            return ex


def length_batches(examples: list, batch: int, rng: random.Random) -> list[list]:
    """Examples sorted by length and cut into batches (in random order): little padding per batch."""
    examples = sorted(examples, key=lambda e: len(e[0]) + len(e[1]))
    batches = [examples[i : i + batch] for i in range(0, len(examples), batch)]
    rng.shuffle(batches)
    return batches


def lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    p, r = pred.lower().replace(".", " ").split(), ref.lower().replace(".", " ").split()
    if not p or not r:
        return 0.0
    n = lcs(p, r)
    if n == 0:
        return 0.0
    prec, rec = n / len(p), n / len(r)
    return 2 * prec * rec / (prec + rec)


def evaluate(lm, items, vecs, test_idx: list[int], n: int, seed: int) -> dict[str, float]:
    from index.types import Hit, Item
    from service.generation import ExtractiveGenerator

    rng = random.Random(seed)
    sets = [rng.sample(test_idx, rng.choice([1, 1, 2, 3])) for _ in range(n)]
    ext = ExtractiveGenerator()
    scores: dict[str, list[float]] = {
        k: [] for k in ("ctx_rouge", "ctx_exact", "vec_rouge", "vec_exact", "ext_rouge")
    }
    for idx in sets:
        ref = target_for([items[i]["caption"] for i in idx])
        for mode in ("ctx", "vec"):
            prompt, _, pre = make_example(lm, items, vecs, idx, mode == "ctx", QUESTIONS[0])
            out = "".join(lm.generate(prompt, pre, max_new_tokens=64, temperature=0.0)).strip()
            scores[f"{mode}_rouge"].append(rouge_l(out, ref))
            scores[f"{mode}_exact"].append(float(out == ref))
        hits = [
            Hit(
                id=i,
                score=1.0,
                item=Item(
                    id=i, modality=items[i]["modality"], uri="", sha256="", caption=items[i]["caption"]
                ),
            )
            for i in idx
        ]
        scores["ext_rouge"].append(rouge_l(ext.compose(QUESTIONS[0], hits), ref))
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="embedder giving the prefix vectors")
    p.add_argument("--config", default="lm_fast", help="LM config name or JSON")
    p.add_argument("--manifest", type=Path, default=None, help="item manifest (default: the demo corpus)")
    p.add_argument("--out", type=Path, default=Path("mm/checkpoints/lm"))
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval", type=int, default=150, help="test examples evaluated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--vectors", type=Path, default=None, help="precomputed item vectors (.npy), skips encoding"
    )
    p.add_argument("--init", type=Path, default=None, help="initial weights: a checkpoint of the same config")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.manifest = args.manifest or default_manifest()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from mm.lm import GroundedLM, resolve_lm, save_lm
    from mm.model import default_model_name

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_name = default_model_name() if args.model == "default" else args.model
    items = load_items(args.manifest, args.seed)
    if args.vectors is not None:  # precomputed (N, M) vectors of the same item list (same manifest and seed)
        vecs = np.load(args.vectors)
        if len(vecs) != len(items):
            raise ValueError(f"--vectors holds {len(vecs)} rows for {len(items)} items")
    else:
        vecs = encode_items(items, model_name, cache_dir("lm"))
    train_idx = [i for i, it in enumerate(items) if it["split"] == "train"]
    test_idx = [i for i, it in enumerate(items) if it["split"] == "test"]
    log.info(
        "%d items (%d train, %d test), vectors %s from %s",
        len(items),
        len(train_idx),
        len(test_idx),
        vecs.shape,
        model_name,
    )

    cfg, _ = resolve_lm(args.config)
    cfg = dataclasses.replace(cfg, embed_dim=vecs.shape[1], name=f"{cfg.name}-{model_name}")
    lm = GroundedLM(cfg)
    if args.init is not None:  # continue a run: its config must match this one
        from mm.lm import load_lm

        lm.load_state_dict(load_lm(args.init).state_dict())
        log.info("initial weights from %s", args.init)
    n_params = sum(p.numel() for p in lm.parameters())
    log.info("LM %s: %.2f M parameters", cfg.name, n_params / 1e6)
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "train_log.jsonl").open("w")
    budget = args.minutes * 60
    t0 = time.perf_counter()
    step, ema = 0, None
    queue: list[list] = []
    warmup = 50
    while time.perf_counter() - t0 < budget:
        frac = (time.perf_counter() - t0) / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        if not queue:  # a pool of `pool` batches, bucketed by length
            pool = [
                sample_example(lm, items, vecs, train_idx, rng, cfg.max_len) for _ in range(args.batch * 8)
            ]
            queue = length_batches(pool, args.batch, rng)
        x, y, prefix, mask, pad_mask = batch_tensors(queue.pop(), cfg.max_len, lm.tokenizer.pad_id)
        lm.train()
        out = lm(x, prefix, mask, pad_mask=pad_mask)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, cfg.vocab), y.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        lm.update_moe_biases()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0:
            rec = {
                "step": step,
                "loss": round(ema, 4),
                "lr": round(lr, 6),
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            log.info("%s", rec)
    train_s = time.perf_counter() - t0
    lm.eval()
    save_lm(lm, args.out, dtype=torch.bfloat16)
    # evaluate the weights as shipped (bf16 round trip)
    from mm.lm import load_lm

    shipped = load_lm(args.out)
    metrics = evaluate(shipped, items, vecs, test_idx, args.eval, args.seed + 1)
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    result = {
        "embedder": model_name,
        "config": cfg.name,
        "params_m": round(n_params / 1e6, 3),
        "checkpoint_mb": round(size_mb, 2),
        "steps": step,
        "train_s": round(train_s, 1),
        "final_loss": round(ema or 0.0, 4),
        "test_examples": args.eval,
        **metrics,
    }
    log_file.write(json.dumps({"final": result}) + "\n")
    log_file.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
