"""Static INT8 EfficientNet-Lite (oneDNN quantized convs): padding, bias correction, fidelity, wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mm.encoders.efficientnet_int8 import (
    Calibration,
    Int8Conv2d,
    Int8EfficientNetFeatures,
    calibrate,
    conv_weight_levels,
    default_calibration,
    int8_convs_available,
)
from mm.encoders.efficientnet_lite import SameConv2d, efficientnet_lite0, fold_batchnorms

pytestmark = pytest.mark.skipif(not int8_convs_available(), reason="no oneDNN quantized convolutions")


def _quant(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    from mm.encoders.efficientnet_int8 import _qparams

    scale, zp = _qparams(lo, hi)
    return torch.quantize_per_tensor(x.contiguous(memory_format=torch.channels_last), scale, zp, torch.quint8)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [6, 7, 8])
def test_same_padding_by_grown_kernel_is_exact(kernel, size):
    # Stride-2 "SAME" pads one more zero after than before on even sizes; the int8 conv instead packs a
    # kernel with a zero first tap and pads symmetrically. In float, both give the same sums.
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, kernel, stride=2, groups=4, bias=True).eval()
    x = torch.randn(2, 4, size, size + 1)  # height and width of different parity
    q = Int8Conv2d(conv, (-10.0, 10.0), relu6=False)
    parity = (size % 2, (size + 1) % 2)
    with torch.no_grad():
        ref = conv(x)
        w = q._grow(conv.weight, parity)
        got = F.conv2d(x, w, conv.bias, stride=2, padding=q._padding(parity), groups=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="strides 1 and 2"):
        Int8Conv2d(SameConv2d(4, 4, kernel, stride=3, groups=4, bias=True), (-1.0, 1.0), relu6=False)


def test_int8_conv_matches_float_and_fuses_relu6():
    torch.manual_seed(1)
    conv = SameConv2d(8, 16, 3, stride=2, bias=True).eval()
    x = torch.rand(2, 8, 10, 10) * 6
    with torch.no_grad():
        ref = conv(x)
    lin = Int8Conv2d(conv, (float(ref.min()), float(ref.max())), relu6=False)
    relu = Int8Conv2d(conv, (0.0, 6.0), relu6=True)
    qx = _quant(x, 0.0, 6.0)
    got = lin(qx).dequantize()
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    clipped = relu(qx).dequantize()
    assert clipped.min() >= 0 and clipped.max() <= 6.0 + 1e-6
    torch.testing.assert_close(clipped, F.relu6(ref), atol=0.08, rtol=0)  # ~3 steps of 6/255


def test_the_worst_case_convolution_is_exact_with_the_levels_chosen_here():
    """Every activation code 255 times every weight code at its maximum: on a CPU without VNNI the int8
    kernel adds pairs of products into saturating int16 sums, and 8-bit weights came out at half the
    true value (1,046,683 for 2,072,640 on an AVX2 AMD EPYC); the weight levels chosen here must not."""
    levels = conv_weight_levels()
    assert levels in (63, 127)
    conv = torch.nn.Conv2d(64, 1, 1, bias=True).eval()
    torch.nn.init.constant_(conv.weight, 1.0)  # one scale per channel: every code is ``levels``
    torch.nn.init.zeros_(conv.bias)
    exact = 64 * 255.0
    q = Int8Conv2d(conv, (0.0, exact * 1.25), relu6=False)
    got = q(_quant(torch.full((1, 64, 3, 3), 255.0), 0.0, 255.0)).dequantize()
    torch.testing.assert_close(got, torch.full_like(got, exact), rtol=0.01, atol=0)


def test_depthwise_bias_correction_removes_the_mean_shift():
    # For an input equal to its channel means everywhere, the corrected int8-weight conv's interior
    # outputs equal the float conv's (the rounding error's mean shift is exactly what is subtracted).
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True).eval()
    mean = torch.rand(6) * 3
    x = mean.view(1, 6, 1, 1).expand(1, 6, 9, 9).contiguous()
    with torch.no_grad():
        ref = conv(x)[..., 1:-1, 1:-1]
        scales = conv.weight.abs().amax(dim=(1, 2, 3)) / 127
        codes = torch.round(conv.weight / scales[:, None, None, None]).to(torch.int8)
        wq = codes.float() * scales[:, None, None, None]
        from mm.encoders.efficientnet_int8 import _weight_error_shift

        shift = _weight_error_shift(conv.weight, codes, scales, mean, groups=6)
        got = F.conv2d(x, wq, conv.bias - shift, padding=1, groups=6)[..., 1:-1, 1:-1]
        uncorrected = F.conv2d(x, wq, conv.bias, padding=1, groups=6)[..., 1:-1, 1:-1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (uncorrected - ref).abs().max() > 1e-4  # there was a shift to correct
    with pytest.raises(ValueError, match="depthwise"):
        w = torch.zeros(4, 2, 3, 3)
        _weight_error_shift(w, w.to(torch.int8), torch.ones(4), torch.zeros(4), groups=2)


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Normalised (n, 3, size, size) images with natural-ish structure (upsampled noise), in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def folded():
    net = efficientnet_lite0().eval()
    fold_batchnorms(net)
    return net


def test_int8_features_close_to_fp32_on_unseen_images(folded):
    cal = calibrate(folded, [_smooth_images(8, 64, seed=0)])
    assert "input" in cal.ranges and "_blocks.15._depthwise_conv" in cal.means
    q = Int8EfficientNetFeatures(folded, cal)
    x = _smooth_images(4, 64, seed=1)  # not seen in calibration
    with torch.no_grad():
        ref = folded.features(x)
        got = q(x)
    assert got.shape == ref.shape == (4, 1280, 2, 2) and got.dtype == torch.float32
    pooled = F.cosine_similarity(got.mean(dim=(2, 3)), ref.mean(dim=(2, 3)))
    # 7-bit weights (a CPU without VNNI, conv_weight_levels) cost a little: 0.955-0.99 measured there
    assert pooled.min() > (0.97 if conv_weight_levels() == 127 else 0.95), pooled
    without = Int8EfficientNetFeatures(folded, Calibration(cal.ranges))  # no bias correction
    with torch.no_grad():
        worse = F.cosine_similarity(without(x).mean(dim=(2, 3)), ref.mean(dim=(2, 3)))
    assert pooled.mean() > worse.mean()


def test_calibration_round_trip_and_shipped_file_is_complete(folded, tmp_path):
    cal = default_calibration()
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.ranges.keys() == cal.ranges.keys() and again.means.keys() == cal.means.keys()
    Int8EfficientNetFeatures(folded, cal)  # every tensor the int8 graph needs has a range
    with pytest.raises(ValueError, match="no calibrated activation range"):
        Int8EfficientNetFeatures(folded, Calibration({"input": (-1.0, 1.0)}))
    with pytest.raises(ValueError, match="fold the BatchNorms"):
        Int8EfficientNetFeatures(efficientnet_lite0(None), cal)


def test_int8_checkpoint_runs_and_reloads_static_int8_convs(tmp_path):
    from PIL import Image

    from mm.model import create_model, save_model
    from mm.quantize import QuantSpec, quantize_model
    from mm.quantize_checkpoint import save_quantized

    overrides = {"image": {"kind": "efficientnet_lite0", "image_size": 64}}
    base = save_model(create_model("tiny", overrides=overrides).model, tmp_path / "base")
    rng = np.random.default_rng(0)
    coarse = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    images = [Image.fromarray(c).resize((64, 64), Image.Resampling.BILINEAR) for c in coarse]
    ref = create_model(base).encode("image", images)
    emb = create_model(base)
    spec = quantize_model(emb.model, QuantSpec(mode="int8"))
    assert emb.model.encoders["image"].int8 is not None
    got = emb.encode("image", images)
    assert (got * ref).sum(1).min() > 0.95  # random tiny backbone, 64 px vs the 224 px calibration
    loaded = create_model(save_quantized(emb.model, spec, tmp_path / "q"))
    assert loaded.model.encoders["image"].int8 is not None  # re-applied on load
    np.testing.assert_allclose(loaded.encode("image", images), got, atol=1e-5)
    linears_only = create_model(base)
    quantize_model(linears_only.model, QuantSpec(mode="int8", encoders=False))
    assert linears_only.model.encoders["image"].int8 is None


@pytest.mark.slow
def test_cli_quantize_recalibrates_on_given_images(tmp_path, capsys):
    from PIL import Image

    from mm.model import create_model, save_model
    from service.cli import main

    overrides = {"image": {"kind": "efficientnet_lite0", "image_size": 64}}
    base = save_model(create_model("tiny", overrides=overrides).model, tmp_path / "base")
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((64, 64)).save(
            pics / f"{i}.png"
        )
    out = tmp_path / "q"
    assert (
        main(
            ["quantize", "--model", str(base), "--mode", "int8", "--out", str(out), "--calibrate", str(pics)]
        )
        == 0
    )
    capsys.readouterr()
    spec = json.loads((out / "quantization.json").read_text())
    cal = Calibration.from_dict(spec["calibration"])
    assert cal.ranges.keys() == default_calibration().ranges.keys()
    assert cal.ranges != default_calibration().ranges  # measured on these images, not the shipped ones
    int8 = create_model(out).model.encoders["image"].int8
    from mm.encoders.efficientnet_int8 import _qparams

    assert (int8.in_scale, int8.in_zero_point) == _qparams(*cal.ranges["input"])
    # bad input: one-line errors, nothing written
    assert (
        main(
            [
                "quantize",
                "--model",
                str(base),
                "--mode",
                "int8",
                "--out",
                str(tmp_path / "x"),
                "--calibrate",
                str(tmp_path / "nope"),
            ]
        )
        == 2
    )
    assert "no such file or folder" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                "--model",
                "tiny",
                "--mode",
                "int8",
                "--out",
                str(tmp_path / "y"),
                "--calibrate",
                str(pics),
            ]
        )
        == 1
    )
    assert "no static INT8 convolutions" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
