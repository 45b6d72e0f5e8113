"""LoRA / QLoRA: merged equals unmerged, only adapters learn, adapter files round trip, CLI, re-embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from mm.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from mm.int4 import Int4Linear
from mm.lora import LoraSpec, apply_lora, lora_layers, merge_lora
from mm.model import create_model

TEXTS = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]


def _adapted(base_ckpt, spec: LoraSpec):
    """The base with adapters whose B is random (peft starts B at zero, which would hide any bug)."""
    emb = create_model(base_ckpt)
    base_id = emb.model_id
    modules, quantized = apply_lora(emb.model, spec)
    torch.manual_seed(1)
    for layer in lora_layers(emb.model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    emb.weights_changed()
    return emb, base_id, modules, quantized


@pytest.mark.parametrize("qlora", [False, True])
def test_merged_equals_unmerged(base_ckpt, qlora):
    spec = LoraSpec(r=4, alpha=8, experts=True, qlora=qlora, group_size=32)
    emb, _, modules, quantized = _adapted(base_ckpt, spec)
    assert any(".experts.3.w2" in m for m in modules) and any(m.endswith("attn.v_proj") for m in modules)
    if qlora:
        assert quantized and isinstance(emb.model.get_submodule(modules[0]).base_layer, Int4Linear)
    before = emb.encode_text(TEXTS)
    base = create_model(base_ckpt).encode_text(TEXTS)
    assert np.abs(before - base).max() > 1e-3  # the adapters do change the function
    assert merge_lora(emb.model) == len(modules)
    assert not lora_layers(emb.model)
    assert not any(isinstance(m, Int4Linear) for m in emb.model.modules())
    np.testing.assert_allclose(emb.encode_text(TEXTS), before, atol=1e-5)


def test_only_adapter_parameters_get_gradients(base_ckpt):
    emb, *_ = _adapted(base_ckpt, LoraSpec(r=2, alpha=4, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    model = emb.model.train()
    z = model.encode_batch("text", model.encoders["text"].prepare(TEXTS))  # (B, E)
    (z @ z.T).logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and grads == trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_A." in n)


@pytest.mark.parametrize("qlora", [False, True])
def test_adapter_save_load_roundtrip(base_ckpt, tmp_path, qlora):
    spec = LoraSpec(r=4, alpha=16, experts=qlora, qlora=qlora, group_size=32)
    emb, base_id, modules, quantized = _adapted(base_ckpt, spec)
    want = emb.encode_text(TEXTS)
    save_adapter(
        emb.model, spec, tmp_path, base_model=str(base_ckpt), base_model_id=base_id, quantized=quantized
    )
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert (meta["r"], meta["alpha"], meta["qlora"]) == (4, 16.0, qlora)
    assert meta["modules"] == sorted(modules) and meta["base_model_id"] == base_id
    adapter_bytes = (tmp_path / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < 0.2 * (base_ckpt / "model.safetensors").stat().st_size
    unmerged = load_adapter(create_model(base_ckpt), tmp_path, merge=False)
    np.testing.assert_allclose(unmerged.encode_text(TEXTS), want, atol=1e-6)
    merged = load_adapter(create_model(base_ckpt), tmp_path, merge=True)
    assert not lora_layers(merged.model)
    np.testing.assert_allclose(merged.encode_text(TEXTS), want, atol=1e-5)
    assert merged.model_id != create_model(base_ckpt).model_id


def test_bad_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="targets"):
        LoraSpec(targets=("query",))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(r=0)


def _manifest(root):
    rows = []
    for i, word in enumerate(("low", "mid", "high", "buzz", "hum", "beep")):
        t = np.arange(4000) / 16000
        sf.write(
            root / f"{word}.wav", (0.4 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), 16000
        )
        rows.append({"id": word, "audio": f"{word}.wav", "text": f"a {word} tone", "split": "train"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def test_cli_finetune_merge_and_reembed(base_ckpt, tmp_path, capsys):
    from index.collection import Collection
    from index.ingest import add_text
    from service.cli import main
    from service.reembed import reembed

    manifest = _manifest(tmp_path)
    adapter = tmp_path / "adapter"
    argv = ["finetune", "--manifest", str(manifest), "--model", str(base_ckpt), "--out", str(adapter)]
    argv += ["--lora-r", "4", "--max-steps", "3", "--batch-size", "6", "--qlora", "--group-size", "32"]
    assert main([*argv, "--no-bf16", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 3 and 0 < report["trainable_pct"] < 5 and report["int4_modules"] > 0
    assert (adapter / ADAPTER_WEIGHTS).exists() and (adapter / ADAPTER_CONFIG).exists()

    merged_dir = tmp_path / "merged"
    assert main(["finetune", "merge", "--adapter", str(adapter), "--out", str(merged_dir)]) == 0
    merged = create_model(merged_dir)
    with_adapter = load_adapter(create_model(base_ckpt), adapter)
    np.testing.assert_allclose(merged.encode_text(TEXTS), with_adapter.encode_text(TEXTS), atol=1e-6)
    assert main(["finetune", "merge", "--out", str(tmp_path / "x")]) == 2  # no --adapter

    base = create_model(base_ckpt)
    coll = Collection.create(tmp_path / "coll", dim=base.dim, embedder_id=base.model_id)
    ids = [add_text(coll, base, t).id for t in TEXTS[:3]]
    report = reembed(coll, with_adapter, adapter=adapter)
    assert (report.reembedded, report.failed) == (3, 0)
    assert coll.embedder_id == with_adapter.model_id != base.model_id
    assert coll.get_meta("adapter")["path"] == str(adapter.resolve())
    coll.close()
    coll = Collection.open(tmp_path / "coll")  # the new id and vectors persist
    assert coll.embedder_id == with_adapter.model_id
    hits = coll.search(with_adapter.encode_text(TEXTS[:3]), k=1)
    assert [h[0].id for h in hits] == ids and all(h[0].score > 0.999 for h in hits)
    coll.close()
    # the CLI path: back to the base model, no adapter
    argv = ["index", "--reembed", "--collection", str(tmp_path / "coll"), "--model", str(base_ckpt), "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reembedded"] == 3
    with Collection.open(tmp_path / "coll") as coll:
        assert coll.embedder_id == base.model_id and coll.get_meta("adapter") is None


def test_finetune_leaves_the_routers_balancing_biases_to_the_base(base_ckpt, tmp_path):
    """The MoE routers' balancing biases belong to the frozen base (``Trainer.balance_experts`` is off for
    a fine-tune, no monkeypatching): the adapter trains around the base's, while full training moves them."""
    from mm.finetune import LoraTrainer
    from mm.train import TrainConfig, Trainer

    def biases(model) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("router.bias")}

    common = {"manifest": str(_manifest(tmp_path)), "model": str(base_ckpt), "max_steps": 1}
    common |= {"batch_size": 6, "warmup_steps": 1, "bf16": False, "progress": False}
    tuner = LoraTrainer(TrainConfig(out_dir=str(tmp_path / "adapter"), **common), LoraSpec(r=4))
    base = biases(tuner.model)
    tuner.train()
    tuned = biases(tuner.model)
    assert base and tuned.keys() == base.keys()
    assert all(torch.equal(tuned[n], b) for n, b in base.items())
    full = Trainer(TrainConfig(out_dir=str(tmp_path / "full"), **common))
    full.train()
    trained = biases(full.model)
    assert any(not torch.equal(trained[n], b) for n, b in base.items())  # so the check above can fail
