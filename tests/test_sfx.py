"""Sound-effects encoder: a tiny random aisfx-format checkpoint loads into our CNN and gives aisfx's own
EmbeddingNet output; the packaged checkpoint loads with matching keys; the frontend's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm.encoders import sfx as S

WIDTH = 4  # tiny: 4-8-16-32 channels


def _tiny_checkpoint(path, seed: int = 0):
    """``torch.save((state_dict, datasets))`` as aisfx stores it (numpy ints in the datasets dict)."""
    torch.manual_seed(seed)
    net = S.SFXNet(WIDTH)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    state = {f"embedding_net.{k}": v for k, v in net.state_dict().items()}
    state["fc.0.0.weight"] = torch.zeros(16, 32)  # classifier heads: present in the file, ignored
    torch.save((state, {"prosfx": (np.int64(0), 78)}), path)
    return state


def test_tiny_checkpoint_matches_aisfx_embedding_net(tmp_path):
    cnn2d = pytest.importorskip("aisfx.models.cnn2d", reason=f"reference code needs {S.INSTALL_HINT}")
    state = _tiny_checkpoint(tmp_path / "checkpoint.pth")
    enc = S.SFXAudioEncoder(pretrained=tmp_path / "checkpoint.pth")
    assert (
        enc.out_dim == 8 * WIDTH
        and enc.frozen
        and enc.weights_info == {"file": str(tmp_path / "checkpoint.pth")}
    )
    ref = cnn2d.EmbeddingNet("max", 3, 1, WIDTH).eval()
    ref.load_state_dict(
        {k[len("embedding_net.") :]: v for k, v in state.items() if k.startswith("embedding_net.")}
    )
    spec = torch.rand(2, S.BLOCK_FRAMES, S.N_MELS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(spec)  # (2, 32): one aisfx embedding per block
    out = enc({"spec": spec, "frame_mask": torch.ones(2, S.BLOCK_FRAMES, dtype=torch.bool)})
    assert out.tokens.shape == (2, 12, 32) and out.mask.all()  # 100 frames -> 50 -> 25 -> 12 steps
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)


def test_prepare_pads_to_a_block_and_masks(tmp_path):
    _tiny_checkpoint(tmp_path / "c.pth")
    enc = S.SFXAudioEncoder(pretrained=tmp_path / "c.pth")
    rng = np.random.default_rng(0)
    short = (rng.standard_normal(S.SAMPLE_RATE // 2).astype(np.float32), S.SAMPLE_RATE)  # 0.5 s
    long = (rng.standard_normal(4 * S.SAMPLE_RATE).astype(np.float32), S.SAMPLE_RATE)  # 4 s: 173 frames
    batch = enc.prepare([short, long])
    assert batch["spec"].shape == (2, 173, S.N_MELS)
    assert batch["frame_mask"].sum(1).tolist() == [S.BLOCK_FRAMES, 173]
    out = enc(batch)
    assert out.tokens.shape == (2, 21, 32) and out.mask.sum(1).tolist() == [12, 21]
    alone = enc(enc.prepare([short]))  # the batch's padding does not change the short clip's tokens
    torch.testing.assert_close(out.tokens[0, :12], alone.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)


def test_frontend_is_peak_normalised():
    t = torch.arange(S.SAMPLE_RATE) / S.SAMPLE_RATE
    wave = torch.sin(2 * torch.pi * 1000 * t)
    a, b = S.sfx_log_mel(wave), S.sfx_log_mel(0.01 * wave)
    assert a.shape == (S.SAMPLE_RATE // S.HOP + 1, S.N_MELS)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # float32 rounding of the scaled wave
    assert a.min() >= 0 and 0.3 < a.max() <= 1.0
    band = a[10].argmax().item()  # 1 kHz lands in one band, near HTK mel(1000) / mel(22050) * 96
    assert abs(band - 96 * 1000.0 / 3923.0) <= 2
    torch.testing.assert_close(S._mel_filters().sum(0), torch.ones(S.N_MELS))
    assert torch.equal(S.sfx_log_mel(torch.zeros(4096)), torch.zeros(5, S.N_MELS))


def test_wrong_checkpoints_are_refused(tmp_path):
    torch.save(({"conv.weight": torch.zeros(1)}, {}), tmp_path / "x.pth")
    with pytest.raises(ValueError, match="embedding_net"):
        S.load_sfx_net(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError):
        S.load_sfx_net(tmp_path / "missing.pth")


def test_packaged_checkpoint_loads_with_matching_keys():
    path = S.WEIGHTS.path("checkpoint.pth")  # sha256-checked; make setup installs aisfx: no skip
    state = S._load_checkpoint(path)
    ours = S.SFXNet(64).state_dict()
    theirs = {k[len("embedding_net.") :] for k in state if k.startswith("embedding_net.")}
    assert theirs == set(ours)
    enc = S.SFXAudioEncoder()
    assert enc.out_dim == 512 and enc.weights_info["sha256"] == S.WEIGHTS.sha256
    out = enc(
        enc.prepare(
            [(np.random.default_rng(0).standard_normal(S.SAMPLE_RATE).astype(np.float32), S.SAMPLE_RATE)]
        )
    )
    assert out.pooled.shape == (1, 512) and torch.isfinite(out.pooled).all() and out.pooled.abs().sum() > 0
