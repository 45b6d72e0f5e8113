"""Cross-modal retrieval metrics over a manifest split: Recall@1/5/10 and mean rank per direction.

Each modality's gallery is the set of unique items of that modality in the split. A gallery item is
relevant to a query when it shares a row (group) with it, or, when rows carry a ``label``, when its
label matches the query's (class-level retrieval).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from mm.config import MODALITIES

KS = (1, 5, 10)


def recall_metrics(q: np.ndarray, g: np.ndarray, relevant: Sequence[set[int]]) -> dict[str, float]:
    """q (n, E) queries, g (m, E) gallery, both normalised; relevant[i] = gallery indices for query i."""
    scores = q @ g.T  # (n, m)
    order = np.argsort(-scores, axis=1, kind="stable")
    first = np.empty(len(q), dtype=np.int64)
    for i, rel in enumerate(relevant):
        hit = np.isin(order[i], list(rel))
        first[i] = int(np.argmax(hit)) + 1 if hit.any() else g.shape[0] + 1
    out = {f"R@{k}": float(np.mean(first <= k)) for k in KS}
    out["mean_rank"] = float(first.mean())
    out["n"] = len(q)
    return out


def chance_metrics(relevant: Sequence[set[int]], gallery_size: int) -> dict[str, float]:
    """Expected Recall@k of a random ranking (hypergeometric: P(at least one relevant in top k))."""
    out: dict[str, float] = {}
    for k in KS:
        vals = []
        for rel in relevant:
            r, m = len(rel), gallery_size
            miss = 1.0
            for j in range(min(k, m)):
                miss *= max(m - r - j, 0) / (m - j)
            vals.append(1.0 - miss)
        out[f"R@{k}"] = float(np.mean(vals))
    out["mean_rank"] = float(np.mean([(gallery_size + 1) / (len(r) + 1) for r in relevant]))
    out["n"] = len(relevant)
    return out


def galleries(rows: Sequence[dict]) -> tuple[dict[str, list[str]], list[tuple[dict[str, int], str | None]]]:
    """Unique item keys per modality and, per row, its item index per modality and its label."""
    items: dict[str, dict[str, int]] = {m: {} for m in MODALITIES}
    row_idx: list[tuple[dict[str, int], str | None]] = []
    for r in rows:
        idx = {}
        for m in MODALITIES:
            if r.get(m) is not None:
                idx[m] = items[m].setdefault(str(r[m]), len(items[m]))
        row_idx.append((idx, r.get("label")))
    return {m: list(d) for m, d in items.items()}, row_idx


def relevance(row_idx, src: str, dst: str, n_src: int, use_labels: bool) -> list[set[int]]:
    rel: list[set[int]] = [set() for _ in range(n_src)]
    by_label: dict[str, set[int]] = defaultdict(set)
    src_labels: dict[int, set[str]] = defaultdict(set)
    for idx, label in row_idx:
        if dst in idx and label is not None:
            by_label[label].add(idx[dst])
        if src in idx and dst in idx:
            rel[idx[src]].add(idx[dst])
        if src in idx and label is not None:
            src_labels[idx[src]].add(label)
    if use_labels:
        for i, labels in src_labels.items():
            for lab in labels:
                rel[i] |= by_label[lab]
    return rel


def evaluate_rows(
    rows: Sequence[dict],
    encode: Callable[[str, list[str]], np.ndarray],
    directions: Sequence[tuple[str, str]] | None = None,
    with_chance: bool = False,
) -> dict[str, dict[str, float]]:
    """Metrics for every direction the rows support. ``encode(modality, keys) -> (n, E)``."""
    keys, row_idx = galleries(rows)
    use_labels = any(label is not None for _, label in row_idx)
    present = [m for m in MODALITIES if keys[m]]
    if directions is None:
        directions = [(a, b) for a, b in itertools.permutations(present, 2)]
    emb = {m: encode(m, keys[m]) for m in present}
    out: dict[str, dict[str, float]] = {}
    for src, dst in directions:
        rel = relevance(row_idx, src, dst, len(keys[src]), use_labels)
        qi = [i for i, r in enumerate(rel) if r]
        if not qi:
            continue
        name = f"{src}->{dst}"
        out[name] = recall_metrics(emb[src][qi], emb[dst], [rel[i] for i in qi])
        if with_chance:
            out[name]["chance"] = chance_metrics([rel[i] for i in qi], len(keys[dst]))
    return out


def mixed_gallery_metrics(
    rows: Sequence[dict],
    encode: Callable[[str, list[str]], np.ndarray],
    calibrate: Callable[[str, str, np.ndarray], np.ndarray] | None = None,
    query: str = "text",
    k: int = 10,
    k_absent: int = 3,
) -> dict[str, float]:
    """One ranking over images and sounds together, as a mixed search returns it.

    ``both_at_10``: of the ``query`` queries whose concept has both an image and a sound in the gallery,
    the share whose top ``k`` holds a relevant image and a relevant sound. ``sound_when_absent_at_3`` (the
    counterweight, lower is better): of the queries whose concept has no sound, the share with any sound
    in the top ``k_absent``; blindly alternating modalities cannot pass both. ``calibrate(src, dst, raw)``
    maps raw scores before merging (None: raw scores).
    """
    keys, row_idx = galleries(rows)
    use_labels = any(label is not None for _, label in row_idx)
    if not (keys[query] and keys["image"] and keys["audio"]):
        return {}
    q = encode(query, keys[query])
    scores, is_audio, rel = [], [], []
    for dst in ("image", "audio"):
        raw = q @ encode(dst, keys[dst]).T  # (n, m_dst)
        scores.append(calibrate(query, dst, raw) if calibrate else raw)
        is_audio.append(np.full(raw.shape[1], dst == "audio"))
        rel.append(relevance(row_idx, query, dst, len(keys[query]), use_labels))
    merged = np.concatenate(scores, axis=1)  # (n, m_image + m_audio)
    audio = np.concatenate(is_audio)
    n_img = len(keys["image"])
    both, absent = [], []
    for i in range(len(q)):
        rel_img, rel_aud = rel[0][i], rel[1][i]
        if not rel_img:
            continue
        order = np.argsort(-merged[i], kind="stable")
        if rel_aud:
            top = order[:k]
            has_img = any(j < n_img and j in rel_img for j in top)
            has_aud = any(j >= n_img and (j - n_img) in rel_aud for j in top)
            both.append(has_img and has_aud)
        else:
            absent.append(bool(audio[order[:k_absent]].any()))
    return {
        f"both_at_{k}": float(np.mean(both)) if both else float("nan"),
        "n_both": len(both),
        f"sound_when_absent_at_{k_absent}": float(np.mean(absent)) if absent else float("nan"),
        "n_absent": len(absent),
    }
