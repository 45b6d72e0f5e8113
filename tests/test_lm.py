"""The grounded causal decoder (mm/lm.py): KV cache, windowed causality, sampling filters, stop strings."""

from __future__ import annotations

import pytest
import torch

from mm.lm import (
    CAUSAL,
    CausalWindowAttention,
    GroundedLM,
    KVCache,
    LMConfig,
    attention_mask,
    causal_window_mask,
    load_lm,
    resolve_lm,
    save_lm,
)
from mm.sampling import filter_logits, sample_next
from mm.stop_filter import StopFilter
from mm.tokenizer import BOS, ByteTokenizer


@pytest.fixture(scope="module")
def lm() -> GroundedLM:
    torch.manual_seed(0)
    cfg, _ = resolve_lm("lm_tiny")
    model = GroundedLM(cfg).eval()
    # Random init gives near-uniform logits; sharpen them so that greedy/sampling tests are meaningful.
    with torch.no_grad():
        model.tok_embed.weight.mul_(40.0)
        model.prefix_proj.weight.mul_(20.0)
    return model


def test_config_roundtrip(tmp_path):
    cfg, _ = resolve_lm("tiny")
    assert cfg.moe.dim == cfg.dim
    cfg.to_json(tmp_path / "c.json")
    assert LMConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown LMConfig keys"):
        LMConfig.from_dict({"width": 3})


def test_kv_cache_equals_full_recomputation(lm):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 24))  # longer than the window (16): the band is exercised
    prefix = torch.randn(2, 2, lm.cfg.embed_dim)
    full = lm(ids, prefix).logits  # (B, T, V)
    cache = KVCache(lm.cfg.depth)
    steps = [lm(ids[:, :5], prefix, cache=cache).logits]
    for i in range(5, ids.shape[1]):
        steps.append(lm(ids[:, i : i + 1], cache=cache).logits)
    inc = torch.cat(steps, dim=1)
    assert cache.length == lm.cfg.prefix_len + ids.shape[1]
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_window_mask_is_causal_with_sinks():
    m = causal_window_mask(0, 10, 10, window=3, n_sink=2, device=torch.device("cpu"))
    assert not m.triu(1).any()  # nothing from the future
    assert m[9, 0] and m[9, 1]  # sinks are always visible
    assert m[9, 7] and not m[9, 6]  # local window of 3: 7, 8, 9


def test_mask_shortcuts_equal_the_explicit_mask():
    torch.manual_seed(3)
    cfg = LMConfig(dim=16, heads=2, window=12, prefix_len=2)
    attn = CausalWindowAttention(cfg).eval()
    cpu = torch.device("cpu")
    x = torch.randn(2, 10, 16)
    assert attention_mask(0, 10, 12, 2, cpu) == CAUSAL  # prefill inside the window: plain causal
    explicit = attn(x, mask=causal_window_mask(0, 10, 10, 12, 2, cpu))
    torch.testing.assert_close(attn(x), explicit)
    cache = KVCache(1)
    attn(x[:, :9], cache)
    assert attention_mask(9, 1, 12, 2, cpu) is None  # one decode step that sees everything
    torch.testing.assert_close(attn(x[:, 9:], cache, start=9), explicit[:, 9:])
    assert isinstance(attention_mask(12, 1, 12, 2, cpu), torch.Tensor)  # past the window: banded


def test_pad_mask_and_last_only_keep_real_logits(lm):
    torch.manual_seed(4)
    ids = torch.randint(0, 256, (2, 12))
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, 7:] = False  # row 1: 7 real tokens, then padding
    full = lm(ids).logits
    masked = lm(ids, pad_mask=pad).logits
    torch.testing.assert_close(masked[0], full[0])
    torch.testing.assert_close(masked[1, :7], lm(ids[1:, :7]).logits[0])
    torch.testing.assert_close(lm(ids, last_only=True).logits, full[:, -1:])


def test_far_tokens_outside_window_do_not_matter(lm):
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (1, 80))
    other = ids.clone()
    other[0, 3] = (ids[0, 3] + 1) % 256  # changes positions within the window of token 3 only
    a, b = lm(ids).logits, lm(other).logits
    w = lm.cfg.window
    reach = 3 + lm.cfg.depth * w  # each layer extends the receptive field by one window
    torch.testing.assert_close(a[0, reach:], b[0, reach:])
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_greedy_is_deterministic_and_streams_pieces(lm):
    prompt = lm.build_prompt("what is this?", ["A frog."])
    a = list(lm.generate(prompt, None, max_new_tokens=12, temperature=0.0))
    b = list(lm.generate(prompt, None, max_new_tokens=12, temperature=0.0))
    assert a == b
    assert len(a) > 1  # several pieces, not one blob


def test_seeded_sampling_is_reproducible(lm):
    prompt = lm.build_prompt("hello")
    a = "".join(lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3))
    b = "".join(lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3))
    assert a == b


def test_stop_strings_stop_and_are_not_emitted(lm):
    prompt = lm.build_prompt("x")
    free = "".join(lm.generate(prompt, max_new_tokens=30, temperature=0.0))
    assert len(free) >= 6
    stop = free[3:5]
    cut = "".join(lm.generate(prompt, max_new_tokens=30, temperature=0.0, stop=[stop]))
    assert cut == free[: free.index(stop)]
    assert stop not in cut


def test_stop_filter_across_pieces():
    f = StopFilter(["END"])
    out = "".join(f.push(p) for p in ["ab", "cE", "N", "Dxyz"])
    assert out == "abc" and f.stopped and f.flush() == ""
    g = StopFilter(["END"])
    assert "".join(g.push(p) for p in ["abE", "Nx"]) + g.flush() == "abENx"


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [True, True, False, False]
    p = filter_logits(logits, top_p=0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert torch.isfinite(p).tolist() == [True, True, False, False]
    p1 = filter_logits(logits, top_p=0.1)
    assert torch.isfinite(p1).tolist() == [True, False, False, False]


def test_a_tiny_temperature_samples_the_most_likely_token():
    # 1e-38 is a valid temperature (> 0); unshifted, logits / 1e-38 overflow to inf and softmax is nan
    logits = torch.tensor([10.0, 30.0, 20.0, -10.0])  # 30 / 1e-38 is past float32's largest
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.1754943508222875e-38, 0, 1.0, gen) for _ in range(20)} == {1}
    assert sample_next(logits, 1e-38, 2, 0.9, gen) == 1
    assert sample_next(logits, 1.1125369292536007e-308, 0, 1.0, gen) == 1  # 0 as a float32


def test_sampling_respects_filters(lm):
    prompt = lm.build_prompt("q")
    ids = torch.tensor([prompt])
    logits = lm(ids).logits[0, -1]
    allowed = set(filter_logits(logits, top_k=3).isfinite().nonzero().flatten().tolist())
    tok = ByteTokenizer()
    for seed in range(8):
        piece = "".join(lm.generate(prompt, max_new_tokens=1, temperature=2.0, top_k=3, seed=seed))
        if piece:
            assert tok.encode(piece)[0] in allowed


def test_prefix_vectors_change_the_distribution(lm):
    ids = torch.tensor([[BOS] + list(b"Q: x\nA: ")])
    torch.manual_seed(4)
    a = lm(ids, torch.randn(1, 2, lm.cfg.embed_dim)).logits[0, -1].softmax(-1)
    b = lm(ids, torch.randn(1, 2, lm.cfg.embed_dim)).logits[0, -1].softmax(-1)
    assert (a - b).abs().sum() > 1e-3


def test_bad_arguments(lm):
    with pytest.raises(ValueError, match="temperature"):
        list(lm.generate([BOS], temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        list(lm.generate([BOS], top_p=0.0))
    with pytest.raises(ValueError, match="prefix"):
        lm(torch.tensor([[BOS]]), torch.randn(1, 5, lm.cfg.embed_dim))


def test_save_load_roundtrip(lm, tmp_path):
    save_lm(lm, tmp_path)
    again = load_lm(tmp_path)
    ids = torch.tensor([[BOS, 65, 66]])
    torch.testing.assert_close(again(ids).logits, lm(ids).logits)
