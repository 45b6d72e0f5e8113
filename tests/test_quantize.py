"""INT8 dynamic / INT4 weight-only quantization: exact packing, closeness to fp32, checkpoints, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mm.checkpoint import QUANT_FILE
from mm.int4 import Int4Linear, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from mm.model import create_model
from mm.quantize import Int8Linear, QuantSpec, full_range_exact, quantize_model, select_linears
from mm.quantize_checkpoint import save_quantized

TEXTS = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]


def _inputs():
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    clips = [(0.1 * rng.standard_normal(8000).astype(np.float32), 16000) for _ in range(3)]
    return {"text": TEXTS, "image": images, "audio": clips}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).mean())  # rows are L2-normalised


def test_int4_pack_unpack_roundtrip_exact():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # weights that the format represents exactly come back exactly
    scale = torch.full((5, 2), 2.0**-6, dtype=torch.float16)
    zero = torch.full((5, 2), 8, dtype=torch.uint8)
    q[:, 0], q[:, 32], q[:, 1], q[:, 33] = 0, 0, 15, 15  # every group spans the full code range
    w = dequantize_int4(pack_int4(q), scale, zero, 32)
    p2, s2, z2 = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(p2, s2, z2, 32), w)
    assert torch.equal(unpack_int4(p2), q)


def test_int4_error_is_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(16, 128) * 0.05
    packed, scale, zero = quantize_int4(w, 64)
    err = (dequantize_int4(packed, scale, zero, 64) - w).abs().reshape(16, 2, 64).amax(-1)
    assert (err <= scale.float() * 0.5 + 1e-6).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(w, 48)


def test_int8_linear_matches_fp32_and_fallback():
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 7, 64)
    ref = lin(x)
    y = q(x)
    assert y.shape == (3, 7, 32)
    assert torch.nn.functional.cosine_similarity(y.flatten(0, 1), ref.flatten(0, 1)).min() > 0.999
    q._kernel = False  # the dequantising path gives the same function
    assert torch.allclose(q(x), y, atol=0.05 * ref.abs().max().item())


def test_select_skips_routers_and_gates():
    model = create_model("tiny").model
    names = select_linears(model, QuantSpec(mode="int8"))
    assert any(n.endswith("attn.q_proj") for n in names)
    assert any(".experts.0.w1" in n for n in names)
    assert not any(".router." in n or ".gate." in n for n in names)
    with pytest.raises(ValueError, match="group size"):
        QuantSpec(mode="int4", group_size=48)


def test_exclude_patterns_keep_layers_fp32_and_round_trip():
    model = create_model("tiny").model
    spec = QuantSpec(mode="int8", exclude=("*.experts.*", "in_proj.*"))
    names = select_linears(model, spec)
    assert names and not any(".experts." in n or n.startswith("in_proj.") for n in names)
    assert any(n.endswith("attn.q_proj") for n in names)
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_int8_full_range_activations_when_exact():
    """8-bit activations are used only where the kernel accumulates them exactly, and are then closer."""
    torch.manual_seed(3)
    lin = nn.Linear(256, 64)
    x = torch.randn(64, 256) * 3
    ref = lin(x)
    q = Int8Linear.from_linear(lin)
    y = q(x)
    assert torch.nn.functional.cosine_similarity(y, ref).min() > 0.999
    if not full_range_exact():
        pytest.skip("this CPU's int8 kernel saturates 8-bit activations: 7-bit (reduce_range) is used")
    from mm.qengine import linear_engine

    y7 = torch.ops.quantized.linear_dynamic(x, q._pack(linear_engine(len(x))), True)
    assert (y - ref).abs().mean() < 0.75 * (y7 - ref).abs().mean()


def test_int8_linear_picks_its_engine_by_rows_and_engines_agree():
    # oneDNN (where available) for many rows, the default engine for few: both give the same answer.
    from mm.qengine import ONEDNN_MIN_ROWS, default_engine, linear_engine, onednn_available

    torch.manual_seed(5)
    lin = nn.Linear(128, 32)
    q = Int8Linear.from_linear(lin)
    few, many = torch.randn(8, 128), torch.randn(ONEDNN_MIN_ROWS, 128)
    assert linear_engine(len(few)) == default_engine()
    assert linear_engine(len(many)) == ("onednn" if onednn_available() else default_engine())
    y_few, y_many = q(few), q(many)
    assert set(q._packed) == {linear_engine(len(few)), linear_engine(len(many))}
    for x, y in ((few, y_few), (many, y_many)):
        assert torch.nn.functional.cosine_similarity(y, lin(x)).min() > 0.999
    both = q(torch.cat([few, many]))  # many rows: one engine for all; the few rows agree with their own call
    torch.testing.assert_close(both[: len(few)], y_few, rtol=0, atol=0.05 * y_few.abs().max().item())


@pytest.mark.parametrize(("mode", "min_cos"), [("int8", 0.99), ("int4", 0.95)])
def test_quantized_checkpoint_close_to_fp32_and_loads(base_ckpt, tmp_path, mode, min_cos):
    fp32 = create_model(base_ckpt)
    inputs = _inputs()
    ref = {m: fp32.encode(m, x) for m, x in inputs.items()}
    emb = create_model(base_ckpt)
    spec = quantize_model(emb.model, QuantSpec(mode=mode, group_size=32))
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert spec.modules and all(isinstance(emb.model.get_submodule(n), kind) for n in spec.modules)
    got = {m: emb.encode(m, x) for m, x in inputs.items()}
    for m in inputs:
        assert _cosine(got[m], ref[m]) > min_cos, (mode, m)
    out = save_quantized(emb.model, spec, tmp_path / mode)
    assert json.loads((out / QUANT_FILE).read_text())["mode"] == mode
    loaded = create_model(out)
    assert isinstance(loaded.model.get_submodule(spec.modules[0]), kind)
    # int4 stores the unquantized tensors (norms, biases, routers, the audio stem) in float16
    atol = 1e-6 if mode == "int8" else 2e-3
    for m, x in inputs.items():
        np.testing.assert_allclose(loaded.encode(m, x), got[m], atol=atol)
    from safetensors.torch import load_file

    dtypes = {k: v.dtype for k, v in load_file(out / "model.safetensors").items()}
    residual = torch.float16 if mode == "int4" else torch.float32
    assert dtypes["encoders.audio.proj.weight"] == residual
    assert loaded.model.encoders["audio"].proj.weight.dtype == torch.float32  # upcast on load
    assert loaded.model_id != fp32.model_id
    assert (out / "model.safetensors").stat().st_size < (base_ckpt / "model.safetensors").stat().st_size
    # the quantized layers themselves: int8 ~ 1/4 of fp32, int4 ~ 1/6 (codes + fp16 scales + zeros)
    q_bytes = sum(t.nbytes for n in spec.modules for t in emb.model.get_submodule(n).state_dict().values())
    f_bytes = sum(t.nbytes for n in spec.modules for t in fp32.model.get_submodule(n).state_dict().values())
    assert q_bytes < (0.3 if mode == "int8" else 0.2) * f_bytes


def test_cli_quantize_roundtrip(base_ckpt, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "q4"
    rc = main(
        ["quantize", "--model", str(base_ckpt), "--mode", "int4", "--group-size", "32", "--out", str(out)]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mode"] == "int4" and report["modules"] > 0 and report["size_mb"] > 0
    emb = create_model(out)
    assert emb.encode_text(TEXTS).shape == (len(TEXTS), emb.dim)
    assert main(["quantize", "--model", str(out), "--mode", "int8", "--out", str(tmp_path / "again")]) == 1
