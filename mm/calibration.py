"""Score calibration: one monotone map per (query modality, item modality) from raw cosine to P(relevant).

Raw cosine scores are not comparable across modality pairs: the default model's text->audio scores run
higher than its text->image scores, so a mixed ranking by raw score lists every sound before any picture.
Platt scaling (Platt 1999) fits ``P(relevant | s) = sigmoid(a * s + b)`` per pair on the validation split,
where "relevant" is the evaluation's own notion (same row or same concept label). Ranking a mixed result
list by that probability interleaves modalities by how likely each hit is to be right, and the same
probability gives a threshold for "no good match".

The fitted map is stored next to the checkpoint as ``calibration.json``; a model without one calibrates
to the raw score (identity), which keeps search working and says so through :attr:`Calibration.fitted`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mm.atomic import atomic_write_text
from mm.config import MODALITIES
from mm.evaluate import galleries, relevance

log = logging.getLogger(__name__)

FILE_NAME = "calibration.json"
VERSION = 1
KEEP_MATCHES = 0.9  # share of validation queries whose best relevant hit must clear the no-match threshold


@dataclass(frozen=True)
class PairFit:
    """``P = sigmoid(a * raw + b)`` for one (query, item) modality pair, fitted on ``n_pos`` / ``n`` pairs."""

    a: float
    b: float
    n: int = 0  # (query, item) pairs the fit saw
    n_pos: int = 0  # of them relevant

    def __call__(self, raw: np.ndarray | float) -> np.ndarray:
        z = self.a * np.asarray(raw, dtype=np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


@dataclass(frozen=True)
class Calibration:
    """Per-pair maps plus the no-match threshold, both on the calibrated (probability) scale."""

    pairs: dict[str, PairFit] = field(default_factory=dict)  # "text->image" -> fit
    lexical: PairFit | None = None  # BM25 of a word match -> P(relevant) (fitted by the service layer)
    threshold: float | None = None  # calibrated score under which a best hit is "no good match"
    split: str = ""  # where it was fitted

    @property
    def fitted(self) -> bool:
        return bool(self.pairs)

    def score(self, query_modality: str, item_modality: str, raw: np.ndarray | float) -> np.ndarray:
        """Calibrated scores in [0, 1] (the raw score, unchanged, for a pair without a fit)."""
        fit = self.pairs.get(f"{query_modality}->{item_modality}")
        if fit is None:
            return np.asarray(raw, dtype=np.float64)
        return fit(raw)

    def is_match(self, calibrated: float) -> bool:
        """Whether a calibrated score clears the no-match threshold (always true without a threshold)."""
        return self.threshold is None or calibrated >= self.threshold

    # persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "method": "platt",
            "split": self.split,
            "threshold": self.threshold,
            "pairs": {k: _fit_dict(f) for k, f in self.pairs.items()},
            "lexical": None if self.lexical is None else _fit_dict(self.lexical),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("version") != VERSION or data.get("method") != "platt":
            raise ValueError(f"unsupported calibration (version {data.get('version')!r}): refit it")
        pairs = {}
        for key, f in data.get("pairs", {}).items():
            src, _, dst = key.partition("->")
            if src not in MODALITIES or dst not in MODALITIES:
                raise ValueError(f"calibration pair {key!r} is not 'modality->modality'")
            pairs[key] = _read_fit(key, f)
        thr = data.get("threshold")
        lex = data.get("lexical")
        lexical = None if lex is None else _read_fit("lexical", lex)
        return cls(pairs, lexical, None if thr is None else float(thr), str(data.get("split", "")))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def load_dir(cls, directory: str | Path | None) -> Calibration:
        """The calibration stored in a checkpoint directory, or the identity when it has none."""
        if directory is None or not (Path(directory) / FILE_NAME).is_file():
            return cls()
        return cls.load(Path(directory) / FILE_NAME)


def _fit_dict(f: PairFit) -> dict[str, Any]:
    return {"a": f.a, "b": f.b, "n": f.n, "n_pos": f.n_pos}


def _read_fit(key: str, f: dict[str, Any]) -> PairFit:
    a, b = float(f["a"]), float(f["b"])
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"calibration pair {key!r} has non-finite parameters")
    return PairFit(a, b, int(f.get("n", 0)), int(f.get("n_pos", 0)))


def fit_platt(scores: np.ndarray, labels: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """Logistic regression of ``labels`` (0/1) on ``scores`` by Newton's method; returns (a, b).

    Platt's target smoothing (``(n_pos + 1) / (n_pos + 2)`` and ``1 / (n_neg + 2)``) keeps the fit finite
    when the classes separate.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs both relevant and irrelevant pairs")
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.stack([s, np.ones_like(s)], axis=1)  # (n, 2)
    w = np.array([0.0, math.log((n_pos + 1) / (n_neg + 1))])

    def loss(w: np.ndarray) -> float:  # cross-entropy against the smoothed targets
        z = x @ w
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    current = loss(w)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -60, 60)))
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0  # Newton with step halving: a plain Newton step can overshoot from a flat start
        while scale > 1e-6 and loss(w - scale * step) > current:
            scale /= 2
        w -= scale * step
        new = loss(w)
        if abs(current - new) < 1e-10 * max(1.0, abs(current)):
            break
        current = new
    return float(w[0]), float(w[1])


def fit_calibration(
    rows: Sequence[dict],
    encode: Callable[[str, list[str]], np.ndarray],
    split: str = "val",
    max_pairs: int = 2_000_000,
    seed: int = 0,
    common_prior: bool = True,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit one map per modality pair present in ``rows`` (every direction, same-modality included).

    ``encode(modality, keys) -> (n, E)`` normalised embeddings, as :func:`mm.evaluate.evaluate_rows`.
    Returns the calibration and a report (per pair: pairs seen, positives, fitted a and b).

    ``common_prior``: each pair's intercept is moved from its own base rate of relevant pairs to one
    shared rate (all pairs pooled): ``b' = b - logit(rate_pair) + logit(rate_all)``, the label-shift
    correction of a logistic model. Without it a pair whose validation gallery happens to hold many
    items per concept (a word recorded in 26 languages) gets a high prior, and its unrelated items
    outrank the other modalities' good ones in a mixed list; with it, pairs are ranked by how well the
    score separates relevant from irrelevant, which does not depend on the validation gallery's make-up.
    """
    keys, row_idx = galleries(rows)
    use_labels = any(label is not None for _, label in row_idx)
    present = [m for m in MODALITIES if keys[m]]
    emb = {m: encode(m, keys[m]) for m in present}
    rng = np.random.default_rng(seed)
    pairs: dict[str, PairFit] = {}
    # per query: (pair, raw score of its best relevant item, raw score of its best irrelevant item)
    best: list[tuple[str, float, float]] = []
    report: dict[str, Any] = {}
    for src in present:
        for dst in present:
            rel = relevance(row_idx, src, dst, len(keys[src]), use_labels)
            qi = [i for i, r in enumerate(rel) if r - ({i} if src == dst else set())]
            if not qi:
                continue
            scores = emb[src][qi] @ emb[dst].T  # (n, m)
            labels = np.zeros(scores.shape, dtype=bool)
            keep = np.ones(scores.shape, dtype=bool)
            for row, i in enumerate(qi):
                labels[row, list(rel[i])] = True
                if src == dst:  # a query never calibrates against itself
                    keep[row, i] = False
                    labels[row, i] = False
            for row in range(len(qi)):
                pos = scores[row][labels[row] & keep[row]]
                neg = scores[row][~labels[row] & keep[row]]
                if len(pos) and len(neg):
                    best.append((f"{src}->{dst}", float(pos.max()), float(neg.max())))
            s, y = scores[keep], labels[keep]
            if len(s) > max_pairs:  # subsample negatives uniformly, keep every positive
                neg = np.flatnonzero(~y)
                drop = rng.choice(neg, size=len(s) - max_pairs, replace=False) if len(neg) > max_pairs else []
                mask = np.ones(len(s), dtype=bool)
                mask[drop] = False
                s, y = s[mask], y[mask]
            if y.all() or not y.any():
                continue
            a, b = fit_platt(s, y)
            name = f"{src}->{dst}"
            pairs[name] = PairFit(a, b, int(len(s)), int(y.sum()))
            report[name] = {
                "a": round(a, 4),
                "b": round(b, 4),
                "pairs": int(len(s)),
                "positives": int(y.sum()),
            }
            log.info("calibration %s: a=%.3f b=%.3f on %d pairs (%d relevant)", name, a, b, len(s), y.sum())
    if common_prior and pairs:
        pooled = sum(f.n_pos for f in pairs.values()) / sum(f.n for f in pairs.values())
        for name, f in pairs.items():
            b = f.b - _logit(f.n_pos / f.n) + _logit(pooled)
            pairs[name] = PairFit(f.a, b, f.n, f.n_pos)
            report[name]["b"] = round(b, 4)
        report["common_prior"] = round(pooled, 6)
    threshold, balanced = no_match_threshold(
        np.array([float(pairs[p](pos)) for p, pos, _ in best if p in pairs]),
        np.array([float(pairs[p](neg)) for p, _, neg in best if p in pairs]),
    )
    report["threshold"] = threshold
    report["threshold_rates"] = balanced
    return Calibration(pairs, None, threshold, split), report


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def no_match_threshold(
    match: np.ndarray, no_match: np.ndarray
) -> tuple[float | None, dict[str, float] | None]:
    """The calibrated score that best separates a query's best relevant hit from a no-match query's best.

    ``match[i]`` is query i's best relevant item, ``no_match[i]`` its best irrelevant one: the top score it
    would get if its concept were missing from the collection. The threshold is the highest one that still
    keeps ``KEEP_MATCHES`` of the matches (saying "no good match" over a real match costs the user more than
    showing a weak list); returns (threshold, {kept, flagged, balanced} rates on these queries).
    """
    if len(match) == 0:
        return None, None
    candidates = np.unique(np.concatenate([match, no_match]))
    kept = 1.0 - np.searchsorted(np.sort(match), candidates, side="left") / len(match)
    flagged = np.searchsorted(np.sort(no_match), candidates, side="left") / len(no_match)
    balanced = (kept + flagged) / 2
    best = int(np.flatnonzero(kept >= KEEP_MATCHES).max())
    rates = {"kept": float(kept[best]), "flagged": float(flagged[best]), "balanced": float(balanced[best])}
    return float(candidates[best]), {k: round(v, 4) for k, v in rates.items()}
