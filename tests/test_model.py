"""The embedder as a whole: shapes, normalisation, batching, save/load, configs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mm.config import ModelConfig
from mm.errors import ConfigError, MediaError
from mm.model import create_model, load_weights, save_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny")


def _image(color, size=40):
    return Image.new("RGB", (size, size), color)


def test_encode_shapes_and_norms(tiny, tmp_path):
    t = tiny.encode_text(["a red square", "a barking dog", "x"])
    i = tiny.encode_image([_image((255, 0, 0)), _image((0, 0, 255), 64)])
    wav = tmp_path / "tone.wav"
    sf.write(wav, np.sin(np.linspace(0, 2000, 8000)).astype(np.float32), 8000)
    a = tiny.encode_audio([str(wav), (np.zeros(3000, dtype=np.float32) + 0.1, 16000)])
    for z, n in ((t, 3), (i, 2), (a, 2)):
        assert z.shape == (n, tiny.dim) and z.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(t[0], t[1])


def test_batching_does_not_change_results(tiny):
    texts = [f"caption number {i}" for i in range(7)]
    tiny.batch_size = 3
    a = tiny.encode_text(texts)
    tiny.batch_size = 32
    b = tiny.encode_text(texts)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_save_load_round_trip_identical(tiny, tmp_path):
    save_model(tiny.model, tmp_path / "ckpt")
    again = create_model(str(tmp_path / "ckpt"))
    texts = ["a frog", "drum hit"]
    np.testing.assert_array_equal(tiny.encode_text(texts), again.encode_text(texts))
    img = [_image((10, 200, 30))]
    np.testing.assert_array_equal(tiny.encode_image(img), again.encode_image(img))
    assert again.model_id.split(":")[1] == tiny.model_id.split(":")[1]


def test_weights_must_match_config(tiny, tmp_path):
    save_model(tiny.model, tmp_path / "ckpt")
    other = create_model("tiny", pretrained=False, overrides={"backbone.depth": 1})
    with pytest.raises(ConfigError, match="does not match"):
        load_weights(other.model, tmp_path / "ckpt")


def test_overrides_and_unknown_names():
    cfg = ModelConfig.from_json("mm/configs/tiny.json").with_overrides(
        {"backbone": {"depth": 1}, "embed_dim": 16}
    )
    assert cfg.backbone.depth == 1 and cfg.embed_dim == 16
    with pytest.raises(ValueError, match="unknown config key"):
        cfg.with_overrides({"backbone.nope": 1})
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("no-such-model")


def test_ablation_configs_build_and_encode():
    for ov in ({"backbone.ffn": "dense"}, {"backbone.attention": "full"}, {"residual_pooled": False}):
        emb = create_model("tiny", overrides=ov)
        z = emb.encode_text(["hello world"])
        assert z.shape == (1, emb.dim) and np.isfinite(z).all()


def test_bad_media_raise_project_error(tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(MediaError):
        tiny.encode_image([str(bad)])
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError):
        tiny.encode_audio([str(empty)])
    with pytest.raises(TypeError):
        tiny.encode_text("not a list")


def test_pooled_drop_leaves_the_backbone_path_in_training_only():
    torch.manual_seed(0)
    model = create_model("tiny").model
    torch.nn.init.normal_(model.out_proj.weight, std=0.1)  # out_proj starts at zero; give it a signal
    enc = model.encoders["text"]
    with torch.no_grad():
        feats = enc(enc.prepare(["a red square", "a blue circle"]))
        model.eval()
        full = model.embed("text", feats, pooled_drop=1.0)[0]
        torch.testing.assert_close(full, model.embed("text", feats)[0])  # eval: nothing is dropped
        model.train()
        dropped = model.embed("text", feats, pooled_drop=1.0)[0]
        kept = model.embed("text", feats, pooled_drop=0.0)[0]
        model.pooled_proj["text"].weight.zero_()
        backbone_only = model.embed("text", feats)[0]
    assert not torch.allclose(dropped, kept)
    torch.testing.assert_close(dropped, backbone_only, atol=1e-5, rtol=1e-4)
