"""AAM (mm/attention.py): equivalences with full attention and a dense masked reference, padding, gate."""

from __future__ import annotations

import warnings

import pytest
import torch

from mm.attention import (
    AdaptiveAttention,
    FullAttention,
    band_block_mask,
    dense_reference,
    local_chunked,
    local_flex,
)
from mm.config import AttentionConfig

D, H = 32, 4


def make(impl: str = "chunked", **kw) -> AdaptiveAttention:
    torch.manual_seed(0)
    cfg = AttentionConfig(
        dim=D, n_heads=H, window=kw.pop("window", 8), n_global=kw.pop("n_global", 3), impl=impl, **kw
    )
    return AdaptiveAttention(cfg).eval()


def full_like(attn: AdaptiveAttention) -> FullAttention:
    full = FullAttention(attn.cfg).eval()
    missing, unexpected = full.load_state_dict(attn.state_dict(), strict=False)
    assert not missing  # q/k/v/o carry over; the gate and global tokens are AAM-only
    return full


def padded_batch(t: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, t, D, generator=torch.Generator().manual_seed(t))
    pad = torch.ones(3, t, dtype=torch.bool)
    pad[1, t // 2 :] = False  # right padding
    pad[2, :5] = False  # left padding
    return x, pad


@pytest.mark.parametrize("use_pad", [False, True])
def test_wide_window_local_only_equals_full_attention(use_pad):
    t = 37
    attn = make(window=2 * t)
    x, pad = padded_batch(t)
    pad = pad if use_pad else None
    with torch.no_grad():
        out = attn(x, pad, mix=1.0).output
        ref = full_like(attn)(x, pad).output
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("gate", ["sequence", "token"])
@pytest.mark.parametrize("mix", [None, 0.0, 1.0, 0.3])
def test_matches_dense_band_plus_global_reference(gate, mix):
    attn = make(gate=gate, window=8)  # block 16: T = 37 is not a multiple of it
    x, pad = padded_batch(37)
    with torch.no_grad():
        out = attn(x, pad, mix=mix).output
        ref = dense_reference(attn, x, pad, mix=mix)
    assert out.shape == (3, 37, D)
    assert torch.allclose(out, ref, atol=1e-4)


def test_no_global_tokens_and_subset_rows_of_reference():
    attn = make(n_global=0, window=5)
    x, pad = padded_batch(23)
    rows = torch.tensor([0, 7, 22])
    with torch.no_grad():
        out = attn(x, pad).output
        ref = dense_reference(attn, x, pad, rows=rows)
    assert torch.allclose(out[:, rows], ref, atol=1e-4)


def test_local_path_ignores_tokens_outside_the_window():
    attn = make(window=6)  # sees +-3
    x = torch.randn(1, 30, D)
    y = x.clone()
    y[0, 20] += 5.0
    with torch.no_grad():
        a, b = attn(x, mix=1.0).output, attn(y, mix=1.0).output
    changed = (a - b).abs().amax(-1)[0] > 1e-6  # (T,)
    assert changed.nonzero().flatten().tolist() == list(range(17, 24))


@pytest.mark.parametrize("gate", ["sequence", "token"])
def test_padding_does_not_change_real_tokens(gate):
    attn = make(gate=gate)
    x = torch.randn(2, 20, D)
    garbage = torch.cat([x, 100 * torch.randn(2, 9, D)], dim=1)
    pad = torch.ones(2, 29, dtype=torch.bool)
    pad[:, 20:] = False
    with torch.no_grad():
        short = attn(x)
        long = attn(garbage, pad)
    assert torch.allclose(short.output, long.output[:, :20], atol=1e-5)
    assert torch.all(long.output[:, 20:] == 0)
    gate_long = long.gate if gate == "sequence" else long.gate[:, :20]
    assert torch.allclose(short.gate, gate_long, atol=1e-6)


def test_gate_shapes_and_range():
    x, pad = padded_batch(11)
    seq = make(gate="sequence")(x, pad).gate
    tok = make(gate="token")(x, pad).gate
    assert seq.shape == (3,) and tok.shape == (3, 11)
    assert torch.all((seq > 0) & (seq < 1)) and torch.all((tok > 0) & (tok < 1))
    assert full_like(make())(x, pad).gate.tolist() == [1.0, 1.0, 1.0]


def test_gate_varies_with_length_and_statistics():
    attn = make()
    gen = torch.Generator().manual_seed(1)
    calm = torch.randn(1, 6, D, generator=gen) * 0.1
    busy = torch.randn(1, 60, D, generator=gen) * 3.0 + 1.0
    with torch.no_grad():
        g_calm, g_busy = attn(calm).gate.item(), attn(busy).gate.item()
        g_calm_long = attn(calm.repeat(1, 10, 1)).gate.item()  # same statistics, 10x the length
    assert abs(g_calm - g_busy) > 1e-3
    assert abs(g_calm - g_calm_long) > 1e-4


@pytest.mark.parametrize("gate", ["sequence", "token"])
def test_gradients_reach_every_parameter(gate):
    attn = make(gate=gate).train()
    x, pad = padded_batch(19)
    x.requires_grad_(True)
    attn(x, pad).output.square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_fully_padded_sequence_gives_zeros_not_nan():
    attn = make().train()
    x = torch.randn(2, 13, D, requires_grad=True)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, :4] = True
    out = attn(x, pad)
    assert torch.isfinite(out.output).all() and torch.isfinite(out.gate).all()
    assert torch.all(out.output[0] == 0) and torch.all(out.output[1, 4:] == 0)
    out.output.sum().backward()
    assert torch.isfinite(x.grad).all()
    full = full_like(make())(x, pad).output
    assert torch.isfinite(full).all()


@pytest.mark.parametrize("gate", ["sequence", "token"])
def test_single_token(gate):
    attn = make(gate=gate)
    x = torch.randn(2, 1, D)
    with torch.no_grad():
        out = attn(x)
        ref = dense_reference(attn, x)
    assert out.output.shape == (2, 1, D)
    assert torch.allclose(out.output, ref, atol=1e-5)
    assert torch.allclose(attn(x, mix=1.0).output, full_like(attn)(x).output, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    attn = make()
    with pytest.raises(ValueError, match="mix"):
        attn(torch.randn(1, 4, D), mix=1.5)
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        attn(torch.randn(1, 4, D + 1))
    with pytest.raises(ValueError, match="pad_mask"):
        attn(torch.randn(1, 4, D), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        AdaptiveAttention(AttentionConfig(dim=30, n_heads=4))


def test_auto_uses_chunked_on_cpu():
    assert make("auto").kernel_for(torch.randn(1, 8192, D)) == "chunked"


def test_projections_are_named_for_lora():
    names = {n for n, m in make().named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names


def test_flex_block_mask_matches_the_band():
    from torch.nn.attention.flex_attention import create_block_mask

    t, w2 = 300, 40
    valid = torch.ones(2, t, dtype=torch.bool)

    def mask_mod(b, h, qi, ki):
        return ((qi - ki).abs() <= w2) & (valid[b, ki] | (qi == ki))

    def blocks(bm):  # (partial, full) block grids as dense (B, 1, Nq, Nk) 0/1
        grids = []
        for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
            used = (torch.arange(idx.shape[-1]) < num[..., None]).int()  # first num entries are live
            grids.append(torch.zeros_like(idx).scatter_add_(-1, idx.long(), used).clamp(max=1))
        return grids

    ours = blocks(band_block_mask(valid, w2))
    ref = blocks(create_block_mask(mask_mod, 2, None, t, t, device="cpu"))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))  # same partial and full blocks
    valid[1, 200:] = False  # with padding ours may keep a block whose pairs are all masked: a superset
    ours = band_block_mask(valid, w2).to_dense()
    ref = create_block_mask(mask_mod, 2, None, t, t, device="cpu").to_dense()
    assert torch.all(ours >= ref) and (ours - ref).sum() <= 1


def test_flex_kernel_matches_chunked_eager():
    """FlexAttention semantics without the compile: the eager (dense) flex path with our BlockMask."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (torch.randn(2, H, 150, 8) for _ in range(3))
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[0, 100:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        flex = flex_attention(q, k, v, block_mask=band_block_mask(valid, 10))
    chunked = local_chunked(q, k, v, valid, 10, 16)
    assert torch.allclose(flex, chunked, atol=1e-5)


@pytest.mark.slow  # compiling flex_attention on CPU takes about a minute
def test_compiled_flex_equals_full_attention_and_reference():
    # 40 and 150 tokens end in a partial block, which torch's compiled CPU kernel read past on AVX2-only
    # machines (wrong outputs, different on each call): a few calls, one with padding
    for t in (40, 150, 40):
        q, k, v = (torch.randn(2, H, t, 8) for _ in range(3))
        valid = torch.ones(2, t, dtype=torch.bool)
        valid[1, t // 2 :] = False
        assert torch.allclose(local_flex(q, k, v, valid, 5), local_chunked(q, k, v, valid, 5, 8), atol=1e-5)
    attn = make("flex", window=80)
    x, pad = padded_batch(40)
    with torch.no_grad():
        assert torch.allclose(attn(x, pad, mix=1.0).output, full_like(attn)(x, pad).output, atol=1e-5)
