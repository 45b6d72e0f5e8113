"""Specs for the D-MoE layer (mm/moe.py): tiny dims, seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm.config import MoEConfig
from mm.moe import DMoE, MoEOutput, SwiGLU

D, E = 16, 8


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy machine thread barriers
    # make a loop of small forwards ~20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(seed: int = 0, **overrides) -> DMoE:
    base = dict(
        dim=D,
        n_experts=E,
        hidden=24,
        routing="topk",
        k=2,
        top_p=0.5,
        gate_hidden=8,
        shared_expert=False,
        collaboration=False,
        bias_update_gamma=1e-2,
        seq_balance_weight=0.0,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    return DMoE(MoEConfig(**base)).eval()


def test_topk_with_all_experts_equals_dense_softmax_mixture():
    moe = make(k=E)
    x = torch.randn(2, 5, D)
    out = moe(x)
    assert isinstance(out, MoEOutput)
    flat = x.reshape(-1, D)
    probs = moe.router(flat)  # (N, E)
    dense = sum(probs[:, e : e + 1] * moe.experts[e](flat) for e in range(E))
    torch.testing.assert_close(out.output.reshape(-1, D), dense, atol=1e-5, rtol=1e-5)
    assert out.stats.experts_per_token.item() == E
    assert out.aux_loss.item() == 0.0


def test_shared_expert_is_added_to_every_token():
    moe = make(shared_expert=True)
    x = torch.randn(1, 4, D)
    with_shared = moe(x).output
    shared = moe.shared(x)
    moe.shared = None
    torch.testing.assert_close(with_shared, moe(x).output + shared)


def test_topp_gives_flat_gates_more_experts_than_peaked():
    moe = make(routing="topp", k=6, top_p=0.6)
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        moe.router.proj.weight.mul_(0.0)  # uniform gate: needs ceil(0.6 * 8) = 5 experts
        moe.router.proj.bias.zero_()
    flat = moe(x).stats.experts_per_token.item()
    with torch.no_grad():
        moe.router.proj.weight.normal_(0, 50.0)  # near one-hot gate: one expert suffices
    peaked = moe(x).stats.experts_per_token.item()
    assert flat == pytest.approx(5.0)
    assert 1.0 <= peaked < 1.5
    assert peaked < flat


def test_topp_experts_per_token_within_bounds():
    moe = make(routing="topp", k=3, top_p=0.5)
    out = moe(torch.randn(4, 9, D))
    assert 1.0 <= out.stats.experts_per_token.item() <= 3.0
    assert out.stats.load.sum().item() == pytest.approx(1.0)


def test_bias_update_drives_skewed_router_maxvio_down():
    moe = make(k=2, bias_update_gamma=4e-3).train()
    with torch.no_grad():
        moe.router.proj.weight.mul_(4.0)  # spread the gate scores so the load reacts smoothly to the bias
        moe.router.proj.bias[:2] += 2.0  # experts 0 and 1 win almost every token
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(8, 128, D, generator=gen)
    start = moe.eval()(probe).stats.maxvio.item()
    moe.train()
    with torch.no_grad():
        for _ in range(150):
            moe(torch.randn(4, 64, D, generator=gen))
            moe.update_bias()
    end = moe.eval()(probe).stats.maxvio.item()
    assert start > 2.5  # experts 0 and 1 hold ~all of the load: MaxVio near E / k - 1 = 3
    assert end < 0.5
    assert moe.router.bias[:2].max() < moe.router.bias[2:].min()


def test_update_bias_uses_only_training_forwards_and_resets():
    moe = make()
    moe(torch.randn(1, 4, D))  # eval: not accumulated
    moe.update_bias()
    assert torch.count_nonzero(moe.router.bias) == 0
    moe.train()(torch.randn(1, 4, D))
    moe.update_bias()
    assert torch.count_nonzero(moe.router.bias) > 0
    assert moe._load_acc.sum() == 0


@pytest.mark.parametrize("collaboration", [False, True])
def test_padding_does_not_change_real_tokens_and_is_not_counted(collaboration):
    moe = make(collaboration=collaboration, shared_expert=True, seq_balance_weight=0.1)
    real = torch.randn(1, 5, D)
    padded = torch.cat([real, 100 * torch.randn(1, 3, D)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    ref = moe(real)
    out = moe(padded, mask)
    torch.testing.assert_close(out.output[:, :5], ref.output, atol=1e-6, rtol=1e-5)
    assert torch.all(out.output[:, 5:] == 0)
    torch.testing.assert_close(out.stats.load, ref.stats.load)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)


def test_all_padded_batch_gives_zeros():
    moe = make(routing="topp", k=3, collaboration=True, shared_expert=True, seq_balance_weight=0.1)
    out = moe(torch.randn(2, 3, D), torch.zeros(2, 3, dtype=torch.bool))
    assert out.output.shape == (2, 3, D) and torch.all(out.output == 0)
    assert out.stats.load.sum() == 0 and out.aux_loss.item() == 0


def test_bf16_autocast_forward_and_backward():
    moe = make(routing="topp", k=3, collaboration=True, shared_expert=True, seq_balance_weight=0.1).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(torch.randn(2, 5, D))
    assert out.output.shape == (2, 5, D) and torch.isfinite(out.output).all()
    (out.output.float().square().mean() + out.aux_loss).backward()
    assert moe.router.proj.weight.grad is not None


def test_gradient_reaches_router_and_experts():
    moe = make(seq_balance_weight=0.0).train()
    out = moe(torch.randn(2, 6, D))
    out.output.square().mean().backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0
    assert moe.router.features[0].weight.grad.abs().sum() > 0
    used = [e for e in range(E) if out.stats.load[e] > 0]
    assert used and all(moe.experts[e].w1.weight.grad.abs().sum() > 0 for e in used)
    assert moe.router.bias.grad is None and not moe.router.bias.requires_grad


def test_seq_balance_loss_is_positive_and_trains_router():
    moe = make(seq_balance_weight=1.0).train()
    out = moe(torch.randn(2, 6, D))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0


def test_collaboration_shapes_deterministic_and_starts_as_identity():
    moe = make(collaboration=True, routing="topp", k=3, top_p=0.7)
    plain = make(collaboration=False, routing="topp", k=3, top_p=0.7)
    plain.load_state_dict(moe.state_dict(), strict=False)
    x = torch.randn(2, 5, D)
    a, b = moe(x).output, moe(x).output
    assert a.shape == (2, 5, D)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, plain(x).output)  # zero-init output projection
    with torch.no_grad():
        moe.collab.o_proj.weight.normal_()
    c = moe(x).output
    assert c.shape == (2, 5, D) and torch.isfinite(c).all()
    assert not torch.allclose(c, a)
    c.sum().backward()
    assert moe.collab.q_token.weight.grad.abs().sum() > 0


def test_experts_are_linear_modules_for_lora():
    names = {n for n, m in make().named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"experts.0.w1", "experts.0.w2", "experts.0.w3", "router.proj"} <= names
    assert SwiGLU(D, 12)(torch.randn(3, 2, D)).shape == (3, 2, D)


def test_invalid_config_and_input_raise_value_error():
    cfg = MoEConfig(dim=D, n_experts=E, hidden=8, gate_hidden=8)
    with pytest.raises(ValueError, match="k must be"):
        DMoE(dataclasses.replace(cfg, k=E + 1))
    with pytest.raises(ValueError, match="top_p"):
        DMoE(dataclasses.replace(cfg, top_p=0.0))
    moe = DMoE(cfg)
    with pytest.raises(ValueError, match="shape"):
        moe(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="mask"):
        moe(torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("routing,collaboration", [("topk", False), ("topp", False), ("topp", True)])
def test_inference_fast_path_equals_autograd_path(routing, collaboration):
    # Without gradients the experts write into one buffer in place and slots are gathered one at a
    # time; the result must be the autograd path's, padding included.
    moe = make(routing=routing, k=3, top_p=0.6, collaboration=collaboration, shared_expert=True)
    if collaboration:
        torch.nn.init.normal_(moe.collab.o_proj.weight, std=0.1)  # not the identity start
    x = torch.randn(3, 9, moe.cfg.dim)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.enable_grad():
        ref = moe(x, mask).output
    with torch.inference_mode():
        fast = moe(x, mask)
    assert ref.requires_grad and not fast.output.requires_grad
    torch.testing.assert_close(fast.output, ref.detach(), atol=1e-5, rtol=1e-5)
    assert fast.output[1, 5:].abs().max() == 0


def test_swiglu_forward_into_matches_forward_and_falls_back_for_wrapped_layers():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 32).eval()
    x = torch.randn(5, 16)
    out = torch.empty(5, 16)
    with torch.no_grad():
        ffn.forward_into(x, out)
        torch.testing.assert_close(out, ffn(x))
        ffn.w2 = torch.nn.Sequential(ffn.w2)  # not a plain Linear (as under LoRA): ordinary forward
        out2 = torch.full((5, 16), float("nan"))
        ffn.forward_into(x, out2)
    torch.testing.assert_close(out2, out)
