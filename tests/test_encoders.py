"""mm.encoders: shapes and masks of the scratch encoders, collation, freezing, and the packaged weights."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mm.config import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig
from mm.encoders import EncoderOutput, build_audio_encoder, build_image_encoder, build_text_encoder, collate

TINY_AUDIO = AudioEncoderConfig(
    dim=16, sample_rate=8000, n_mels=32, n_fft=256, hop=80, patch_time=4, patch_freq=8
)


def _check(out: EncoderOutput, b: int, t: int, c: int) -> None:
    assert out.tokens.shape == (b, t, c) and out.mask.shape == (b, t) and out.pooled.shape == (b, c)
    assert out.mask.dtype == torch.bool
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def _picture(w: int = 48, h: int = 32) -> Image.Image:
    img = Image.new("RGB", (w, h), (250, 250, 250))
    img.paste(Image.new("RGB", (w // 2, h // 2), (200, 40, 30)), (w // 4, h // 4))
    return img


# -------------------------------------------------------------------------------------------- text


def test_bpe_text_shapes_mask_and_collate():
    enc = build_text_encoder(TextEncoderConfig(kind="bpe", dim=32, max_len=12, layers=1))
    assert enc.out_dim == 32 and not enc.frozen
    batch = enc.prepare(["Hello World", "A much longer sentence that will be cut at twelve tokens for sure"])
    assert batch["input_ids"].shape == (2, 12)
    assert batch["mask"].sum(1).tolist() == [4, 12]  # <start> hello world <end>; the long one is cut
    assert torch.equal(enc.prepare(["HELLO world"])["input_ids"], batch["input_ids"][:1, :4])  # lower-cased
    out = enc(batch)
    _check(out, 2, 12, 32)
    # collate pads separately prepared items; padding must not change the real tokens' outputs
    joint = collate([enc.prepare(["Hello World"]), enc.prepare(["one two three four five six"])])
    assert joint["input_ids"].shape == (2, 8) and joint["mask"].sum(1).tolist() == [4, 8]
    alone = enc(enc.prepare(["Hello World"]))
    torch.testing.assert_close(enc(joint).tokens[0, :4], alone.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc(joint).pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)
    out.pooled.sum().backward()
    assert enc.embed.weight.grad is not None
    with pytest.raises(TypeError, match="list"):
        enc.prepare("not a list")


def test_minilm_is_offline_frozen_and_semantic():
    enc = build_text_encoder(TextEncoderConfig(kind="minilm", max_len=32))
    assert enc.out_dim == 384 and enc.frozen
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training  # frozen encoders stay in eval mode
    texts = [
        "A dog is running through the park.",
        "A puppy runs across the grass.",
        "The central bank raised interest rates.",
    ]
    out = enc(enc.prepare(texts))
    _check(out, 3, out.tokens.shape[1], 384)
    assert out.mask.sum(1).min() >= 5 and not out.pooled.requires_grad
    p = F.normalize(out.pooled, dim=-1)
    sim = p @ p.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


def _tiny_clip_config(tmp_path) -> str:
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 1},
    }
    path = tmp_path / "mm-test-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "mm-test-tiny-clip"


def test_open_clip_towers_random_and_local_checkpoint(tmp_path):
    name = _tiny_clip_config(tmp_path)
    text = build_text_encoder(TextEncoderConfig(kind="open_clip", open_clip_model=name))
    image = build_image_encoder(ImageEncoderConfig(kind="open_clip", open_clip_model=name, image_size=32))
    assert not text.frozen and not image.frozen  # random weights are trainable
    tb = text.prepare(["a red square", "hi"])
    assert tb["mask"].sum(1).tolist() == [5, 3]
    t_out = text(tb)
    _check(t_out, 2, 16, 24)  # the full context length of 16
    i_out = image(image.prepare([_picture(), _picture(20, 60)]))
    _check(i_out, 2, 16, 32)  # (32 / 8)^2 patch tokens of width 32

    # Round trip through a local checkpoint file, the path users with real CLIP weights take.
    ckpt = tmp_path / "tiny.pt"
    import open_clip

    model = open_clip.create_model(name)
    model.text = text.tower  # the full model's state dict, holding the weights of our towers
    model.visual = image.visual
    torch.save(model.state_dict(), ckpt)
    text2 = build_text_encoder(
        TextEncoderConfig(kind="open_clip", open_clip_model=name), pretrained=str(ckpt)
    )
    assert text2.frozen and text2.external_weights and not text.external_weights
    torch.testing.assert_close(text2(tb).tokens, t_out.tokens)
    with pytest.raises(FileNotFoundError):
        build_text_encoder(
            TextEncoderConfig(kind="open_clip", open_clip_model=name), pretrained="/no/such.pt"
        )


# ------------------------------------------------------------------------------------------- image


def test_patch_image_shapes_from_paths_bytes_and_pil(tmp_path):
    enc = build_image_encoder(ImageEncoderConfig(kind="patch", dim=16, image_size=32, patch=8))
    path = tmp_path / "a.png"
    _picture().save(path)
    buf = io.BytesIO()
    _picture(30, 90).save(buf, format="JPEG")
    batch = enc.prepare([path, buf.getvalue(), _picture(64, 64)])
    assert batch["pixels"].shape == (3, 3, 32, 32)
    assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0
    # the centre crop keeps the red square of the 48x32 picture in the middle
    assert batch["pixels"][0, 0, 16, 16] > 0.5 and batch["pixels"][0, 1, 16, 16] < -0.5
    out = enc(batch)
    _check(out, 3, 16, 16)
    assert out.mask.all()
    frozen = build_image_encoder(
        ImageEncoderConfig(kind="patch", dim=16, image_size=32, patch=8, trainable=False)
    )
    assert frozen.frozen and not frozen.external_weights and not frozen(batch).tokens.requires_grad
    with pytest.raises(ValueError, match="multiple"):
        build_image_encoder(ImageEncoderConfig(kind="patch", image_size=30, patch=8))


def test_efficientnet_lite0_loads_strictly_and_runs():
    from mm.encoders.efficientnet_lite import LITE_MEAN, default_checkpoint, efficientnet_lite0

    state = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    net = efficientnet_lite0()  # loads with strict=True
    assert net.state_dict().keys() == state.keys()
    # The stem BatchNorm's running mean is the stem conv applied to the mean training input, so it
    # tells which normalisation the weights expect: with LITE_MEAN/STD the mean input is (mu - 0.5) / 0.5.
    mu = torch.tensor([0.485, 0.456, 0.406])  # mean ImageNet pixel
    predicted = (state["_conv_stem.weight"].sum((2, 3)) * (mu - torch.tensor(LITE_MEAN)) / 0.5).sum(1)
    assert torch.corrcoef(torch.stack([predicted, state["_bn0.running_mean"]]))[0, 1] > 0.9

    enc = build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", image_size=224))
    assert enc.frozen and enc.external_weights and enc.out_dim == 1280
    enc.train()
    assert not enc.net.training
    out = enc(enc.prepare([_picture(300, 200)]))
    _check(out, 1, 49, 1280)
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    logits = enc.net._fc(out.pooled)
    assert torch.isfinite(logits).all() and logits.softmax(-1).max() < 1.0


# ------------------------------------------------------------------------------------------- audio


def _tone(seconds: float, rate: int = 8000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_logmel_patch_variable_lengths_and_layout(tmp_path):
    import soundfile as sf

    c = TINY_AUDIO
    enc = build_audio_encoder(c)
    sf.write(tmp_path / "a.wav", _tone(1.0, 16000), 16000)  # resampled to 8 kHz
    clips = [tmp_path / "a.wav", (_tone(0.25), 8000), (np.zeros(10, np.float32), 8000)]
    batch = enc.prepare(clips)
    frames = [8000 // c.hop + 1, 2000 // c.hop + 1, 1]
    assert batch["frame_mask"].sum(1).tolist() == frames
    assert batch["mel"].shape == (3, c.n_mels, 104)  # 101 frames rounded up to whole patches of 4
    out = enc(batch)
    bands = c.n_mels // c.patch_freq
    _check(out, 3, bands * 104 // c.patch_time, c.dim)
    assert out.mask.sum(1).tolist() == [bands * -(-f // c.patch_time) for f in frames]
    assert out.mask[1].view(-1, bands).all(1).sum() == out.mask[1].sum() // bands  # time-major blocks
    # a clip's result does not depend on what it was batched with
    alone = enc(enc.prepare(clips[1:2]))
    torch.testing.assert_close(out.pooled[1], alone.pooled[0], atol=1e-5, rtol=1e-4)
    merged = collate([enc.prepare(clips[1:2]), enc.prepare(clips[:1])])
    torch.testing.assert_close(enc(merged).pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-4)
    out.pooled.sum().backward()
    assert enc.proj.weight.grad is not None and enc.band.grad is not None


def test_logmel_crops_long_clips_and_rejects_bad_configs():
    enc = build_audio_encoder(AudioEncoderConfig(**{**TINY_AUDIO.__dict__, "max_seconds": 0.5}))
    batch = enc.prepare([(_tone(3.0), 8000)])
    assert batch["frame_mask"].sum().item() == 4000 // TINY_AUDIO.hop + 1
    with pytest.raises(ValueError, match="patch_freq"):
        build_audio_encoder(AudioEncoderConfig(n_mels=30, patch_freq=16))


def test_efficientnet_encoder_folds_its_batchnorms_exactly():
    # The frozen encoder folds BatchNorm into the convolutions when it loads: same features, no BN left.
    from mm.encoders.efficientnet_lite import efficientnet_lite0

    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", image_size=64))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    ref_net = efficientnet_lite0().eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = ref_net.features(pixels)
        got = enc.net.features(pixels.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fold_batchnorms_is_exact_with_nontrivial_statistics():
    from mm.encoders.efficientnet_lite import EfficientNetLite, fold_batchnorms

    torch.manual_seed(4)
    net = EfficientNetLite(num_classes=10).eval()
    for bn in net.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):  # non-trivial statistics, so folding has work to do
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
            torch.nn.init.uniform_(bn.bias, -0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net.features(x)
        assert fold_batchnorms(net) == 49  # stem + head + 16 depthwise + 16 project + 15 expand
        got = net.features(x)
        assert fold_batchnorms(net) == 0  # nothing left to fold
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
