"""Contrastive training of the shared space from a JSONL manifest of groups.

Each row carries any two or three of ``text``/``image``/``audio`` (see docs/manifest.md). The loss is
symmetric InfoNCE over every modality pair present in a batch (``mm.losses``), with a learnable
temperature, the MoE's small sequence-wise balance loss, and DeepSeek-V3's aux-loss-free bias update
after every optimizer step. bf16 autocast on CPU, gradient accumulation, frozen-encoder features cached
once, checkpoints + resume, a progress bar and JSONL metrics.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mm.atomic import atomic_write
from mm.backbone import l2_normalize
from mm.config import MODALITIES
from mm.evaluate import evaluate_rows
from mm.features import FeatureCache
from mm.losses import multi_pair_loss
from mm.model import MultimodalEmbedder, MultimodalModel, create_model, save_model

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    manifest: str  # JSONL manifest of groups
    out_dir: str  # checkpoint directory (config.json, model.safetensors, train_log.jsonl, trainer state)
    model: str = "small"  # config name, checkpoint name or directory to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # nested ModelConfig overrides
    epochs: int = 10
    max_steps: int | None = None  # total optimizer steps; when set, epochs is ignored
    batch_size: int = 128  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    bf16: bool = True  # autocast the backbone in bfloat16 on CPU
    seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    eval_every: int = 0  # optimizer steps between validation runs (0: once per epoch)
    ckpt_every: int = 100  # optimizer steps between checkpoints
    max_rows: int | None = None  # cap on training rows (quick runs)
    num_threads: int | None = None
    cache_dir: str | None = None  # frozen-encoder feature cache (default: <out_dir>/cache)
    progress: bool = True
    # Regularisation and extra pairs (see docs/results.md for what each did on the validation split):
    backbone_lr_scale: float = 1.0  # lr multiplier for the token path (in_proj, backbone, out_proj)
    pooled_drop: float = 0.0  # per-sample probability of dropping the pooled residual (model.embed)
    fill_views: tuple[str, ...] = ()  # views a row lacks, borrowed per batch from a same-label train row
    # The pooled linear path trains as a linear probe with its own contrastive loss, and the main loss sees
    # it detached: the backbone learns a residual on top of the probe instead of co-adapting with it.
    pooled_probe: bool = False
    # How often each training row of a source is seen per epoch, by the manifest's `source` field (1.0
    # for a source not named): 0.4 shows 40% of that source's rows each epoch (a fresh draw every epoch),
    # 2.0 shows each row twice. Lets one large source (CLDR's emoji names: half the grown corpus) stop
    # crowding out the small ones that carry sounds.
    source_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int
    epochs: float
    final_loss: float
    val: dict[str, dict[str, float]]
    seconds: float
    out_dir: str


def load_rows(manifest: str | Path, split: str | None) -> list[dict]:
    from mm.data import read_manifest

    rows = read_manifest(manifest)
    return [r for r in rows if split is None or r.get("split") == split]


def _keys(rows: Sequence[dict], m: str) -> list[str]:
    return [str(r[m]) for r in rows if r.get(m) is not None]


class Trainer:
    # Whether each optimizer step also nudges the MoE routers' balancing biases (DeepSeek-V3's
    # aux-loss-free balance). A full training run does; a fine-tune that freezes the base does not.
    balance_experts: bool = True

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        _seed(cfg.seed)
        self.rows = load_rows(cfg.manifest, cfg.train_split)
        if cfg.max_rows:
            self.rows = self.rows[: cfg.max_rows]
        if len(self.rows) < 2:
            raise ValueError(
                f"{cfg.manifest} has {len(self.rows)} rows in split {cfg.train_split!r}; need >= 2"
            )
        self.val_rows = load_rows(cfg.manifest, cfg.val_split) if cfg.val_split else []
        resume = (self.out / STATE_FILE).exists()
        start = str(self.out) if resume else cfg.model
        self.embedder = create_model(start, overrides=None if resume else cfg.overrides, seed=cfg.seed)
        self.model: MultimodalModel = self.embedder.model
        mods = [m for m in MODALITIES if m in self.model.encoders and _keys(self.rows, m)]
        self.caches = {
            m: FeatureCache(
                self.model.encoders[m],
                m,
                # the rate the encoder reads (44.1 kHz with the sfx tower), not only the log-mel's
                sample_rate=getattr(self.model.encoders[m], "sample_rate", self.model.cfg.audio.sample_rate),
                crop_seconds=self.model.cfg.audio.max_seconds,
            )
            for m in mods
        }
        self.view_pool = _view_pool(self.rows, tuple(cfg.fill_views))
        if cfg.pooled_probe and not hasattr(self.model, "pooled_proj"):
            raise ValueError("pooled_probe needs a model with the pooled residual (residual_pooled=True)")
        self.fill_rng = np.random.default_rng(cfg.seed + 1)
        self.row_weights = _row_weights(self.rows, cfg.source_weights)
        labels = [r.get("label") or r.get("id") or str(i) for i, r in enumerate(self.rows)]
        lookup = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
        self.labels = torch.tensor([lookup[lab] for lab in labels])
        self.opt = torch.optim.AdamW(_param_groups(self.model, cfg), lr=cfg.lr)
        per_epoch = len(self.rows) if self.row_weights is None else float(self.row_weights.sum())
        self.steps_per_epoch = max(1, int(per_epoch) // (cfg.batch_size * cfg.grad_accum))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.step = 0
        if resume:
            state = torch.load(self.out / STATE_FILE, weights_only=False)
            self.opt.load_state_dict(state["optimizer"])
            self.step = state["step"]
            _set_rng(state["rng"])
            log.info("resumed from %s at step %d", self.out, self.step)

    def _lr(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        frac = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def _epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch's row indices, shuffled: each row ``floor(w)`` times plus once more with
        probability ``w - floor(w)`` under its source weight ``w`` (every row once without weights)."""
        n = len(self.rows)
        if self.row_weights is None:
            return rng.permutation(n)
        whole = np.floor(self.row_weights)
        reps = whole.astype(np.int64) + (rng.random(n) < self.row_weights - whole)
        return rng.permutation(np.repeat(np.arange(n), reps))

    def _fill(self, row: dict) -> dict:
        """The row with each missing ``fill_views`` view borrowed from a random same-label train row."""
        extra = {}
        for m, pool in self.view_pool.items():
            keys = pool.get(row.get("label") or "")
            if row.get(m) is None and keys:
                extra[m] = keys[int(self.fill_rng.integers(len(keys)))]
        return {**row, **extra} if extra else row

    def _micro_batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [self._fill(self.rows[i]) for i in idx]
        emb: dict[str, torch.Tensor] = {}
        probe: dict[str, torch.Tensor] = {}
        present: dict[str, torch.Tensor] = {}
        aux = torch.zeros(())
        for m, cache in self.caches.items():
            has = torch.tensor([r.get(m) is not None and str(r[m]) in cache.items for r in rows])
            if int(has.sum()) == 0:
                continue
            keys = [str(r[m]) for r, h in zip(rows, has, strict=True) if h]
            feats = cache.batch(keys)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
                z, out = self.model.embed(m, feats, self.cfg.pooled_drop, self.cfg.pooled_probe)  # (n_m, E)
            emb[m], present[m] = _scatter(z, has), has
            if self.cfg.pooled_probe:
                probe[m] = _scatter(l2_normalize(self.model.pooled_proj[m](feats.pooled.float())), has)
            if out is not None:
                aux = aux + out.aux_loss.float()
        labels = self.labels[list(idx)]
        loss, logs = multi_pair_loss(emb, present, self.model.logit_scale, labels)
        if probe:
            probe_loss, _ = multi_pair_loss(probe, present, self.model.logit_scale, labels)
            loss, logs = loss + probe_loss, {**logs, "probe": float(probe_loss.detach())}
        return loss + aux, {**logs, "aux": float(aux.detach())}

    def cache_path(self, modality: str) -> Path:
        """Where a modality's cache lives: keyed by the encoder config, so ablations share it."""
        cache_dir = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
        return cache_dir / f"{modality}-{_digest(getattr(self.model.cfg, modality))}.pt"

    def fill_caches(self) -> None:
        for m, cache in self.caches.items():
            path = self.cache_path(m)
            loaded = cache.load(path)
            keys = [
                k
                for k in dict.fromkeys(_keys(self.rows, m) + _keys(self.val_rows, m))
                if k not in cache.items and k not in cache.failed
            ]
            chunk = 1024  # save as we go: an interrupted run keeps what it computed
            for start in range(0, len(keys), chunk):
                cache.fill(keys[start : start + chunk], progress=self.cfg.progress)
                cache.save(path)
            log.info("%s cache: %d items (%d loaded from disk)", m, len(cache.items), loaded)

    def cache_rows(self, rows: Sequence[dict]) -> None:
        """Add ``rows``' items (e.g. the test split) to the frozen-feature caches on disk, so the next run
        sharing the cache directory finds them there."""
        for m, cache in self.caches.items():
            before = len(cache.items)
            cache.fill(_keys(rows, m))
            if len(cache.items) > before:
                cache.save(self.cache_path(m))

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        c = self.cfg
        t0 = time.perf_counter()
        self.fill_caches()
        rng = np.random.default_rng(c.seed + self.step)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not c.progress)
        loss_val = float("nan")
        val: dict[str, dict[str, float]] = {}
        logf = (self.out / LOG_FILE).open("a")
        order = self._epoch_order(rng)
        pos = 0
        while self.step < self.total_steps:
            self.opt.zero_grad(set_to_none=True)
            logs: dict[str, float] = {}
            for _ in range(c.grad_accum):
                if pos + c.batch_size > len(order):
                    order, pos = self._epoch_order(rng), 0
                idx = order[pos : pos + c.batch_size].tolist()
                pos += c.batch_size
                loss, logs = self._micro_batch(idx)
                (loss / c.grad_accum).backward()
            for g in self.opt.param_groups:
                g["lr"] = self._lr(self.step) * g.get("lr_scale", 1.0)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100.0))
            if self.balance_experts and hasattr(self.model, "backbone"):
                self.model.backbone.update_moe_biases()
            self.step += 1
            loss_val = float(loss.detach())
            rec = {
                "step": self.step,
                "loss": loss_val,
                "lr": self._lr(self.step - 1),
                "temperature": float(1 / self.model.logit_scale.detach().exp()),
                **logs,
            }
            every = c.eval_every or self.steps_per_epoch
            if self.val_rows and (self.step % every == 0 or self.step == self.total_steps):
                val = self.evaluate(self.val_rows)
                rec["val"] = val
                self.model.train()
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{loss_val:.3f}")
            bar.update(1)
            if self.step % c.ckpt_every == 0 or self.step == self.total_steps:
                self.save()
        bar.close()
        logf.close()
        self.save()
        return TrainResult(
            self.step,
            self.step / self.steps_per_epoch,
            loss_val,
            val,
            time.perf_counter() - t0,
            str(self.out),
        )

    @torch.inference_mode()
    def evaluate(self, rows: Sequence[dict]) -> dict[str, dict[str, float]]:
        self.model.eval()

        def encode(m: str, keys: list[str]) -> np.ndarray:
            cache = self.caches.get(m)
            if cache is None:
                return self.embedder.encode(m, keys)
            cache.fill(keys)
            out = np.zeros((len(keys), self.model.cfg.embed_dim), dtype=np.float32)
            for s in range(0, len(keys), 64):
                ks = keys[s : s + 64]
                ok = [k for k in ks if k in cache.items]
                if ok:
                    z = self.model.embed(m, cache.batch(ok))[0].float().numpy()
                    for k, v in zip(ok, z, strict=True):
                        out[s + ks.index(k)] = v
            return out

        return evaluate_rows(rows, encode)

    def save(self) -> None:
        save_model(self.model, self.out)
        state = {
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "rng": _get_rng(),
            "train_config": asdict(self.cfg),
        }
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).train()


def load_trained(out_dir: str | Path) -> MultimodalEmbedder:
    return create_model(str(out_dir))


TOKEN_PATH = ("in_proj.", "backbone.", "out_proj.")  # parameter prefixes of the backbone path


def _scatter(z: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """(n, E) embeddings of the rows where ``has`` (B,) is True -> (B, E), zeros elsewhere."""
    full = torch.zeros(len(has), z.shape[1])
    full[has] = z.float()
    return full


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors do not; the token path's lr is scaled by backbone_lr_scale."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith(TOKEN_PATH), p.ndim >= 2), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": cfg.backbone_lr_scale if token else 1.0,
        }
        for (token, decay), ps in sorted(groups.items())
    ]


def _row_weights(rows: Sequence[dict], weights: dict[str, float]) -> np.ndarray | None:
    """Per-row epoch weights from ``TrainConfig.source_weights`` (None when no source is weighted)."""
    if not weights:
        return None
    sources = {str(r.get("source")) for r in rows}
    unknown = sorted(set(weights) - sources)
    if unknown:  # a recipe's weights meet corpora without some of its sources (the demo corpus): say so
        log.warning("source_weights: no training rows from %s (sources here: %s)", unknown, sorted(sources))
    for name, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"source weight for {name!r} must be a finite number >= 0, got {w!r}")
    out = np.array([float(weights.get(str(r.get("source")), 1.0)) for r in rows])
    if out.sum() < 1:
        raise ValueError("source_weights leave no training rows")
    return out


def _view_pool(rows: Sequence[dict], views: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """Per view, label -> the distinct keys of that view among ``rows`` (rows without a label skipped)."""
    pool: dict[str, dict[str, list[str]]] = {}
    for m in views:
        if m not in MODALITIES:
            raise ValueError(f"fill_views names {m!r}; expected some of {MODALITIES}")
        by_label: dict[str, dict[str, None]] = {}
        for r in rows:
            if r.get("label") and r.get(m) is not None:
                by_label.setdefault(r["label"], {})[str(r[m])] = None
        pool[m] = {lab: list(keys) for lab, keys in by_label.items()}
    return pool


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(asdict(obj), sort_keys=True).encode()).hexdigest()[:10]


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _get_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
