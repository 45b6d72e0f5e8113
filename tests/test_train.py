"""A tiny contrastive run on synthetic paired data: the loss goes down and training pairs are found."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from mm.evaluate import chance_metrics, evaluate_rows, recall_metrics
from mm.train import TrainConfig, Trainer

COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
SHAPES = ("square", "circle", "stripe")


def make_corpus(root):
    rows = []
    for ci, (cname, rgb) in enumerate(COLORS.items()):
        for si, shape in enumerate(SHAPES):
            img = Image.new("RGB", (32, 32), "white")
            d = ImageDraw.Draw(img)
            if shape == "square":
                d.rectangle([6, 6, 26, 26], fill=rgb)
            elif shape == "circle":
                d.ellipse([4, 4, 28, 28], fill=rgb)
            else:
                d.rectangle([0, 12, 31, 20], fill=rgb)
            name = f"{cname}_{shape}"
            img.save(root / f"{name}.png")
            t = np.arange(8000) / 16000
            wave = 0.5 * np.sin(2 * np.pi * (200 + 150 * ci) * (1 + si) * t).astype(np.float32)
            sf.write(root / f"{name}.wav", wave, 16000)
            rows.append(
                {
                    "id": name,
                    "image": f"{name}.png",
                    "audio": f"{name}.wav",
                    "text": f"a {cname} {shape}",
                    "split": "train",
                }
            )
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def tiny_config(manifest, out_dir, **kw) -> TrainConfig:
    """A quiet fp32 run of the tiny model on the whole manifest (no validation split)."""
    quiet = dict(model="tiny", val_split="", progress=False, bf16=False)
    return TrainConfig(manifest=str(manifest), out_dir=str(out_dir), **quiet, **kw)


@pytest.mark.slow
def test_tiny_contrastive_run_learns_pairs(tmp_path):
    manifest = make_corpus(tmp_path)
    run = dict(epochs=1, max_steps=60, batch_size=12, lr=5e-3, warmup_steps=5, ckpt_every=1000)
    cfg = tiny_config(manifest, tmp_path / "run", **run)
    trainer = Trainer(cfg)
    before = trainer.evaluate(trainer.rows)
    result = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first = np.mean([r["loss"] for r in log[:10]])
    last = np.mean([r["loss"] for r in log[-10:]])
    assert last < 0.5 * first, (first, last)
    after = trainer.evaluate(trainer.rows)
    assert after["text->image"]["R@1"] >= 0.75, after
    assert after["image->text"]["R@1"] >= 0.75, after
    assert after["text->audio"]["R@5"] > before["text->audio"]["R@5"] or after["text->audio"]["R@5"] == 1.0
    assert result.steps == 60
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_resume_continues_from_checkpoint(tmp_path):
    manifest = make_corpus(tmp_path)
    base = dict(epochs=1, batch_size=6, lr=1e-3, warmup_steps=2, ckpt_every=3)
    Trainer(tiny_config(manifest, tmp_path / "run", **base, max_steps=3)).train()
    t2 = Trainer(tiny_config(manifest, tmp_path / "run", **base, max_steps=5))
    assert t2.step == 3
    assert t2.train().steps == 5
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_recall_metrics_and_chance():
    g = np.eye(4, dtype=np.float32)
    q = np.eye(4, dtype=np.float32)[[1, 0, 2, 3]]
    m = recall_metrics(q, g, [{0}, {1}, {2}, {3}])
    assert m["R@1"] == 0.5 and m["n"] == 4 and m["mean_rank"] == 1.5
    c = chance_metrics([{0}] * 3, 20)
    assert c["R@1"] == pytest.approx(0.05) and c["R@10"] == pytest.approx(0.5)


def test_label_relevance_counts_class_matches():
    rows = [
        {"image": "a.png", "text": "cat one", "label": "cat"},
        {"image": "b.png", "text": "cat two", "label": "cat"},
        {"image": "c.png", "text": "dog", "label": "dog"},
    ]
    vec = {
        "a.png": [1, 0],
        "b.png": [1, 0],
        "c.png": [0, 1],
        "cat one": [0.9, 0.1],
        "cat two": [0.8, 0.2],
        "dog": [0, 1],
    }

    def enc(m, keys):
        z = np.array([vec[k] for k in keys], dtype=np.float32)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    out = evaluate_rows(rows, enc)
    assert out["text->image"]["R@1"] == 1.0 and out["image->text"]["n"] == 3


def test_fill_views_borrows_same_label_views_and_lr_scale_groups(tmp_path):
    manifest = make_corpus(tmp_path)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["label"] = r["id"].split("_")[0]  # colour: 3 rows per label
        if i % 3:
            r["image"] = None  # only the first row of each colour keeps its image
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(
        manifest, tmp_path / "run", max_steps=2, batch_size=12, fill_views=("image",), backbone_lr_scale=0.1
    )
    trainer = Trainer(cfg)
    for r in trainer.rows:
        filled = trainer._fill(r)
        assert filled["image"] is not None
        assert filled["image"].endswith(f"{r['label']}_square.png")  # the label's only image
        assert filled["audio"] == r["audio"]
    scales = sorted({g["lr_scale"] for g in trainer.opt.param_groups})
    assert scales == [0.1, 1.0]
    trainer.train()
    token = [g for g in trainer.opt.param_groups if g["lr_scale"] == 0.1]
    other = [g for g in trainer.opt.param_groups if g["lr_scale"] == 1.0]
    assert token[0]["lr"] == pytest.approx(0.1 * other[0]["lr"])


def test_pooled_probe_trains_the_pooled_path_on_its_own_loss_only(tmp_path):
    # With pooled_probe the main loss sees the pooled residual detached: the pooled maps' gradient is
    # exactly the probe loss's, and the backbone path still gets the main loss's gradient.
    from mm.backbone import l2_normalize
    from mm.losses import multi_pair_loss

    manifest = make_corpus(tmp_path)
    trainer = Trainer(tiny_config(manifest, tmp_path / "run", max_steps=1, batch_size=12, pooled_probe=True))
    trainer.fill_caches()
    model, idx = trainer.model, list(range(12))
    loss, logs = trainer._micro_batch(idx)
    assert logs["probe"] > 0
    model.zero_grad()
    loss.backward()
    got = model.pooled_proj["image"].weight.grad.clone()
    assert model.out_proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    emb, present = {}, {}
    for m, cache in trainer.caches.items():
        has = torch.tensor([trainer.rows[i].get(m) is not None for i in idx])
        keys = [str(trainer.rows[i][m]) for i, h in zip(idx, has, strict=True) if h]
        z = l2_normalize(model.pooled_proj[m](cache.batch(keys).pooled.float()))
        emb[m] = torch.zeros(len(idx), z.shape[1]).index_put((has,), z)
        present[m] = has
    probe_loss = multi_pair_loss(emb, present, model.logit_scale, trainer.labels[idx])[0]
    assert float(probe_loss.detach()) == pytest.approx(logs["probe"], rel=1e-5)
    probe_loss.backward()
    torch.testing.assert_close(got, model.pooled_proj["image"].weight.grad, rtol=1e-4, atol=1e-7)
    no_pool = {"residual_pooled": False}
    with pytest.raises(ValueError, match="pooled_probe"):
        Trainer(tiny_config(manifest, tmp_path / "run2", pooled_probe=True, overrides=no_pool))


def test_source_weights_set_how_often_each_sources_rows_are_seen(tmp_path, caplog):
    manifest = make_corpus(tmp_path)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["source"] = "big" if i % 2 else "small"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(
        tiny_config(manifest, tmp_path / "run", max_steps=1, source_weights={"big": 0.5, "small": 2})
    )
    src = np.array([r["source"] for r in trainer.rows])
    rng = np.random.default_rng(0)
    seen = np.concatenate([trainer._epoch_order(rng) for _ in range(200)])
    per_row = np.bincount(seen, minlength=len(src)) / 200
    assert per_row[src == "small"] == pytest.approx(2.0)  # whole weights: every row exactly twice
    assert per_row[src == "big"].mean() == pytest.approx(0.5, abs=0.05)  # fractions: drawn afresh
    assert per_row[src == "big"].min() > 0 and per_row[src == "big"].max() < 1
    plain = Trainer(tiny_config(manifest, tmp_path / "plain", max_steps=1))
    assert sorted(plain._epoch_order(rng)) == list(range(len(src)))
    with caplog.at_level("WARNING", logger="mm.train"):
        Trainer(tiny_config(manifest, tmp_path / "absent", max_steps=1, source_weights={"nope": 2.0}))
    assert "no training rows from ['nope']" in caplog.text
    with pytest.raises(ValueError, match="leave no training rows"):
        Trainer(tiny_config(manifest, tmp_path / "none", max_steps=1, source_weights={"big": 0, "small": 0}))
    with pytest.raises(ValueError, match="finite"):
        Trainer(tiny_config(manifest, tmp_path / "bad2", max_steps=1, source_weights={"big": float("nan")}))
